"""Every genkern op schema, declared once, in Python.

The schemas live here rather than in the C++ extension so that the Triton kernels
(and the fake kernels torch.compile traces) do not depend on genkern._C: where the
extension does not build or load, the ops still exist and the Triton impl still runs.
genkern._C only registers kernels (TORCH_LIBRARY_IMPL) against these names.

Each hot path has one op per kernel family and direction,

    <stem>_cpp_fwd / <stem>_cpp_bwd        C++ kernels, CPU tensors
    <stem>_triton_fwd / <stem>_triton_bwd  Triton kernels, CUDA tensors (and CPU
                                           tensors under TRITON_INTERPRET=1)

so that an explicitly requested impl is exactly what runs. Autograd is registered
on <stem>_<family>_fwd (genkern/ops/_common.py). kv_decode has no backward: its
op is kv_decode_<family>.
"""

from __future__ import annotations

import torch

FAMILIES = ("cpp", "triton")

# reparam_kl: z = mu + exp(logvar / 2) * eps and
# kl = sum_D KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))).
# Exactly one of `eps` and `seed` is given; with `seed` (int64 scalar tensor) the noise is
# drawn inside the kernel (genkern/reference/reparam_kl.py gives the counter-based scheme).
# `prior_mu`/`prior_logvar` are both given (already broadcast to mu's shape) or both None
# (standard normal prior). The backward returns (grad_mu, grad_logvar, grad_prior_mu,
# grad_prior_logvar); the last two are empty (shape (0,)) when there is no prior.
_REPARAM_KL_FWD = (
    "(Tensor mu, Tensor logvar, Tensor? eps, Tensor? prior_mu, Tensor? prior_logvar, Tensor? seed) -> (Tensor, Tensor)"
)
_REPARAM_KL_BWD = (
    "(Tensor grad_z, Tensor grad_kl, Tensor mu, Tensor logvar, Tensor? eps, Tensor? prior_mu, "
    "Tensor? prior_logvar, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)"
)

# gan_loss: the discriminator (generator=False) or generator loss of one kind, with kind =
# 0 nonsaturating, 1 minimax, 2 hinge, 3 wasserstein, 4 least_squares, 5 relativistic and
# reduction = 0 mean, 1 sum, 2 none (genkern/reference/gan_loss.py). `real_logits` is None
# only for a non-relativistic generator loss. Returns (loss, grad_real, grad_fake): the loss
# and its gradient with respect to each logits tensor, all in one pass (grad_real empty (0,)
# without real logits; a 0-d gradient is that value at every element). The backward only
# scales those gradients by the incoming one, so there is no _bwd kernel.
_GAN_LOSS_FWD = (
    "(Tensor? real_logits, Tensor fake_logits, int kind, int reduction, float real_label, "
    "bool generator) -> (Tensor, Tensor, Tensor)"
)

# attention: softmax(scale * q k^T [+ causal mask]) v, flash-attention style (no score matrix
# in memory). q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0 (query head h reads KV head
# h / (H / Hkv)); any strides with a unit last dim. causal aligns the mask to the bottom-right
# corner: query i sees keys j <= i + S - T; a query that sees no key gets out = 0, lse = -inf.
# _fwd returns (out (B, H, T, D) contiguous in q's dtype, lse (B, H, T) float32: the
# log-sum-exp of each row's scaled, masked scores). _bwd returns (dq, dk, dv), shaped and
# typed like q, k, v. grad_lse, when given ((B, H, T) float32), is the gradient flowing into
# lse: it adds P_ij * grad_lse_i to the score gradient, i.e. delta_i = rowsum(dO_i * O_i) -
# grad_lse_i.
#
# Which keys a query sees. Query i of batch b sees key j when all of these hold (diag = i + S - T):
#   causal:            j <= diag
#   window_left >= 0:  j >= diag - window_left          (-1: no limit on that side)
#   window_right >= 0: j <= diag + window_right         (ignored under causal, as FlashAttention does)
#   key_lo, key_hi:    key_lo[b, i] <= j < key_hi[b, i] (int32 (B, T) on q's device, both or neither:
#                      each row's span of keys, the padding pattern of a mask; all heads alike)
# so every row sees one contiguous span of keys, possibly empty (out = 0, lse = -inf). Key blocks
# wholly outside a query block's spans are never computed: cost follows the visible keys.
_VISIBILITY = "int window_left=-1, int window_right=-1, Tensor? key_lo=None, Tensor? key_hi=None"
_ATTENTION_FWD = f"(Tensor q, Tensor k, Tensor v, bool causal, float scale, {_VISIBILITY}) -> (Tensor, Tensor)"
_ATTENTION_BWD = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
    f"bool causal, float scale, {_VISIBILITY}) -> (Tensor, Tensor, Tensor)"
)

