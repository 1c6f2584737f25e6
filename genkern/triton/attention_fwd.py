"""The Triton attention forward kernel: online softmax over the key blocks of one query block.
The layout, the causal alignment and the log2 units: genkern/triton/attention.py (launcher there).
"""

from __future__ import annotations

import triton
import triton.language as tl

from genkern.triton._common import DOT_PRECISION, WHILE_LOOPS
from genkern.triton.attention_tiles import (
    attention_autotune,
    key_range,
    load_rows,
    row_spans,
    seq_bounds,
    span_blocks,
    tile_block,
    tile_ptr,
    visible,
)


@triton.jit
def _fwd_step(
    acc,
    m_i,
    l_i,
    start,
    q,
    k_ptr,
    v_ptr,
    st_k,
    st_v,
    rows,
    offs_n,
    offs_d,
    d_ok,
    S,
    diag,
    lo,
    hi,
    qk_scale,
    CAUSAL: tl.constexpr,
    SPANS: tl.constexpr,
    MASK: tl.constexpr,
):
    """One key block of the online softmax: s2 = qk_scale q k^T, m' = max(m, rowmax s2),
    l' = l 2^(m - m') + rowsum 2^(s2 - m'), acc' = acc 2^(m - m') + 2^(s2 - m') v."""
    k = load_rows(k_ptr, start, S, st_k, offs_n, offs_d, d_ok, MASK)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASK:
        s = tl.where(visible(rows, start + offs_n, S, diag, lo, hi, CAUSAL, SPANS), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = load_rows(v_ptr, start, S, st_v, offs_n, offs_d, d_ok, MASK)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _fwd_blocks(
    acc,
    m_i,
    l_i,
    lo,
    hi,
    args,
    CAUSAL: tl.constexpr,
    SPANS: tl.constexpr,
    MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """_fwd_step over the key blocks starting in [lo, hi), software-pipelined STAGES deep."""
    if WHILE_LOOPS:
        start = lo
        while start < hi:
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, start, *args, CAUSAL, SPANS, MASK)
            start += BLOCK_N
    else:
        for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, start, *args, CAUSAL, SPANS, MASK)
    return acc, m_i, l_i


@triton.jit
def _attention_fwd_kernel(
    # outputs: out (B, H, T, D) in q's dtype, strides of dims 0-2 so_* in units of 8 elements;
    # lse (B, H, T) float32, strides sl_b, sl_h (rows contiguous)
    out_ptr,
    lse_ptr,
    so_b,
    so_h,
    so_t,
    sl_b,
    sl_h,
    # inputs q (B, H, T, D), k and v (B, Hkv, S, D); strides of dims 0-2 in units of 8 elements
    q_ptr,
    k_ptr,
    v_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    # sizes: group = H // Hkv, D8 = D // 8; qk_scale = scale log2(e); tune_*: autotune key only
    H,
    group,
    T,
    S,
    D8,
    qk_scale,
    tune_t,
    tune_s,
    # SPANS: key_lo/key_hi (B, T) int32 (strides skl_*, 0: unbounded) and the window wl, wr (row_spans);
    # VARLEN: cu_seqlens (B + 1,) int32, T and S the max lengths, dims 0 of q, k, v, out, lse stride 0
    klo_ptr,
    khi_ptr,
    skl_b,
    skl_t,
    wl,
    wr,
    cuq_ptr,
    cuk_ptr,
    CAUSAL: tl.constexpr,
    SPANS: tl.constexpr,
    VARLEN: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out_i = sum_j softmax_j(s_ij) v_j and lse_i = log sum_j exp(s_ij) over the keys j that
    query i sees, s_ij = scale q_i . k_j. Running m, l, acc in float32 (see _fwd_step); then
    out = acc / l, lse = (m + log2 l) ln 2; rows with l = 0 (no key) get out = 0, lse = -inf.
    m starts finite (-1e30): a row masked so far keeps alpha = 1, p = 0 (no -inf - -inf).
    SPANS: the key blocks of [first, last) only, those every row sees in full unmasked."""
    # float32 runs smaller tiles than the config's (see tile_block); the launcher's grid agrees
    BM: tl.constexpr = tile_block(BLOCK_M, BLOCK_D, q_ptr.dtype.element_ty == tl.float32)
    BN: tl.constexpr = tile_block(BLOCK_N, BLOCK_D, q_ptr.dtype.element_ty == tl.float32)
    bh = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BM  # causal: the longest rows start first
    b, h = bh // H, bh % H
    T, S, bos_q, bos_k = seq_bounds(cuq_ptr, cuk_ptr, b, T, S, VARLEN)
    if VARLEN:
        if m0 >= T:  # past this sequence's end
            return
    offs_m, offs_n, offs_d = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    q = load_rows(tile_ptr(q_ptr, b, h, bos_q + m0, sq_b, sq_h, sq_t), 0, T - m0, sq_t, offs_m, offs_d, d_ok, True)
    k_ptr = tile_ptr(k_ptr, b, h // group, bos_k, sk_b, sk_h, sk_t)
    v_ptr = tile_ptr(v_ptr, b, h // group, bos_k, sv_b, sv_h, sv_t)
    acc = tl.zeros((BM, BLOCK_D), tl.float32)
    m_i = tl.full((BM,), -1.0e30, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    rows, diag = m0 + offs_m, S - T
    if SPANS:
        lo, hi = row_spans(rows, T, S, b, (klo_ptr, khi_ptr, skl_b, skl_t, wl, wr))
        first, mid, mid2, last = span_blocks(lo, hi, rows < T, S, BN)
    else:
        lo, hi, first, mid = rows, rows, 0, 0
        mid2, last = key_range(m0, T, S, CAUSAL, BM, BN)
    args = (q, k_ptr, v_ptr, sk_t, sv_t, rows, offs_n, offs_d, d_ok, S, diag, lo, hi, qk_scale)
    if SPANS:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, first, mid, args, CAUSAL, SPANS, True, BN, STAGES)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, mid, mid2, args, CAUSAL, SPANS, False, BN, STAGES)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, mid2, last, args, CAUSAL, SPANS, True, BN, STAGES)
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) * 0.6931471805599453)
    ok = rows < T
    row0 = b.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + bos_q + m0
    tl.store(lse_ptr + row0 + offs_m, lse, mask=ok)
    o_ptrs = tile_ptr(out_ptr, b, h, bos_q + m0, so_b, so_h, so_t) + offs_m[:, None] * (so_t * 8) + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


_attention_fwd_kernel = attention_autotune("_attention_fwd_kernel")(_attention_fwd_kernel)
