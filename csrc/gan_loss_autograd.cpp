// Autograd of gan_loss_<family>_fwd in C++, for both kernel families.
//
// The fused forward returns the loss and its gradient with respect to each logits tensor;
// the forward below keeps those gradients and the backward only scales them by the incoming
// gradient. genkern/ops/gan_loss.py holds the same autograd in Python, registered where this
// extension is not loaded; here a call costs a few microseconds instead of tens, which is
// most of the time of a GAN loss at training batch sizes (genkern bench --op gan_loss).
//
// Public headers only (torch/autograd.h, ATen, c10): torch::autograd::Function, no raw
// autograd nodes, so the file builds against every torch the package supports.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>

#include <optional>
#include <tuple>

#include "common.h"
#include "gan_loss.h"

namespace genkern {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using FwdOut = std::tuple<Tensor, Tensor, Tensor>;
using FwdSig = FwdOut(const OptTensor&, const Tensor&, int64_t, int64_t, double, bool);

struct CppFamily {
  static constexpr const char* kFwd = "genkern::gan_loss_cpp_fwd";
  static constexpr bool kCpu = true;
};
struct TritonFamily {
  static constexpr const char* kFwd = "genkern::gan_loss_triton_fwd";
  static constexpr bool kCpu = false;
};

template <class Family>
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = typed_op<FwdSig>(Family::kFwd);
  return op;
}

// Keys under which a tensor's memory is not simply its values (negative/conjugate views,
// zero tensors) or something records the ops on it (fake and functional tensors).
constexpr auto kNotPlain =
    c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
                         c10::DispatchKey::Negative, c10::DispatchKey::Conjugate, c10::DispatchKey::ZeroTensor});

// Nothing records the ops of this thread (no dispatch mode, no tracing key).
bool untraced() {
  return !c10::impl::tls_local_dispatch_key_set().included_.has_any(kNotPlain) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// A plain CPU tensor: its memory may be read and written directly, skipping the dispatcher
// (what it would run is the CPU kernel itself), when untraced() holds too.
bool is_plain_cpu(const Tensor& t) { return t.device().is_cpu() && !t.key_set().has_any(kNotPlain) && t.has_storage(); }

// Whether g is a plain CPU scalar (the upstream gradient of a mean/sum loss), read into
// `value` without a dispatch. Never under a tracing mode (the multiply must then be
// recorded), and never for CUDA scalars (reading one would synchronise).
bool plain_scalar(const Tensor& g, double& value) {
  if (g.dim() != 0 || !is_plain_cpu(g) || !untraced()) return false;
  const void* p = g.const_data_ptr();
  switch (g.scalar_type()) {
    case at::kFloat: value = *static_cast<const float*>(p); return true;
    case at::kDouble: value = *static_cast<const double*>(p); return true;
    case at::kHalf: value = static_cast<float>(*static_cast<const at::Half*>(p)); return true;
    case at::kBFloat16: value = static_cast<float>(*static_cast<const at::BFloat16*>(p)); return true;
    default: return false;
  }
}

// dst = src * g elementwise, computed in the op-math type and rounded once.
template <typename scalar_t>
void scale_loop(const scalar_t* src, scalar_t* dst, int64_t n, double g) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t a = static_cast<acc_t>(g);
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) dst[i] = static_cast<scalar_t>(static_cast<acc_t>(src[i]) * a);
  });
}

// saved * g into a new tensor of saved's dtype (saved: contiguous, plain CPU).
Tensor scale_plain(const Tensor& saved, double g) {
  Tensor dst = at::empty(saved.sizes(), saved.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "gan_loss_scale", [&] {
    scale_loop(saved.const_data_ptr<scalar_t>(), dst.data_ptr<scalar_t>(), saved.numel(), g);
  });
  return dst;
}

// The saved gradient of one logits tensor scaled by the incoming gradient g (gv when g is a
// plain scalar). With g = 1 (loss.backward()) the saved tensor itself is handed out: once the
// node has released it (no retain_graph), AccumulateGrad adopts it without a copy; while the
// node keeps it, AccumulateGrad copies it, and an in-place change of a gradient returned by
// torch.autograd.grad trips the saved tensor's version check instead of going unnoticed.
Tensor scaled(const Tensor& saved, const Tensor& g, bool plain, double gv) {
  if (plain && is_plain_cpu(saved) && saved.is_contiguous()) return gv == 1.0 ? saved : scale_plain(saved, gv);
  return g * saved;
}

// The fused forward below autograd: on plain CPU tensors the kernel is called directly, which
// is what the dispatcher would run, less its per-call cost.
template <class Family>
FwdOut run_fwd(const OptTensor& real, const Tensor& fake, int64_t kind, int64_t reduction, double label, bool gen) {
  at::AutoDispatchBelowADInplaceOrView below;
  if constexpr (Family::kCpu) {
    if (is_plain_cpu(fake) && (!real.has_value() || is_plain_cpu(*real)) && untraced())
      return gan_loss_fwd(real, fake, kind, reduction, label, gen);
  }
  return fwd_op<Family>().call(real, fake, kind, reduction, label, gen);
}

