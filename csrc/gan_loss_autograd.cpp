// C++ autograd of the differentiable ops gan_loss_cpp / gan_loss_triton.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/dynamo/compiled_autograd.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "common.h"
#include "gan_loss.h"

namespace genkern {
namespace {

// --- the differentiable ops: C++ autograd over either family's fused forward ------------
using FwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const c10::optional<at::Tensor>&, const at::Tensor&,
                                                             int64_t, int64_t, double, bool);

struct CppFamily {
  static constexpr const char* kFwd = "genkern::gan_loss_cpp_fwd";
};
struct TritonFamily {
  static constexpr const char* kFwd = "genkern::gan_loss_triton_fwd";
};

template <class Family>
const c10::TypedOperatorHandle<FwdFn>& fwd_op() {
  static const auto op = typed_op<FwdFn>(Family::kFwd);
  return op;
}

using torch::autograd::variable_list;

// Keys under which a tensor's memory is not simply its values (negative/conjugate views,
// zero tensors) or something records the ops on it (fake and functional tensors).
constexpr auto kNotPlain = c10::DispatchKeySet(
    {c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot, c10::DispatchKey::Functionalize,
     c10::DispatchKey::Negative, c10::DispatchKey::Conjugate, c10::DispatchKey::ZeroTensor});

// Nothing records the ops of this thread (no dispatch mode, no tracing key).
bool untraced() {
  return !c10::impl::tls_local_dispatch_key_set().included_.has_any(kNotPlain) &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

// A plain CPU tensor: its memory may be read and written directly, skipping the dispatcher
// (what it would run is the CPU kernel itself), when untraced() holds too.
bool is_plain_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && !t.key_set().has_any(kNotPlain) && t.has_storage();
}

// Whether g is a plain CPU scalar (the upstream gradient of a mean/sum loss), read into
// `value` without a dispatch. Never under create_graph or a tracing mode (the multiply must
// then be recorded), and never for CUDA scalars (reading one would synchronise).
bool plain_scalar(const at::Tensor& g, bool create_graph, double& value) {
  if (create_graph || g.dim() != 0 || !is_plain_cpu(g) || !untraced()) return false;
  const void* p = g.const_data_ptr();
  switch (g.scalar_type()) {
    case at::kFloat: value = *static_cast<const float*>(p); return true;
    case at::kDouble: value = *static_cast<const double*>(p); return true;
    case at::kHalf: value = static_cast<float>(*static_cast<const at::Half*>(p)); return true;
    case at::kBFloat16: value = static_cast<float>(*static_cast<const at::BFloat16*>(p)); return true;
    default: return false;
  }
}

// dst = src * g elementwise (contiguous, dst may be src), computed in src's op-math type and
// rounded once to dst's dtype (src's, or the logits' half dtype when the forward widened).
template <typename src_t, typename dst_t>
void scale_loop(const src_t* src, dst_t* dst, int64_t n, double g) {
  using acc_t = at::opmath_type<src_t>;
  const acc_t a = static_cast<acc_t>(g);
  at::parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) dst[i] = static_cast<dst_t>(static_cast<acc_t>(src[i]) * a);
  });
}

// The saved gradient scaled by a plain scalar g into a tensor of `out_dtype`: in place when
// `owned` (the saved tensor is ours alone) and the dtype does not change.
at::Tensor scale_plain(at::Tensor saved, double g, bool owned, at::ScalarType out_dtype) {
  at::Tensor dst = owned && out_dtype == saved.scalar_type()
                       ? saved
                       : at::empty(saved.sizes(), saved.options().dtype(out_dtype));
  int64_t n = saved.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "gan_loss_scale", [&] {
    const scalar_t* src = saved.const_data_ptr<scalar_t>();
    if (out_dtype == at::kHalf && !std::is_same_v<scalar_t, at::Half>)
      scale_loop(src, dst.data_ptr<at::Half>(), n, g);
    else if (out_dtype == at::kBFloat16 && !std::is_same_v<scalar_t, at::BFloat16>)
      scale_loop(src, dst.data_ptr<at::BFloat16>(), n, g);
    else
      scale_loop(src, dst.data_ptr<scalar_t>(), n, g);
  });
  return dst;
}

