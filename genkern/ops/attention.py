"""Flash-attention: softmax(scale * q k^T) v without the score matrix, forward and backward."""

from __future__ import annotations

import math

import torch

from genkern import _dispatch
from genkern.ops._common import FLOAT_DTYPES, KernelOp, check_float_tensor, check_same_device, refuse_double_backward
from genkern.ops.varlen_checks import check_window
from genkern.reference import attention as reference

HEAD_DIMS = range(16, 257, 8)  # head dims the C++ and Triton kernels take
CPP_DTYPES = FLOAT_DTYPES  # bfloat16/float16: block products on AMX where the CPU has it, else in float32


def flash_attention(q, k, v, *, causal=True, window_size=(-1, -1), scale=None, return_lse=False, impl="auto"):
    """Causal (or full) softmax attention in O(T * D) memory, optionally in a sliding window.

    Args:
        q: (B, H, T, D) queries; float16, bfloat16, float32 or float64.
        k: (B, Hkv, S, D) keys, q's dtype and device, with H % Hkv == 0: query head h
            reads KV head h // (H // Hkv) (grouped-query attention; Hkv = 1 is
            multi-query attention). K/V are never copied per query head.
        v: (B, Hkv, S, D) values, like k.
        causal: mask aligned to the bottom-right corner, so queries that follow S - T
            cached keys see the cache and themselves (query i sees keys j <= i + S - T):

                T = 3, S = 5    j = 0 1 2 3 4
                        i = 0       x x x . .
                        i = 1       x x x x .
                        i = 2       x x x x x

            A query that sees no key (T > S) gets zeros, not NaN. False: every query
            sees every key.
        window_size: (left, right), FlashAttention's sliding window: query i sees only
            keys j with i + S - T - left <= j <= i + S - T + right (-1: no limit on that
            side; causal sets right = 0). Key blocks outside every window are skipped, so
            the cost is O(T * window), not O(T * S). A query whose window holds no key
            gets zeros, like T > S under causal.
        scale: multiplies the scores; default 1 / sqrt(D).
        return_lse: also return the log-sum-exp of each row's scaled scores.
        impl: "auto" | "torch" | "cpp" | "triton" (default from GENKERN_IMPL). The C++
            and Triton kernels take head dims 16..256 in steps of 8; Triton takes
            float16, bfloat16 and float32.

    Returns:
        out: (B, H, T, D) in q's dtype, contiguous.
        lse (with return_lse): (B, H, T) float32; -inf for a query that sees no key.
            It is differentiable too.

    Any strides work. Gradients flow to q, k and v (the backward recomputes the
    attention weights from lse, FlashAttention-2 style).
    """
    _check_args(q, k, v)
    left, right = check_window(window_size)
    return _attention(q, k, v, bool(causal), (left, right), check_scale(scale, q.shape[-1]), return_lse, impl, None)


def span_attention(q, k, v, key_lo, key_hi, *, scale=None, return_lse=False, impl="auto"):
    """Attention where query i of batch b sees exactly the keys key_lo[b, i] <= j < key_hi[b, i]
    (int32 (B, T) on q's device, all heads alike): the padding pattern of a mask (e.g. (0, len_b)
    for right padding, combined with causal by the caller's spans), run on the kernels with the key
    blocks outside the spans skipped. Shapes, dtypes, GQA and results as flash_attention; a row
    whose span is empty gets zeros (its lse is -inf)."""
    _check_args(q, k, v)
    b, _, t, _ = q.shape
    for name, x in (("key_lo", key_lo), ("key_hi", key_hi)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or tuple(x.shape) != (b, t):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be an int32 tensor of shape (B, T) = ({b}, {t}), got {got}")
        check_same_device(x, name, q, "q")
    return _attention(q, k, v, False, (-1, -1), check_scale(scale, q.shape[-1]), return_lse, impl, (key_lo, key_hi))


def _attention(q, k, v, causal, window, scale, return_lse, impl, spans):
    backend = head_dim_backend(ATTENTION, impl, q)
    if backend == "torch":
        return reference.attention(q, k, v, causal, scale, return_lse, window_size=window, key_spans=spans)
    lo, hi = spans if spans is not None else (None, None)
    out, lse = ATTENTION(backend, q, k, v, causal, scale, window[0], window[1], lo, hi)
    return (out, lse) if return_lse else out


def _check_args(q, k, v):
    check_float_tensor(q, "q")
    check_float_tensor(k, "k", like=q, like_name="q")
    check_float_tensor(v, "v", like=q, like_name="q")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-d ({'B, H, T, D' if name == 'q' else 'B, Hkv, S, D'}), got shape {tuple(t.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape (B, Hkv, S, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, h, t, d), (bk, hkv, s, dk) = q.shape, k.shape
    if bk != b or dk != d:
        raise ValueError(f"k must be (B={b}, Hkv, S, D={d}) to match q of shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"q's heads H={h} must be a multiple of k's heads Hkv={hkv}")
    if t == 0 or s == 0 or d == 0:
        raise ValueError(f"q and k need T, S, D >= 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")


def check_scale(scale, d):
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def head_dim_backend(op: KernelOp, impl, q) -> str:
    """op.resolve for q; head dims the kernels do not take go to "torch" under "auto"
    (said once) and are an error for an explicit impl."""
    backend = op.resolve(impl, q)
    d = q.shape[-1]
    if backend == "torch" or d in HEAD_DIMS:
        return backend
    why = f"head dim {d} is not one of 16, 24, ..., 256 (multiples of 8)"
    if _dispatch.explicit(impl):
        raise ValueError(f"{op.public}: impl={backend!r} does not take q of shape {tuple(q.shape)}: {why}")
    _dispatch.fall_back(op.public, backend, why)
    return "torch"


# --- the op: fake kernels and autograd ------------------------------------------------


def _fake_fwd(q, k, v, causal, scale, window_left=-1, window_right=-1, key_lo=None, key_hi=None):
    b, h, t, d = q.shape
    return q.new_empty((b, h, t, d)), q.new_empty((b, h, t), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, grad_lse, causal, scale, *visibility):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, *visibility = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.visibility = causal, scale, visibility


def _backward(ctx, grad_out, grad_lse):
    refuse_double_backward("flash_attention")
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:  # only lse was differentiated
        grad_out = torch.zeros_like(out)
    bwd = ATTENTION.op(ctx.family, "bwd")
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, grad_lse, ctx.causal, ctx.scale, *ctx.visibility)
    return (dq, dk, dv) + (None,) * (2 + len(ctx.visibility))


ATTENTION = KernelOp(
    "attention",
    "flash_attention",
    fake=_fake_fwd,
    fake_bwd=_fake_bwd,
    backward=_backward,
    setup_context=_setup_context,
    cpp_dtypes=CPP_DTYPES,
)
ATTENTION.register()