// What the backward needs besides the saved gradients, in ctx->saved_data, only where it differs
// from the common case (each entry costs an allocation per call): kRealShape / kFakeShape, the
// shape a constant (0-d) gradient is expanded to; kMix, relativistic "none" (each side's gradient
// enters the other's via its mean).
constexpr const char* kRealShape = "real_shape";
constexpr const char* kFakeShape = "fake_shape";
constexpr const char* kMix = "mix";

// Whether the forward had real logits: without them grad_real is the empty (0,) placeholder
// (real logits themselves are never empty), and autograd's input edges are (fake) alone.
bool has_real(const Tensor& grad_real) { return !(grad_real.dim() == 1 && grad_real.size(0) == 0); }

// The differentiable loss. The kernel's gradients are kept as saved variables of the node, not
// outputs of it (compiled autograd takes no non-differentiable outputs); `grads` hands them to
// the caller, which returns them as the op's other outputs.
template <class Family, class Self>
struct GanLoss : public torch::autograd::Function<Self> {
  static variable_list forward(AutogradContext* ctx, const OptTensor& real, const Tensor& fake, int64_t kind,
                               int64_t reduction, double label, bool generator, FwdOut* grads) {
    auto [loss, gr, gf] = run_fwd<Family>(real, fake, kind, reduction, label, generator);
    ctx->save_for_backward({gr, gf});
    if (real.has_value() && const_grad_real(kind, generator)) ctx->saved_data[kRealShape] = real->sym_sizes();
    if (const_grad_fake(kind, generator)) ctx->saved_data[kFakeShape] = fake.sym_sizes();
    if (kind == kRelativistic && reduction == kNone) ctx->saved_data[kMix] = true;
    *grads = {Tensor(), gr, gf};
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The backward only scales gradients saved by the fused forward: right to first order
    // only, so a second derivative through it would silently be zero. Refuse it.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "genkern gan_loss (impl cpp/triton): double backward (create_graph=True) is not supported (the "
                "backward only scales the gradient saved by the fused forward); use impl=\"torch\" for "
                "higher-order gradients");
    variable_list out(7);  // one per forward argument: (real, fake, kind, reduction, real_label, generator, grads)
    const Tensor& g = grads[0];
    if (!g.defined()) return out;  // the loss did not reach the output: zero gradients
    auto saved = ctx->get_saved_variables();
    const bool real = has_real(saved[0]);
    const bool want[2] = {real && ctx->needs_input_grad(0), ctx->needs_input_grad(real ? 1 : 0)};
    if (!ctx->saved_data.empty() && ctx->saved_data.count(kMix)) {
      // grad_x = g gx - mean(g gy), grad_y = g gy - mean(g gx) (see csrc/gan_loss.cpp).
      Tensor tr = g * saved[0], tf = g * saved[1];
      if (want[0]) out[0] = tr - tf.mean();
      if (want[1]) out[1] = tf - tr.mean();
      return out;
    }
    double gv = 0;
    const bool plain = plain_scalar(g, gv);
    const char* shape_keys[2] = {kRealShape, kFakeShape};
    for (int i = 0; i < 2; ++i) {
      if (!want[i]) continue;
      out[i] = scaled(saved[i], g, plain, gv);
      auto shape = ctx->saved_data.find(shape_keys[i]);
      if (shape == ctx->saved_data.end() || out[i].dim() != 0) continue;
      // A constant gradient reaches autograd as a stride-0 view (as torch's sum() gives):
      // AccumulateGrad copies it into a fresh .grad, so users still get a writable tensor.
      // Untraced, the scalar is ours alone: the view needs no autograd view tracking.
      std::optional<at::AutoDispatchBelowADInplaceOrView> below;
      if (plain) below.emplace();
      out[i] = out[i].expand_symint(shape->second.toSymIntVector());
    }
    return out;
  }
};

// The autograd nodes (named for grad_fn and error messages).
struct GanLossCppBackward final : GanLoss<CppFamily, GanLossCppBackward> {};
struct GanLossTritonBackward final : GanLoss<TritonFamily, GanLossTritonBackward> {};

template <class Family, class Node>
FwdOut gan_loss_autograd(const OptTensor& real, const Tensor& fake, int64_t kind, int64_t reduction, double label,
                         bool generator) {
  bool grad = at::GradMode::is_enabled() && (fake.requires_grad() || (real.has_value() && real->requires_grad()));
  if (!grad) return run_fwd<Family>(real, fake, kind, reduction, label, generator);  // no graph to record
  FwdOut grads;
  auto loss = Node::apply(real, fake, kind, reduction, label, generator, &grads);
  return {loss[0], std::get<1>(grads), std::get<2>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(genkern, Autograd, m) {
  m.impl("gan_loss_cpp_fwd", &gan_loss_autograd<CppFamily, GanLossCppBackward>);
  m.impl("gan_loss_triton_fwd", &gan_loss_autograd<TritonFamily, GanLossTritonBackward>);
}

}  // namespace genkern
