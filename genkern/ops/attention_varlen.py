"""Packed (variable-length) flash-attention: FlashAttention's varlen API, forward and backward."""

from __future__ import annotations

import torch

from genkern.ops._common import KernelOp, refuse_double_backward
from genkern.ops.attention import CPP_DTYPES, check_scale, head_dim_backend
from genkern.ops.varlen_checks import check_varlen, check_window
from genkern.reference import attention_varlen as reference


def flash_attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    causal=True,
    window_size=(-1, -1),
    scale=None,
    return_lse=False,
    impl="auto",
):
    """Attention over sequences packed one after another, without padding.

    Args:
        q: (total_q, H, D) queries: sequence b's at rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1.
        k, v: (total_k, Hkv, D), H % Hkv == 0 (grouped-query heads, as flash_attention).
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,) on q's device, from 0, non-decreasing, ending
            at total_q / total_k. A sequence may have T_b != S_b, and either may be 0.
        max_seqlen_q, max_seqlen_k: ints >= the longest T_b / S_b (the GPU grid is sized by them).
        causal: per sequence, aligned to its bottom-right corner (query i sees keys
            j <= i + S_b - T_b).
        window_size: (left, right) as in flash_attention, per sequence.
        scale: default 1 / sqrt(D).
        return_lse: also return the (H, total_q) float32 log-sum-exp (-inf for a query that
            sees no key), as FlashAttention's varlen functions return it.
        impl: "auto" | "torch" | "cpp" | "triton".

    Returns:
        out (total_q, H, D) in q's dtype; with return_lse also lse. Gradients flow to q, k, v.

    Each sequence attends only within itself: a batch costs what its sequences cost, not what
    the batch padded to its longest sequence would. The arguments are checked before any kernel
    runs (bad cu_seqlens or max_seqlen raise a ValueError naming them); the check reads
    cu_seqlens on the host (B + 1 integers; one synchronisation on CUDA), except under
    torch.compile, where the kernels trust them.
    """
    if not torch.compiler.is_compiling():
        check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    left, right = check_window(window_size)
    scale = check_scale(scale, q.shape[-1])
    backend = head_dim_backend(ATTENTION_VARLEN, impl, q)
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if backend == "torch":
        return reference.attention_varlen(
            q, k, v, *args, causal=bool(causal), window_size=(left, right), scale=scale, return_lse=return_lse
        )
    out, lse = ATTENTION_VARLEN(backend, q, k, v, *args, bool(causal), scale, left, right)
    return (out, lse) if return_lse else out


# --- the op: fake kernels and autograd ------------------------------------------------


def _fake_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, left, right):
    total_q, h, d = q.shape
    return q.new_empty((total_q, h, d)), q.new_empty((h, total_q), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, grad_lse, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *rest = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.rest = rest  # max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right


def _backward(ctx, grad_out, grad_lse):
    refuse_double_backward("flash_attention_varlen")
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:  # only lse was differentiated
        grad_out = torch.zeros_like(out)
    bwd = ATTENTION_VARLEN.op(ctx.family, "bwd")
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, *ctx.rest)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.rest))


ATTENTION_VARLEN = KernelOp(
    "attention_varlen",
    "flash_attention_varlen",
    fake=_fake_fwd,
    fake_bwd=_fake_bwd,
    backward=_backward,
    setup_context=_setup_context,
    cpp_dtypes=CPP_DTYPES,
)
ATTENTION_VARLEN.register()
