// Every genkern op schema, declared once. Kernels register per device in
// their own files (csrc/<stem>.cpp for the CPU, genkern/triton/<stem>.py for
// CUDA); autograd and fake (meta) kernels are registered from Python in
// genkern/ops/<stem>.py.
//
// Each hot path has one op pair per kernel family:
//   <stem>_cpp_fwd / <stem>_cpp_bwd        C++ kernels, CPU tensors
//   <stem>_triton_fwd / <stem>_triton_bwd  Triton kernels, CUDA tensors (and CPU
//                                          tensors under TRITON_INTERPRET=1)
// so that an explicitly requested impl is exactly what runs.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "common.h"

// reparam_kl: z = mu + exp(logvar / 2) * eps and
// kl = sum_D KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))).
// Exactly one of `eps` and `seed` is given; with `seed` (int64 scalar tensor)
// the noise is drawn inside the kernel (see genkern/reference/reparam_kl.py
// for the counter-based scheme). `prior_mu`/`prior_logvar` are both given
// (already broadcast to mu's shape) or both None (standard normal prior).
// The backward returns (grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar);
// the last two are empty (shape (0,)) when there is no prior.
#define GENKERN_REPARAM_KL_FWD_ARGS \
  "(Tensor mu, Tensor logvar, Tensor? eps, Tensor? prior_mu, Tensor? prior_logvar, Tensor? seed) -> (Tensor, Tensor)"
#define GENKERN_REPARAM_KL_BWD_ARGS                                                                       \
  "(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? eps, Tensor? prior_mu, Tensor? prior_logvar, " \
  "Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)"

// gan_loss: discriminator (generator=false) or generator loss of one kind, with
// kind = 0 nonsaturating, 1 minimax, 2 hinge, 3 wasserstein, 4 least_squares,
// 5 relativistic and reduction = 0 mean, 1 sum, 2 none (genkern/reference/gan_loss.py).
// `real_logits` is None only for a non-relativistic generator loss.
// <family>_fwd returns (loss, grad_real, grad_fake): the loss and its gradient
// with respect to each logits tensor (grad_real empty (0,) without real logits),
// all in one pass. <family> is the differentiable op: its autograd kernel (C++)
// keeps those gradients and its backward only scales them by the incoming one.
#define GENKERN_GAN_LOSS_ARGS \
  "(Tensor? real_logits, Tensor fake_logits, int kind, int reduction, float real_label, bool generator)"

// attention: softmax(scale * q k^T [+ causal mask]) v, flash-attention style (no
// score matrix in memory). q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0
// (query head h reads KV head h / (H / Hkv)); any strides with a unit last dim.
// causal aligns the mask to the bottom-right corner: query i sees keys
// j <= i + S - T; a query that sees no key gets out = 0 and lse = -inf.
// _fwd returns (out (B, H, T, D) contiguous in q's dtype, lse (B, H, T) float32:
// the log-sum-exp of each row's scaled, masked scores).
// _bwd returns (dq, dk, dv), shaped and typed like q, k, v. grad_lse, when given
// ((B, H, T) float32), is the gradient flowing into lse: it adds P_ij * grad_lse_i
// to the score gradient, i.e. delta_i = rowsum(dO_i * O_i) - grad_lse_i.
// Autograd and fake kernels are registered in genkern/ops/attention.py.
#define GENKERN_ATTENTION_FWD_ARGS "(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor, Tensor)"
#define GENKERN_ATTENTION_BWD_ARGS                                                                  \
  "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, bool causal, " \
  "float scale) -> (Tensor, Tensor, Tensor)"

// kv_decode: attention of q (B, H, Tnew, D) against preallocated caches k_cache,
// v_cache (B, Hkv, Smax, D), H % Hkv == 0, with cache_seqlens (B,) int32 the filled
// length L_b of each row (genkern/reference/kv_decode.py is the spec). k_new, v_new
// (B, Hkv, Tnew, D), when given, are first written into the caches in place at
// positions L_b .. L_b + Tnew - 1 (the kernel checks L_b + Tnew <= Smax for every row
// before writing anything); the row then holds n_b = L_b + Tnew positions, else
// n_b = L_b. Query i of row b attends to positions j < n_b with j <= i + n_b - Tnew;
// a row with n_b = 0 gives zeros. Returns out (B, H, Tnew, D) contiguous in q's
// dtype. No backward. cache_seqlens is not modified.
#define GENKERN_KV_DECODE_ARGS                                                                           \
  "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, " \
  "float scale) -> Tensor"