// What the backward needs besides the incoming gradient: the fused forward's gradients.
struct Saved {
  at::Tensor grad[2];                 // d loss / d (real, fake): the logits' shape, or 0-d constants
  std::vector<c10::SymInt> shape[2];  // the logits' shapes, to expand the 0-d constants to
  bool constant[2] = {false, false};
  c10::optional<at::ScalarType> narrow;  // half logits widened to float32: the dtype to return
  bool mix = false;                      // relativistic "none": the cross terms are added here
};

// Whether this handle is the only reference to t and its memory: it may be scaled in place
// and handed out (a gradient returned earlier under retain_graph may still be held).
bool sole(const at::Tensor& t) {
  return t.use_count() == 1 && t.has_storage() && t.storage().use_count() == 1;
}

// saved.grad[i] scaled by the incoming gradient g (gv when g is a plain scalar). A gradient
// the node no longer keeps (`owned`, no retain_graph) and nothing else holds is scaled in
// place, or returned as is when g = 1 (loss.backward(): the AccumulateGrad of a leaf with no
// .grad then adopts it without a copy).
at::Tensor scaled(Saved& s, int i, const at::Tensor& g, bool plain, double gv, bool owned) {
  at::Tensor saved = std::move(s.grad[i]);
  bool mine = owned && sole(saved);
  at::ScalarType out_dtype = s.narrow.value_or(saved.scalar_type());
  at::Tensor d;
  if (plain && is_plain_cpu(saved) && saved.is_contiguous()) {
    d = gv == 1.0 && mine && out_dtype == saved.scalar_type() ? std::move(saved)
                                                               : scale_plain(std::move(saved), gv, mine, out_dtype);
  } else {  // (float32 when widened: one rounding, in the cast)
    d = mine && !s.constant[i] ? saved.mul_(g) : g * saved;
    if (d.scalar_type() != out_dtype) d = d.to(out_dtype);
  }
  // A constant gradient reaches autograd as a stride-0 view: AccumulateGrad copies it into a
  // fresh .grad (or adds it to an existing one), so users still get a writable tensor.
  if (!s.constant[i] || d.dim() != 0) return d;
  // Untraced, d is a scalar nothing else holds: the view needs no autograd view tracking.
  c10::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (plain) below.emplace();
  return d.expand_symint(s.shape[i]);
}

// The backward proper (without the double-backward guard): the gradients wrt (real, fake).
variable_list backward_grads(Saved& s, const at::Tensor& g, const bool want[2], bool owned, bool create_graph) {
  variable_list out(2);
  if (!g.defined() || !(want[0] || want[1])) return out;  // an undefined gradient is zero
  at::NoGradGuard no_grad;  // a create_graph backward gets its history from the caller
  if (s.mix) {  // relativistic "none": x and y enter each other's terms via the means
    auto times_g = [&](at::Tensor& t) { return owned && sole(t) ? t.mul_(g) : g * t; };
    at::Tensor tr = times_g(s.grad[0]), tf = times_g(s.grad[1]);
    if (want[0]) out[0] = tr - tf.mean();
    if (want[1]) out[1] = tf - tr.mean();
    return out;
  }
  double gv = 0;
  bool plain = plain_scalar(g, create_graph, gv);
  for (int i = 0; i < 2; ++i)
    if (want[i]) out[i] = scaled(s, i, g, plain, gv, owned);
  return out;
}

// The backward as a pure function of packed arguments: compiled autograd
// (torch._dynamo.compiled_autograd) records a call to it in its graph.
variable_list backward_functional(const variable_list& grads, const std::vector<c10::IValue>& args) {
  torch::dynamo::autograd::PackedArgs p(args);
  Saved s;
  std::vector<bool> want = p.unpack<std::vector<bool>>();
  for (int i = 0; i < 2; ++i) {
    s.grad[i] = p.unpack<c10::optional<at::Tensor>>().value_or(at::Tensor());
    s.shape[i] = p.unpack<std::vector<c10::SymInt>>();
    s.constant[i] = p.unpack<bool>();
  }
  s.narrow = p.unpack<c10::optional<at::ScalarType>>();
  s.mix = p.unpack<bool>();
  const bool w[2] = {want[0], want[1]};
  return backward_grads(s, grads[0], w, /*owned=*/false, /*create_graph=*/false);
}

