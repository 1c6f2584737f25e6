// What the autograd of gan_loss (csrc/gan_loss_autograd.cpp) needs of the CPU kernels
// (csrc/gan_loss.cpp): the kind and reduction codes of the schema and the fused forward.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace genkern {

// Codes of the schema's `kind` and `reduction` (genkern/reference/gan_loss.py: KINDS, REDUCTIONS).
enum Kind : int64_t { kNonsaturating, kMinimax, kHinge, kWasserstein, kLeastSquares, kRelativistic, kNumKinds };
enum Reduction : int64_t { kMean, kSum, kNone, kNumReductions };

// Whether the gradient with respect to the real / fake logits is one constant (returned 0-d).
bool const_grad_real(int64_t kind, bool generator);
bool const_grad_fake(int64_t kind, bool generator);

// The CPU kernel of gan_loss_cpp_fwd: (loss, grad_real, grad_fake).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gan_loss_fwd(const std::optional<at::Tensor>& real,
                                                            const at::Tensor& fake, int64_t kind, int64_t reduction,
                                                            double real_label, bool generator);

}  // namespace genkern