TORCH_LIBRARY(genkern, m) {
  m.def("reparam_kl_cpp_fwd" GENKERN_REPARAM_KL_FWD_ARGS);
  m.def("reparam_kl_cpp_bwd" GENKERN_REPARAM_KL_BWD_ARGS);
  m.def("reparam_kl_triton_fwd" GENKERN_REPARAM_KL_FWD_ARGS);
  m.def("reparam_kl_triton_bwd" GENKERN_REPARAM_KL_BWD_ARGS);
  m.def("reparam_kl_cpp" GENKERN_REPARAM_KL_FWD_ARGS);  // differentiable: csrc/reparam_kl_autograd.cpp
  m.def("reparam_kl_triton" GENKERN_REPARAM_KL_FWD_ARGS);
  m.def("gan_loss_cpp_fwd" GENKERN_GAN_LOSS_ARGS " -> (Tensor, Tensor, Tensor)");
  m.def("gan_loss_cpp" GENKERN_GAN_LOSS_ARGS " -> Tensor");
  m.def("gan_loss_triton_fwd" GENKERN_GAN_LOSS_ARGS " -> (Tensor, Tensor, Tensor)");
  m.def("gan_loss_triton" GENKERN_GAN_LOSS_ARGS " -> Tensor");
  m.def("attention_cpp_fwd" GENKERN_ATTENTION_FWD_ARGS);
  m.def("attention_cpp_bwd" GENKERN_ATTENTION_BWD_ARGS);
  m.def("attention_triton_fwd" GENKERN_ATTENTION_FWD_ARGS);
  m.def("attention_triton_bwd" GENKERN_ATTENTION_BWD_ARGS);
  m.def("kv_decode_cpp" GENKERN_KV_DECODE_ARGS);
  m.def("kv_decode_triton" GENKERN_KV_DECODE_ARGS);
}

namespace genkern {
namespace {

// Eager entry points: the same ops as torch.ops.genkern.*, called through a typed
// dispatcher handle. This skips torch.ops' per-call parsing of the arguments against
// the schema (a few microseconds, which matter at the sizes GANs and VAEs train with).
// torch.compile traces the torch.ops path instead (genkern/ops/).
using OptTensor = std::optional<at::Tensor>;

at::Tensor gan_loss(const OptTensor& real, const at::Tensor& fake, int64_t kind, int64_t reduction, double label,
                    bool generator, bool triton) {
  using Sig = at::Tensor(const OptTensor&, const at::Tensor&, int64_t, int64_t, double, bool);
  static const auto cpp = typed_op<Sig>("genkern::gan_loss_cpp");
  static const auto tri = typed_op<Sig>("genkern::gan_loss_triton");
  return (triton ? tri : cpp).call(real, fake, kind, reduction, label, generator);
}

std::tuple<at::Tensor, at::Tensor> reparam_kl(const at::Tensor& mu, const at::Tensor& logvar, const OptTensor& eps,
                                              const OptTensor& prior_mu, const OptTensor& prior_logvar,
                                              const OptTensor& seed, bool triton) {
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, const OptTensor&);
  static const auto cpp = typed_op<Sig>("genkern::reparam_kl_cpp");
  static const auto tri = typed_op<Sig>("genkern::reparam_kl_triton");
  return (triton ? tri : cpp).call(mu, logvar, eps, prior_mu, prior_logvar, seed);
}

}  // namespace
}  // namespace genkern

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "genkern C++ CPU kernels (ops are reached through torch.ops.genkern)";
  m.def("build_info", &genkern::build_info, "Compiler, vector ISA and OpenMP state of this build");
  m.def("gan_loss", &genkern::gan_loss, "torch.ops.genkern.gan_loss_<cpp|triton> without torch.ops' overhead");
  m.def("reparam_kl", &genkern::reparam_kl, "torch.ops.genkern.reparam_kl_<cpp|triton> without torch.ops' overhead");
}
