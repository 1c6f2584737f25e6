"""Triton FlashAttention-2 kernels: softmax(scale q k^T [+ causal mask]) v, no score matrix in memory.

Math: genkern/reference/attention.py (the spec). q (B, H, T, D); k, v (B, Hkv, S, D); query head h
reads KV head h // (H // Hkv) (GQA/MQA without copies). Causal: bottom-right aligned, diag = S - T:

    T = 3, S = 5     keys j = 0 1 2 3 4
    query i = 0           x x x . .     i sees j <= i + diag
    query i = 1           x x x x .
    query i = 2           x x x x x

Scores are kept in log2 units (s2 = log2(e) scale q.k: every exponential is an exp2); lse is stored
in natural units. With P = softmax(S), dP = dO V^T, dS = P * (dP - delta):
    _attention_fwd_kernel       per (query block, head): online softmax over the key blocks
    _attention_bwd_pre_kernel   delta_i = rowsum(dO_i * O_i) - grad_lse_i
    _attention_bwd_dkdv_kernel  per (key block, KV head): dV = P^T dO, dK = scale dS^T Q, summed
                                over the query heads of the group in registers (no atomics)
    _attention_bwd_dq_kernel    per (query block, head): dQ = scale dS K
Each loop runs first the blocks every row of the tile sees in full, unmasked, then the few on the
causal diagonal or the ragged edge, masked; causal loops skip the blocks no row sees. A row that
sees no key (causal, T > S) gets out = 0 and lse = -inf; the backward reads lse2 = +inf there, so
P = exp2(s2 - lse2) = 0 (never exp2(+inf) * 0 = NaN).

The forward kernel lives in attention_fwd.py, the backward ones in attention_bwd.py, the tile
helpers and autotune candidates they share in attention_tiles.py; here: the launchers.
"""

from __future__ import annotations

import torch
import triton

from genkern.triton._common import BLOCK_DS, LOG2E, check_dtype, rows8
from genkern.triton.attention_bwd import _attention_bwd_dkdv_kernel, _attention_bwd_dq_kernel, _attention_bwd_pre_kernel
from genkern.triton.attention_fwd import _attention_fwd_kernel
from genkern.triton.attention_tiles import CONFIGS, configs_for, tile_block