// The backward of gan_loss_<family>: the saved gradients (from the fused forward) scaled by
// the incoming gradient. A raw autograd node: its state is plain fields, and the forward
// builds it only when a gradient is wanted (a few microseconds less per call than a
// torch::autograd::Function, which matters at GAN batch sizes).
struct GanLossBackward final : torch::autograd::Node {
  Saved saved;
  bool released = false;

  std::string name() const override { return "GanLossBackward"; }
  void release_variables() override {
    saved.grad[0].reset();
    saved.grad[1].reset();
    released = true;
  }

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!released, "Trying to backward through the graph a second time (or directly access saved "
                "tensors after they have already been freed); specify retain_graph=True the first time.");
    // Without retain_graph the saved gradients are ours to scale in place and hand out.
    bool keep = torch::autograd::get_current_graph_task_keep_graph();
    Saved s;
    if (keep) s = saved;
    else s = std::move(saved);
    released = !keep;
    const bool want[2] = {task_should_compute_output(0), task_should_compute_output(1)};
    bool create_graph = at::GradMode::is_enabled();
    variable_list out = backward_grads(s, grads[0], want, !keep, create_graph);
    if (create_graph) refuse_double_backward(grads[0], out);
    return out;
  }

  // Compiled autograd: the state to specialise on (tensors and sizes become graph inputs),
  // and the backward recorded as one call of backward_functional.
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs& args) const override {
    for (int i = 0; i < 2; ++i) {
      args.collect(saved.grad[i]);
      args.collect(saved.shape[i]);
      args.collect(saved.constant[i]);
    }
    args.collect(saved.narrow);
    args.collect(saved.mix);
  }
  variable_list apply_with_saved(const variable_list& grads,
                                 torch::dynamo::autograd::SwapSavedVariables& swap) override {
    namespace ca = torch::dynamo::autograd;
    for (int i = 0; i < 2; ++i) {
      swap.before(saved.grad[i]);
      swap.before(saved.shape[i]);
    }
    ca::PackedArgs p;
    p.pack(std::vector<bool>{task_should_compute_output(0), task_should_compute_output(1)});
    std::vector<at::TypePtr> schema{ca::IValuePacker<std::vector<bool>>::packed_type()};
    for (int i = 0; i < 2; ++i) {
      p.pack(saved.grad[i].defined() ? c10::optional<at::Tensor>(saved.grad[i]) : c10::nullopt);
      p.pack(saved.shape[i]);
      p.pack(saved.constant[i]);
      schema.push_back(ca::IValuePacker<c10::optional<at::Tensor>>::packed_type());
      schema.push_back(ca::IValuePacker<std::vector<c10::SymInt>>::packed_type());
      schema.push_back(ca::IValuePacker<bool>::packed_type());
    }
    p.pack(saved.narrow);
    p.pack(saved.mix);
    schema.push_back(ca::IValuePacker<c10::optional<at::ScalarType>>::packed_type());
    schema.push_back(ca::IValuePacker<bool>::packed_type());
    const auto& py = ca::getPyCompilerInterface();
    // Bound once per process (compiled autograd keeps its functions in one namespace).
    static const std::string fn =
        py->bind_function(swap.get_py_compiler(), "genkern_GanLossBackward", backward_functional, schema);
    auto metadata = ca::IValuePacker<std::vector<c10::optional<torch::autograd::InputMetadata>>>::pack(
        ca::get_input_metadata(next_edges()));
    variable_list out = py->call_function(swap.get_py_compiler(), "apply_functional", fn, grads, p.vec(), metadata);
    for (int i = 0; i < 2; ++i) {
      swap.after(saved.grad[i]);
      swap.after(saved.shape[i]);
    }
    return out;
  }

 private:
  // The backward only scales saved gradients, so it is right to first order only. Under
  // create_graph its outputs hang off an error node whose edges lead to the logits (and the
  // incoming gradient): differentiating them again raises instead of silently dropping the
  // loss's second derivative (a path around the logits' history would otherwise be pruned).
  void refuse_double_backward(const at::Tensor& g, variable_list& out) const {
    torch::autograd::edge_list edges = next_edges();
    edges.push_back(torch::autograd::impl::gradient_edge(g));
    bool any = false;
    for (const auto& e : edges) any = any || e.is_valid();
    if (!any) return;
    auto err = c10::make_intrusive<torch::autograd::Error>(
        "genkern gan_loss (impl cpp/triton): double backward is not supported (the backward only scales the "
        "gradient saved by the fused forward); use impl=\"torch\" for higher-order gradients",
        std::move(edges));
    for (auto& t : out)
      if (t.defined()) torch::autograd::set_history(t, err);
  }
};