# attention_varlen: packed sequences (genkern/reference/attention_varlen.py is the spec). q (total_q, H, D),
# k, v (total_k, Hkv, D), any strides with a unit last dim; cu_seqlens_q, cu_seqlens_k int32 (B + 1,) on q's
# device, already checked (genkern/ops/varlen_checks.py: from 0, non-decreasing, ending at total_q / total_k);
# max_seqlen_q/_k bound the lengths. Sequence b is an attention problem of its own, T_b = cu_seqlens_q[b + 1] -
# cu_seqlens_q[b] queries against S_b keys, with causal and the window as above (diag = i + S_b - T_b, i and j
# counted from the sequence's first row). _fwd returns (out (total_q, H, D) contiguous in q's dtype, lse
# (H, total_q) float32); _bwd returns (dq, dk, dv) shaped and typed like q, k, v; grad_lse as for attention.
_ATTENTION_VARLEN_FWD = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
    "int max_seqlen_k, bool causal, float scale, int window_left, int window_right) -> (Tensor, Tensor)"
)
_ATTENTION_VARLEN_BWD = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? grad_lse, "
    "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
    "int window_left, int window_right) -> (Tensor, Tensor, Tensor)"
)

# kv_decode: attention of q (B, H, Tnew, D) against preallocated caches k_cache, v_cache
# (B, Hkv, Smax, D), H % Hkv == 0, with cache_seqlens (B,) int32 the filled length L_b of each
# row (genkern/reference/kv_decode.py is the spec). k_new, v_new (B, Hkv, Tnew, D), when given,
# are first written into the caches in place at positions L_b .. L_b + Tnew - 1 (the kernel
# checks L_b + Tnew <= Smax for every row before writing anything); the row then holds
# n_b = L_b + Tnew positions, else n_b = L_b. Query i of row b attends to positions j < n_b with
# j <= i + n_b - Tnew; a row with n_b = 0 gives zeros. Returns out (B, H, Tnew, D) contiguous in
# q's dtype. No backward. cache_seqlens is not modified. window_left >= 0 also hides the positions
# j < i + n_b - Tnew - window_left (FlashAttention's sliding window with S = n_b; -1: no limit), and
# key_lo, (B,) int32 when given, hides the positions j < key_lo[b] of row b (a left-padded row's padding).
_KV_DECODE = (
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, "
    "Tensor? v_new, float scale, int window_left=-1, Tensor? key_lo=None) -> Tensor"
)

# (stem, direction) -> schema; the op names are <stem>_<family>_<direction>.
SCHEMAS = {
    ("reparam_kl", "fwd"): _REPARAM_KL_FWD,
    ("reparam_kl", "bwd"): _REPARAM_KL_BWD,
    ("gan_loss", "fwd"): _GAN_LOSS_FWD,
    ("attention", "fwd"): _ATTENTION_FWD,
    ("attention", "bwd"): _ATTENTION_BWD,
    ("attention_varlen", "fwd"): _ATTENTION_VARLEN_FWD,
    ("attention_varlen", "bwd"): _ATTENTION_VARLEN_BWD,
    ("kv_decode", ""): _KV_DECODE,
}


def op_name(stem: str, family: str, direction: str) -> str:
    """The op's name in the genkern namespace: e.g. attention_cpp_fwd, kv_decode_triton."""
    return f"{stem}_{family}_{direction}" if direction else f"{stem}_{family}"


_LIB = None  # the torch.library.Library that owns the schemas (kept alive: dropping it unregisters them)


def define() -> None:
    """Declares every schema once per process (idempotent)."""
    global _LIB
    if _LIB is not None:
        return
    lib = torch.library.Library("genkern", "DEF")
    for (stem, direction), schema in SCHEMAS.items():
        for family in FAMILIES:
            lib.define(op_name(stem, family, direction) + schema)
    _LIB = lib
