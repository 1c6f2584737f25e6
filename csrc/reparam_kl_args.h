// Arguments of the reparam_kl CPU kernels (reparam_kl.cpp): checks and the flattened view.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>

namespace genkern::rkl {

// The checked arguments, flattened to (rows, D). Priors are kept as acc_t (D,)
// vectors when they only vary along D (the usual expand() of a (D,) or () prior),
// otherwise as contiguous full tensors.
struct Args {
  at::Tensor mu, lv, eps, pm, plv, ip;  // eps undefined when drawn from the seed
  bool has_prior = false, prior_is_vec = false;
  int64_t seed = 0, rows = 0, D = 0;
};

// Raises ValueError / TypeError on a bad argument.
void check_args(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
                const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
                const std::optional<at::Tensor>& seed);

// Call after check_args and only when mu.numel() > 0.
Args make_args(const at::Tensor& mu, const at::Tensor& logvar, const std::optional<at::Tensor>& eps,
               const std::optional<at::Tensor>& prior_mu, const std::optional<at::Tensor>& prior_logvar,
               const std::optional<at::Tensor>& seed);

}  // namespace genkern::rkl
