// Argument checks of the reparam_kl CPU kernels and their flattened (rows, D) view.
#include "reparam_kl_args.h"

#include "common.h"

namespace genkern::rkl {
namespace {

bool varies_only_along_last(const at::Tensor& t) {
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) != 1 && t.stride(i) != 0) return false;
  return true;
}

}  // namespace

void check_args(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& eps,
                const c10::optional<at::Tensor>& prior_mu, const c10::optional<at::Tensor>& prior_logvar,
                const c10::optional<at::Tensor>& seed) {
  check_cpu(mu, "mu");
  check_float(mu, "mu");
  GENKERN_CHECK_VALUE(mu.dim() >= 1, "mu must have at least one dimension (..., D), got a 0-d tensor");
  check_cpu(logvar, "logvar");
  check_same(logvar, mu, "logvar", "mu");
  GENKERN_CHECK_VALUE(eps.has_value() != seed.has_value(), "exactly one of eps and seed must be given, got ",
                      eps.has_value() ? "both" : "neither");
  if (eps.has_value()) {
    check_cpu(*eps, "eps");
    check_same(*eps, mu, "eps", "mu");
  } else {
    check_cpu(*seed, "seed");
    GENKERN_CHECK_TYPE(seed->scalar_type() == at::kLong, "seed must be an int64 tensor, got ", seed->scalar_type());
    GENKERN_CHECK_VALUE(seed->numel() == 1, "seed must have exactly one element, got ", seed->numel());
    // Philox counters (one per 4 elements) are uint32.
    GENKERN_CHECK_VALUE(mu.numel() < (int64_t(1) << 34), "in-kernel noise supports fewer than 2^34 elements, got ",
                        mu.numel(), "; pass eps instead");
  }
  GENKERN_CHECK_VALUE(prior_mu.has_value() == prior_logvar.has_value(),
                      "prior_mu and prior_logvar must be both given or both None");
  if (prior_mu.has_value()) {
    check_cpu(*prior_mu, "prior_mu");
    check_same(*prior_mu, mu, "prior_mu", "mu");
    check_cpu(*prior_logvar, "prior_logvar");
    check_same(*prior_logvar, mu, "prior_logvar", "mu");
  }
}

// Call after check_args and only when mu.numel() > 0.
Args make_args(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& eps,
               const c10::optional<at::Tensor>& prior_mu, const c10::optional<at::Tensor>& prior_logvar,
               const c10::optional<at::Tensor>& seed) {
  Args a;
  a.D = mu.size(-1);
  a.rows = mu.numel() / a.D;
  a.mu = mu.contiguous();
  a.lv = logvar.contiguous();
  if (eps.has_value()) a.eps = eps->contiguous();
  else a.seed = seed->item<int64_t>();
  a.has_prior = prior_mu.has_value();
  if (a.has_prior) {
    a.prior_is_vec = varies_only_along_last(*prior_mu) && varies_only_along_last(*prior_logvar);
    if (a.prior_is_vec) {
      // One row of each prior, widened once; exp(-prior_logvar / 2) computed once per column.
      auto acc = mu.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      auto row = [&](at::Tensor t) {  // (D,) view of row 0, never a copy of the full tensor
        while (t.dim() > 1) t = t.select(0, 0);
        return t.to(acc).contiguous();
      };
      a.pm = row(*prior_mu);
      a.plv = row(*prior_logvar);
      a.ip = at::exp(a.plv * -0.5);
    } else {
      a.pm = prior_mu->contiguous();
      a.plv = prior_logvar->contiguous();
    }
  }
  return a;
}

}  // namespace genkern::rkl
