"""Triton packed (variable-length) attention: the dense attention kernels, one sequence per program row.

Math: genkern/reference/attention_varlen.py (the spec). q (total_q, H, D); k, v (total_k, Hkv, D);
sequence b holds the query rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 and the key rows
cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1, and is attention of its own (causal bottom-right aligned
per sequence, the window per sequence, GQA as in genkern/triton/attention.py).

The kernels of genkern/triton/attention.py run with VARLEN on: the packed tensors are seen as
(1, heads, total rows, D), the grid is (B * H, cdiv(max_seqlen_q, BLOCK_M)) (dK/dV: (B * Hkv,
cdiv(max_seqlen_k, BLOCK_N))), and each program reads its sequence's first row and length from
cu_seqlens: its tiles start at the sequence's first row (a block never holds two sequences' rows),
and programs past the sequence's end return at once. So a pack costs what its sequences cost.
The delta kernel of the backward is per row: it runs once over every packed row.
"""

from __future__ import annotations

import torch

from genkern.triton._common import check_dtype
from genkern.triton.attention import launch_backward, launch_forward, visibility


def _packed(t):
    """A (rows, heads, D) tensor as the (1, heads, rows, D) view the kernels read."""
    return t.transpose(0, 1).unsqueeze(0)


def _check(q, k, v, cu_seqlens_q, cu_seqlens_k, *others):
    """The launch's shapes (genkern/ops/varlen_checks.py checked the values first); returns
    (B, H, Hkv, D). others: (name, tensor, shape, dtype)."""
    check_dtype("q", q, "attention_varlen")
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(
            f"q must be (total_q, H, D) and k, v (total_k, Hkv, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    (_, H, D), (_, Hkv, _) = q.shape, k.shape
    if k.shape[2] != D or Hkv == 0 or H % Hkv or D % 8 or not 16 <= D <= 256:
        raise ValueError(f"k, v {tuple(k.shape)} must be (total_k, Hkv, D), H % Hkv == 0, D in 16..256 step 8")
    B = cu_seqlens_q.shape[0] - 1
    cu = (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k))
    for name, t, shape, dtype in (("k", k, k.shape, q.dtype), ("v", v, k.shape, q.dtype)) + others:
        if t is not None and (t.shape != shape or t.dtype != dtype or t.device != q.device):
            raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {q.device}, got {tuple(t.shape)} {t.dtype}")
    for name, t in cu:
        if t.shape != (B + 1,) or t.dtype != torch.int32 or t.device != q.device or B < 1:
            raise ValueError(f"{name} must be ({B + 1},) int32 on {q.device}, got {tuple(t.shape)} {t.dtype}")
    return B, H, Hkv, D


def attention_varlen_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, window_left, window_right
):
    """(out (total_q, H, D) contiguous in q's dtype, lse (H, total_q) float32)."""
    B, H, Hkv, D = _check(q, k, v, cu_seqlens_q, cu_seqlens_k)
    tq, tk = q.shape[0], k.shape[0]
    if tq == 0 or tk == 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0:  # no key anywhere: out 0, lse -inf
        return q.new_zeros(q.shape), torch.full((H, tq), float("-inf"), dtype=torch.float32, device=q.device)
    out, lse = q.new_empty(q.shape), torch.empty((H, tq), dtype=torch.float32, device=q.device)
    cu = (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous())
    vis = visibility(q, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, cu_seqlens=cu)
    sizes = (B, H, Hkv, max_seqlen_q, max_seqlen_k, D)
    launch_forward(_packed(q), _packed(k), _packed(v), _packed(out), lse.unsqueeze(0), sizes, causal, scale, vis, True)
    return out, lse


def attention_varlen_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    grad_lse,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    window_left,
    window_right,
):
    """(dq, dk, dv), shaped and typed like q, k, v (contiguous)."""
    lse_shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else None
    B, H, Hkv, D = _check(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        ("grad_out", grad_out, q.shape, q.dtype),
        ("out", out, q.shape, q.dtype),
        ("lse", lse, lse_shape, torch.float32),
        ("grad_lse", grad_lse, lse_shape, torch.float32),
    )
    tq, tk = q.shape[0], k.shape[0]
    empty = tq == 0 or tk == 0 or max_seqlen_q <= 0 or max_seqlen_k <= 0
    dq, dk, dv = ((torch.zeros if empty else torch.empty)(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if empty:
        return dq, dk, dv
    cu = (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous())
    vis = visibility(q, max_seqlen_q, max_seqlen_k, causal, window_left, window_right, cu_seqlens=cu)
    inputs = tuple(_packed(t) for t in (grad_out, q, k, v, out)) + (lse.unsqueeze(0),)
    inputs += (None if grad_lse is None else grad_lse.unsqueeze(0),)
    grads = tuple(_packed(t) for t in (dq, dk, dv))
    launch_backward(inputs, grads, (B, H, Hkv, max_seqlen_q, max_seqlen_k, D), causal, scale, vis, True)
    return dq, dk, dv