PRE_ROWS = {d: max(16, 4096 // d) for d in BLOCK_DS}  # rows per program of the delta kernel
_MAX_LEN = 65535 * 16  # T, S: grid axis 1 holds cdiv(len, BLOCK) <= 65535 programs
_MAX_ROW_STRIDE = 2**31 // 256  # tile offsets (row * stride) are int32


# --- launchers: check, allocate, launch -----------------------------------------------------


def _check(q, k, v, *others):
    """Checks the op's contract; returns (B, H, T, D, Hkv, S). others: (name, tensor, shape, dtype)."""
    check_dtype("q", q, "attention")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"q must be (B, H, T, D) and k, v (B, Hkv, S, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    (B, H, T, D), (_, Hkv, S, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or H % Hkv:
        raise ValueError(f"k, v {tuple(k.shape)} must be (B, Hkv, S, D) with H % Hkv == 0 for q {tuple(q.shape)}")
    if D % 8 or not 16 <= D <= 256 or max(T, S) > _MAX_LEN:
        raise ValueError(f"head dim must be 16..256 in steps of 8 and T, S <= {_MAX_LEN}, got D={D}, T={T}, S={S}")
    for name, t, shape, dtype in (("k", k, k.shape, q.dtype), ("v", v, k.shape, q.dtype)) + others:
        if t is not None and (t.shape != shape or t.dtype != dtype or t.device != q.device):
            raise ValueError(
                f"{name} must be {tuple(shape)} {dtype} on {q.device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
            )
    return B, H, T, D, Hkv, S


def _meta(q, T, S, D, causal, spans=False, varlen=False):
    """What every launch shares: the log2 buckets of T, S (autotune key), the meta-parameters,
    and the tile edge of a config's BLOCK_M / BLOCK_N in q's dtype (for the grid). Under SPANS
    causal is folded into the spans (window_right = 0): CAUSAL is off, one variant fewer."""
    block_d = triton.next_power_of_2(D)
    edge = lambda c, key, keys=False: tile_block(c[key], block_d, q.dtype == torch.float32, keys)  # noqa: E731
    meta = dict(CAUSAL=bool(causal) and not spans, SPANS=bool(spans), VARLEN=bool(varlen), BLOCK_D=block_d)
    return (triton.next_power_of_2(T), triton.next_power_of_2(S)), meta, edge


_UNBOUNDED = {}  # device -> int32 (1,) tensors 0 and 2^30: the key span of every row, read with stride 0


def visibility(q, T, S, causal, window_left, window_right, key_lo=None, key_hi=None, cu_seqlens=None):
    """(SPANS, the kernels' span and packing arguments). A window side of T + S or more hides
    nothing (-1: also keeps the launch's int32 arguments in range); causal sets the right one to 0.
    Plain causal or full attention needs no spans; a pack without them reads cu_seqlens only."""
    if (key_lo is None) != (key_hi is None):
        raise ValueError("key_lo and key_hi must be given together (or both None)")
    left = window_left if 0 <= window_left < T + S else -1
    right = 0 if causal else (window_right if 0 <= window_right < T + S else -1)
    spans = key_lo is not None or left >= 0 or (not causal and right >= 0)
    if key_lo is None:
        if q.device not in _UNBOUNDED:
            _UNBOUNDED[q.device] = tuple(torch.full((1,), x, dtype=torch.int32, device=q.device) for x in (0, 2**30))
        key_lo, key_hi, strides = *_UNBOUNDED[q.device], (0, 0)
    else:
        key_lo, key_hi, strides = key_lo.contiguous(), key_hi.contiguous(), (T, 1)
    cu = cu_seqlens if cu_seqlens is not None else (key_lo, key_lo)
    return spans, (key_lo, key_hi, *strides, left, right, *cu)


def strides8(t):
    """The dim 0-2 strides of a 4-d output in units of 8 elements (size-1 dims: 0)."""
    return [t.stride(i) // 8 if t.shape[i] > 1 else 0 for i in range(3)]


def _check_plain_spans(q, key_lo, key_hi):
    B, _, T, _ = q.shape
    for name, t in (("key_lo", key_lo), ("key_hi", key_hi)):
        if t is not None and (t.shape != (B, T) or t.dtype != torch.int32 or t.device != q.device):
            raise ValueError(
                f"{name} must be ({B}, {T}) int32 on {q.device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
            )


def attention_forward(q, k, v, causal, scale, window_left=-1, window_right=-1, key_lo=None, key_hi=None):
    """(out (B, H, T, D) contiguous in q's dtype, lse (B, H, T) float32); see _attention_fwd_kernel."""
    B, H, T, D, Hkv, S = _check(q, k, v)
    _check_plain_spans(q, key_lo, key_hi)
    if q.numel() == 0 or S == 0:  # no key anywhere: out 0, lse -inf
        return q.new_zeros((B, H, T, D)), torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
    out, lse = q.new_empty((B, H, T, D)), torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    vis = visibility(q, T, S, causal, window_left, window_right, key_lo, key_hi)
    launch_forward(q, k, v, out, lse, (B, H, Hkv, T, S, D), causal, scale, vis, False)
    return out, lse


def launch_forward(q, k, v, out, lse, sizes, causal, scale, vis, varlen):
    """The forward kernel over 4-d q, k, v, out (B or 1, heads, rows, D) and 3-d lse (rows contiguous);
    sizes (B, H, Hkv, T, S, D), T and S the max lengths of a pack (varlen)."""
    B, H, Hkv, T, S, D = sizes
    (q, sq), (k, sk), (v, sv) = (rows8(t, _MAX_ROW_STRIDE) for t in (q, k, v))
    tune, meta, edge = _meta(q, T, S, D, causal, vis[0], varlen)
    sl = [lse.stride(i) if lse.shape[i] > 1 else 0 for i in range(2)]
    _attention_fwd_kernel[lambda c: (B * H, triton.cdiv(T, edge(c, "BLOCK_M")))](
        out,
        lse,
        *strides8(out),
        *sl,
        q,
        k,
        v,
        *sq,
        *sk,
        *sv,
        H,
        H // Hkv,
        T,
        S,
        D // 8,
        scale * LOG2E,
        *tune,
        *vis[1],
        **meta,
    )


def attention_backward(
    grad_out, q, k, v, out, lse, grad_lse, causal, scale, window_left=-1, window_right=-1, key_lo=None, key_hi=None
):
    """(dq, dk, dv), shaped and typed like q, k, v (contiguous); see the backward kernels."""
    B, H, T, D, Hkv, S = _check(
        q,
        k,
        v,
        ("grad_out", grad_out, q.shape, q.dtype),
        ("out", out, q.shape, q.dtype),
        ("lse", lse, q.shape[:3], torch.float32),
        ("grad_lse", grad_lse, q.shape[:3], torch.float32),
    )
    _check_plain_spans(q, key_lo, key_hi)
    new = torch.empty if q.numel() and S else torch.zeros  # the kernels write every element
    dq, dk, dv = (new(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or S == 0:
        return dq, dk, dv
    vis = visibility(q, T, S, causal, window_left, window_right, key_lo, key_hi)
    launch_backward(
        (grad_out, q, k, v, out, lse, grad_lse), (dq, dk, dv), (B, H, Hkv, T, S, D), causal, scale, vis, False
    )
    return dq, dk, dv


def launch_backward(inputs, grads, sizes, causal, scale, vis, varlen):
    """The backward kernels: inputs (grad_out, q, k, v, out, lse, grad_lse) and grads (dq, dk, dv) as
    launch_forward's 4-d views (lse, grad_lse 3-d, rows contiguous); sizes as there."""
    (grad_out, q, k, v, out, lse, grad_lse), (dq, dk, dv) = inputs, grads
    B, H, Hkv, T, S, D = sizes
    (q, sq), (k, sk), (v, sv), (out, so), (do, sd) = (rows8(t, _MAX_ROW_STRIDE) for t in (q, k, v, out, grad_out))
    delta, lse2 = (torch.empty(lse.shape, dtype=torch.float32, device=q.device) for _ in range(2))
    tune, meta, edge = _meta(q, T, S, D, causal, vis[0], varlen)
    rows, (nb, nh, nt) = PRE_ROWS[meta["BLOCK_D"]], lse.shape  # every row of lse, packed or not
    glse = lse if grad_lse is None else grad_lse.contiguous()
    _attention_bwd_pre_kernel[(nb * nh, triton.cdiv(nt, rows))](
        delta,
        lse2,
        out,
        do,
        lse.contiguous(),
        glse,
        *so,
        *sd,
        nh,
        nt,
        D // 8,
        HAS_GRAD_LSE=grad_lse is not None,
        BLOCK_M=rows,
        BLOCK_D=meta["BLOCK_D"],
        num_warps=4,
    )
    sl = [delta.stride(i) if delta.shape[i] > 1 else 0 for i in range(2)]
    args = (q, k, v, do, lse2, delta, *sq, *sk, *sv, *sd, *sl, H, H // Hkv, T, S, D // 8, scale * LOG2E, scale)
    args += (*tune, *vis[1])
    _attention_bwd_dkdv_kernel[lambda c: (B * Hkv, triton.cdiv(S, edge(c, "BLOCK_N", True)))](
        dk, dv, *strides8(dk), *args, **meta
    )
    _attention_bwd_dq_kernel[lambda c: (B * H, triton.cdiv(T, edge(c, "BLOCK_M")))](dq, *strides8(dq), *args, **meta)


def aot_cases():
    """For genkern.triton._aot: every kernel x autotune config x BLOCK_D, causal (the masked
    diagonal path included), packed with spans (every new path at once) and non-causal, packed
    causal and dense spans at BLOCK_D 128's first config; the delta kernel at every BLOCK_D with
    and without grad_lse."""
    types = {n: "*fp32" for n in ("lse_ptr", "glse_ptr", "lse2_ptr", "delta_ptr")}
    types.update({n: "*i32" for n in ("klo_ptr", "khi_ptr", "cuq_ptr", "cuk_ptr")}, qk_scale="fp32", scale="fp32")
    variants = [(True, False, False), (False, True, True)]  # (CAUSAL, SPANS, VARLEN)
    for name, per_d in CONFIGS.items():
        for block_d, configs in per_d.items():
            for i, (bm, bn, w, s) in enumerate(configs):
                more = (
                    [(False, False, False), (True, False, True), (False, True, False)]
                    if (block_d, i) == (128, 0)
                    else []
                )
                spans_ok = (bm, bn, w, s) in configs_for(name, block_d, True)
                for causal, spans, varlen in variants + more:
                    if spans and not spans_ok:  # the span variant never runs this config
                        continue
                    flags = dict(CAUSAL=causal, SPANS=spans, VARLEN=varlen)
                    yield dict(
                        kernel=globals()[name].fn,
                        num_warps=w,
                        num_stages=s,
                        types=types,
                        constexprs=dict(flags, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, STAGES=s),
                    )
    for block_d, rows in PRE_ROWS.items():
        for has in (True, False):
            yield dict(
                kernel=_attention_bwd_pre_kernel,
                num_warps=4,
                types=types,
                constexprs=dict(HAS_GRAD_LSE=has, BLOCK_M=rows, BLOCK_D=block_d),
            )
