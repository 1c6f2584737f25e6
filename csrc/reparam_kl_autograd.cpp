// Autograd of reparam_kl_<family>_fwd in C++, for both kernel families.
//
// The forward runs the op's own kernel below autograd and keeps the inputs (never
// the noise, which the backward draws again from the seed); the backward calls
// reparam_kl_<family>_bwd once. genkern/ops/reparam_kl.py holds the same autograd in
// Python, registered where this extension is not loaded; here it costs a few
// microseconds per call instead of tens (genkern bench --op reparameterize_kl).
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <initializer_list>

#include "common.h"

namespace genkern {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using FwdSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&, const OptTensor&);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const OptTensor&, const OptTensor&, const OptTensor&,
                                                          const OptTensor&);

struct CppFamily {
  static constexpr const char* fwd = "genkern::reparam_kl_cpp_fwd";
  static constexpr const char* bwd = "genkern::reparam_kl_cpp_bwd";
};
struct TritonFamily {
  static constexpr const char* fwd = "genkern::reparam_kl_triton_fwd";
  static constexpr const char* bwd = "genkern::reparam_kl_triton_bwd";
};

template <typename Family>
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = typed_op<FwdSig>(Family::fwd);
  return op;
}

template <typename Family>
const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = typed_op<BwdSig>(Family::bwd);
  return op;
}

OptTensor opt(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

template <typename Family, typename Self>
class ReparamKL : public torch::autograd::Function<Self> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& mu,
                                                const Tensor& logvar, const OptTensor& eps, const OptTensor& prior_mu,
                                                const OptTensor& prior_logvar, const OptTensor& seed) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [z, kl] = fwd_op<Family>().call(mu, logvar, eps, prior_mu, prior_logvar, seed);
    ctx->save_for_backward({mu, logvar, eps.value_or(Tensor()), prior_mu.value_or(Tensor()),
                            prior_logvar.value_or(Tensor()), seed.value_or(Tensor())});
    return {z, kl};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The returned gradients carry no graph of their own, so a second derivative
    // through them would be silently zero: refuse it instead.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "reparameterize_kl: the fused kernels do not support double backward (create_graph=True); "
                "use impl=\"torch\" for higher-order gradients");
    auto saved = ctx->get_saved_variables();
    const Tensor &mu = saved[0], &logvar = saved[1], &eps = saved[2], &pm = saved[3];
    // An output that did not reach the loss has an undefined gradient: it contributes zero.
    Tensor gz = grads[0].defined() ? grads[0] : at::zeros_like(mu, at::MemoryFormat::Contiguous);
    Tensor gkl = grads[1].defined() ? grads[1] : mu.new_zeros(mu.sizes().slice(0, mu.dim() - 1));
    auto [g_mu, g_logvar, g_pm, g_plv] =
        bwd_op<Family>().call(gz, gkl, mu, logvar, opt(eps), opt(pm), opt(saved[4]), opt(saved[5]));
    Tensor g_eps;
    if (eps.defined() && ctx->needs_input_grad(2)) {
      // d z / d eps = exp(logvar / 2), in float32 for half inputs like the kernels.
      auto ct = at::toOpMathType(mu.scalar_type());
      g_eps = (gz.to(ct) * at::exp(0.5 * logvar.to(ct))).to(mu.scalar_type());
    }
    bool prior = pm.defined();
    return {g_mu, g_logvar, g_eps, prior ? g_pm : Tensor(), prior ? g_plv : Tensor(), Tensor()};
  }
};

// The autograd nodes (named for grad_fn and error messages).
struct ReparamKLCppBackward final : ReparamKL<CppFamily, ReparamKLCppBackward> {};
struct ReparamKLTritonBackward final : ReparamKL<TritonFamily, ReparamKLTritonBackward> {};

bool wants_grad(std::initializer_list<const Tensor*> ts, std::initializer_list<const OptTensor*> opts) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return true;
  for (const OptTensor* t : opts)
    if (t->has_value() && (*t)->requires_grad()) return true;
  return false;
}

template <typename Family, typename Node>
std::tuple<Tensor, Tensor> with_autograd(const Tensor& mu, const Tensor& logvar, const OptTensor& eps,
                                         const OptTensor& prior_mu, const OptTensor& prior_logvar,
                                         const OptTensor& seed) {
  if (!wants_grad({&mu, &logvar}, {&eps, &prior_mu, &prior_logvar})) {
    // No graph to record (no_grad, inputs that need no gradient): the kernel alone.
    at::AutoDispatchBelowADInplaceOrView below;
    return fwd_op<Family>().call(mu, logvar, eps, prior_mu, prior_logvar, seed);
  }
  auto out = Node::apply(mu, logvar, eps, prior_mu, prior_logvar, seed);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, Autograd, m) {
  m.impl("reparam_kl_cpp_fwd", &with_autograd<CppFamily, ReparamKLCppBackward>);
  m.impl("reparam_kl_triton_fwd", &with_autograd<TritonFamily, ReparamKLTritonBackward>);
}

}  // namespace genkern