template <class Family>
at::Tensor gan_loss_autograd(const c10::optional<at::Tensor>& real, const at::Tensor& fake, int64_t kind,
                             int64_t reduction, double real_label, bool generator) {
  bool has_real = real.has_value();
  bool grad = at::GradMode::is_enabled() && (fake.requires_grad() || (has_real && real->requires_grad()));
  // widen: float16/bfloat16 "mean" logits go to the kernel as float32, so the saved gradients
  // d/N (below float16's normal range for N >~ 2^14) keep their bits until the backward has
  // applied the upstream gradient (AMP's loss scale) and rounds once, as torch does.
  auto st = fake.scalar_type();
  bool widen = grad && reduction == kMean && (st == at::kHalf || st == at::kBFloat16);
  at::Tensor loss, gr, gf;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (widen) {
      c10::optional<at::Tensor> r = has_real ? c10::optional<at::Tensor>(real->to(at::kFloat)) : c10::nullopt;
      std::tie(loss, gr, gf) = fwd_op<Family>().call(r, fake.to(at::kFloat), kind, reduction, real_label, generator);
      loss = loss.to(st);
    } else if (std::is_same_v<Family, CppFamily> && is_plain_cpu(fake) && (!has_real || is_plain_cpu(*real)) &&
               untraced()) {
      // What the dispatcher would run, less its per-call cost.
      std::tie(loss, gr, gf) = gan_loss_fwd(real, fake, kind, reduction, real_label, generator);
    } else {
      std::tie(loss, gr, gf) = fwd_op<Family>().call(real, fake, kind, reduction, real_label, generator);
    }
  }
  if (!grad) return loss;
  auto node = c10::make_intrusive<GanLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(has_real ? *real : at::Tensor(), fake));
  Saved& sv = node->saved;
  sv.constant[0] = has_real && const_grad_real(kind, generator);
  sv.constant[1] = const_grad_fake(kind, generator);
  if (sv.constant[0]) sv.shape[0] = real->sym_sizes().vec();
  if (sv.constant[1]) sv.shape[1] = fake.sym_sizes().vec();
  sv.grad[0] = std::move(gr);
  sv.grad[1] = std::move(gf);
  if (widen) sv.narrow = st;
  sv.mix = kind == kRelativistic && reduction == kNone;
  torch::autograd::set_history(loss, node);
  return loss;
}

// Below autograd (inference mode, no grad, fake tensors, compiled graphs): the loss alone.
template <class Family>
at::Tensor gan_loss_plain(const c10::optional<at::Tensor>& real, const at::Tensor& fake, int64_t kind,
                          int64_t reduction, double real_label, bool generator) {
  return std::get<0>(fwd_op<Family>().call(real, fake, kind, reduction, real_label, generator));
}

}  // namespace


TORCH_LIBRARY_IMPL(genkern, Autograd, m) {
  m.impl("gan_loss_cpp", &gan_loss_autograd<CppFamily>);
  m.impl("gan_loss_triton", &gan_loss_autograd<TritonFamily>);
}

TORCH_LIBRARY_IMPL(genkern, CompositeExplicitAutograd, m) {
  m.impl("gan_loss_cpp", &gan_loss_plain<CppFamily>);
  m.impl("gan_loss_triton", &gan_loss_plain<TritonFamily>);
}

}  // namespace genkern
