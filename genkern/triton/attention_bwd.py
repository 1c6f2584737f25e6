"""The Triton attention backward kernels: delta, then dK/dV per key block and dQ per query block.
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
    query_range,
    row_spans,
    seq_bounds,
    span_blocks,
    tile_block,
    tile_ptr,
    visible,
)

SPAN_CHUNK = tl.constexpr(256)  # query rows per round of the dK/dV kernel's pass over the rows' spans


@triton.jit
def _attention_bwd_pre_kernel(
    # outputs (B, H, T) float32 contiguous: delta, and lse2 = lse log2(e) (+inf where lse = -inf)
    delta_ptr,
    lse2_ptr,
    # out and grad_out (B, H, T, D) (strides of dims 0-2 in units of 8 elements); lse, grad_lse
    # (B, H, T) float32 contiguous (grad_lse read only if HAS_GRAD_LSE)
    out_ptr,
    do_ptr,
    lse_ptr,
    glse_ptr,
    so_b,
    so_h,
    so_t,
    sd_b,
    sd_h,
    sd_t,
    H,
    T,
    D8,
    HAS_GRAD_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id - grad_lse_i (float32), and the log2-unit lse the other
    backward kernels subtract: +inf for rows that see no key, so exp2(s2 - lse2) = 0 there."""
    bh, m0 = tl.program_id(0), tl.program_id(1) * BLOCK_M
    b, h = bh // H, bh % H
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    o = load_rows(tile_ptr(out_ptr, b, h, m0, so_b, so_h, so_t), 0, T - m0, so_t, offs_m, offs_d, d_ok, True)
    do = load_rows(tile_ptr(do_ptr, b, h, m0, sd_b, sd_h, sd_t), 0, T - m0, sd_t, offs_m, offs_d, d_ok, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = bh.to(tl.int64) * T + m0 + offs_m
    ok = m0 + offs_m < T
    if HAS_GRAD_LSE:
        delta -= tl.load(glse_ptr + rows, mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=ok, other=0.0)
    tl.store(delta_ptr + rows, delta, mask=ok)
    tl.store(lse2_ptr + rows, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=ok)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    it,
    n_blk,
    lo,
    group,
    k,
    v,
    q_ptr,
    do_ptr,
    lse2_ptr,
    delta_ptr,
    sq_b,
    sq_h,
    sq_t,
    sd_b,
    sd_h,
    sd_t,
    sl_h,
    b,
    hk,
    bos_q,
    T,
    S,
    keys,
    offs_m,
    offs_d,
    d_ok,
    diag,
    qk_scale,
    sp,
    CAUSAL: tl.constexpr,
    SPANS: tl.constexpr,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Query block lo + (it % n_blk) BLOCK_M of head hk group + it // n_blk, transposed (keys x
    queries): P^T = 2^(qk_scale k q^T - lse2), dV += P^T dO, dS^T = P^T * (V dO^T - delta),
    dK += dS^T Q (scale applied by the caller). Rows past T load q = dO = 0 and lse2 = +inf:
    P^T = 0 there without a row mask on the scores. lse2_ptr, delta_ptr: at row 0 of head 0."""
    h = hk * group + it // n_blk
    start = lo + (it % n_blk) * BLOCK_M
    q = load_rows(tile_ptr(q_ptr, b, h, bos_q, sq_b, sq_h, sq_t), start, T, sq_t, offs_m, offs_d, d_ok, True)
    do = load_rows(tile_ptr(do_ptr, b, h, bos_q, sd_b, sd_h, sd_t), start, T, sd_t, offs_m, offs_d, d_ok, True)
    rows = start + offs_m
    row0 = h.to(tl.int64) * sl_h
    lse2 = tl.load(lse2_ptr + row0 + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(delta_ptr + row0 + rows, mask=rows < T, other=0.0)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])
    if MASK:
        if SPANS:
            r_lo, r_hi = row_spans(rows, T, S, b, sp)
            p_t = tl.where((keys[:, None] >= r_lo[None, :]) & (keys[:, None] < r_hi[None, :]), p_t, 0.0)
        else:
            p_t = tl.where(keys[:, None] <= rows[None, :] + diag, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION) - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_blocks(
    dk,
    dv,
    lo,
    hi,
    group,
    args,
    CAUSAL: tl.constexpr,
    SPANS: tl.constexpr,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STAGES: tl.constexpr,
):
    """_dkdv_step over the query blocks starting in [lo, hi) of every head of the group, as one
    flat loop software-pipelined STAGES deep (a loop over heads around it costs registers)."""
    n_blk = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    if WHILE_LOOPS:
        it = n_blk * 0
        while it < n_blk * group:
            dk, dv = _dkdv_step(dk, dv, it, n_blk, lo, group, *args, CAUSAL, SPANS, MASK, BLOCK_M)
            it += 1
    else:
        for it in tl.range(0, n_blk * group, num_stages=STAGES):
            dk, dv = _dkdv_step(dk, dv, it, n_blk, lo, group, *args, CAUSAL, SPANS, MASK, BLOCK_M)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    # outputs (B, Hkv, S, D) in k's and v's dtype, one layout: strides of dims 0-2 in units of 8 elements
    dk_ptr,
    dv_ptr,
    sdk_b,
    sdk_h,
    sdk_t,
    # q, grad_out (B, H, T, D); k, v (B, Hkv, S, D); strides of dims 0-2 in units of 8 elements;
    # lse2, delta (B, H, T) float32 from _attention_bwd_pre_kernel, strides sl_b, sl_h (rows contiguous)
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse2_ptr,
    delta_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    sd_b,
    sd_h,
    sd_t,
    sl_b,
    sl_h,
    # sizes: group = H // Hkv, D8 = D // 8; qk_scale = scale log2(e); tune_*: autotune key only
    H,
    group,
    T,
    S,
    D8,
    qk_scale,
    scale,
    tune_t,
    tune_s,
    # SPANS, VARLEN: as _attention_fwd_kernel
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
    """For one key block of KV head hk, summed over the query heads h of its group and the
    query blocks that see it: dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij q_i. Query blocks
    [lo, mid) and [mid2, hi) are masked; every row of [mid, mid2) sees every key of the block
    (causal: mid2 = T; SPANS: query_range)."""
    # float32 runs smaller tiles than the config's (see tile_block); the launcher's grid agrees
    BM: tl.constexpr = tile_block(BLOCK_M, BLOCK_D, q_ptr.dtype.element_ty == tl.float32, True)
    BN: tl.constexpr = tile_block(BLOCK_N, BLOCK_D, q_ptr.dtype.element_ty == tl.float32, True)
    n0 = tl.program_id(1) * BN
    b, hk = tl.program_id(0) // (H // group), tl.program_id(0) % (H // group)
    T, S, bos_q, bos_k = seq_bounds(cuq_ptr, cuk_ptr, b, T, S, VARLEN)
    if VARLEN:
        if n0 >= S:  # past this sequence's end
            return
    offs_m, offs_n, offs_d = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    k = load_rows(tile_ptr(k_ptr, b, hk, bos_k + n0, sk_b, sk_h, sk_t), 0, S - n0, sk_t, offs_n, offs_d, d_ok, True)
    v = load_rows(tile_ptr(v_ptr, b, hk, bos_k + n0, sv_b, sv_h, sv_t), 0, S - n0, sv_t, offs_n, offs_d, d_ok, True)
    dk = tl.zeros((BN, BLOCK_D), tl.float32)
    dv = tl.zeros((BN, BLOCK_D), tl.float32)
    diag, keys = S - T, n0 + offs_n
    sp = (klo_ptr, khi_ptr, skl_b, skl_t, wl, wr)
    if SPANS:
        lo, mid, mid2, hi = query_range(n0, tl.minimum(n0 + BN, S), T, S, b, sp, BM, SPAN_CHUNK)
    else:
        lo, mid, mid2, hi = n0 * 0, n0 * 0, T, T
        if CAUSAL:  # first query that sees key n0; first that sees the block's last key
            lo = tl.maximum(n0 - diag, 0) // BM * BM
            mid = tl.minimum(tl.cdiv(tl.maximum(tl.minimum(n0 + BN, S) - 1 - diag, 0), BM) * BM, T)
    lrow0 = b.to(tl.int64) * sl_b + bos_q
    args = (k, v, q_ptr, do_ptr, lse2_ptr + lrow0, delta_ptr + lrow0, sq_b, sq_h, sq_t, sd_b, sd_h, sd_t, sl_h)
    args += (b, hk, bos_q, T, S, keys, offs_m, offs_d, d_ok, diag, qk_scale, sp)
    dk, dv = _dkdv_blocks(dk, dv, lo, mid, group, args, CAUSAL, SPANS, True, BM, STAGES)
    dk, dv = _dkdv_blocks(dk, dv, mid, mid2, group, args, CAUSAL, SPANS, False, BM, STAGES)
    if SPANS:
        dk, dv = _dkdv_blocks(dk, dv, mid2, hi, group, args, CAUSAL, SPANS, True, BM, STAGES)
    row = b.to(tl.int64) * sdk_b + hk.to(tl.int64) * sdk_h + tl.cast(bos_k + n0, tl.int64) * sdk_t
    out = row * 8 + offs_n[:, None] * (sdk_t * 8) + offs_d[None, :]
    ok = (keys < S)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dq_step(
    dq,
    start,
    q,
    do,
    lse2,
    delta,
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
    """One key block: P = 2^(qk_scale q k^T - lse2), dS = P * (dO v^T - delta), dQ += dS K
    (scale applied by the caller)."""
    k = load_rows(k_ptr, start, S, st_k, offs_n, offs_d, d_ok, MASK)
    v = load_rows(v_ptr, start, S, st_v, offs_n, offs_d, d_ok, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION) - delta[:, None])
    if MASK:  # a masked key's inf/NaN (in k or v) must not reach the rows that do not see it
        ds = tl.where(visible(rows, start + offs_n, S, diag, lo, hi, CAUSAL, SPANS), ds, 0.0)
        k = tl.where(tl.abs(k) < float("inf"), k, 0.0)  # a seen inf/NaN already made its row's ds NaN
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _dq_blocks(
    dq,
    lo,
    hi,
    args,
    CAUSAL: tl.constexpr,
    SPANS: tl.constexpr,
    MASK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """_dq_step over the key blocks starting in [lo, hi), software-pipelined STAGES deep."""
    if WHILE_LOOPS:
        start = lo
        while start < hi:
            dq = _dq_step(dq, start, *args, CAUSAL, SPANS, MASK)
            start += BLOCK_N
    else:
        for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            dq = _dq_step(dq, start, *args, CAUSAL, SPANS, MASK)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    # output (B, H, T, D) in q's dtype: strides of dims 0-2 in units of 8 elements
    dq_ptr,
    sdq_b,
    sdq_h,
    sdq_t,
    # as _attention_bwd_dkdv_kernel
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse2_ptr,
    delta_ptr,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    sd_b,
    sd_h,
    sd_t,
    sl_b,
    sl_h,
    H,
    group,
    T,
    S,
    D8,
    qk_scale,
    scale,
    tune_t,
    tune_s,
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
    """dQ_i = scale sum_j dS_ij k_j, dS_ij = P_ij (dO_i . v_j - delta_i), over the keys j that
    query i sees (the forward's block ranges); rows that see no key get dQ = 0."""
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
    rows = m0 + offs_m
    q = load_rows(tile_ptr(q_ptr, b, h, bos_q + m0, sq_b, sq_h, sq_t), 0, T - m0, sq_t, offs_m, offs_d, d_ok, True)
    do = load_rows(tile_ptr(do_ptr, b, h, bos_q + m0, sd_b, sd_h, sd_t), 0, T - m0, sd_t, offs_m, offs_d, d_ok, True)
    row0 = b.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + bos_q
    lse2 = tl.load(lse2_ptr + row0 + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(delta_ptr + row0 + rows, mask=rows < T, other=0.0)
    k_ptr = tile_ptr(k_ptr, b, h // group, bos_k, sk_b, sk_h, sk_t)
    v_ptr = tile_ptr(v_ptr, b, h // group, bos_k, sv_b, sv_h, sv_t)
    if SPANS:
        lo, hi = row_spans(rows, T, S, b, (klo_ptr, khi_ptr, skl_b, skl_t, wl, wr))
        first, mid, mid2, last = span_blocks(lo, hi, rows < T, S, BN)
    else:
        lo, hi, first, mid = rows, rows, 0, 0
        mid2, last = key_range(m0, T, S, CAUSAL, BM, BN)
    dq = tl.zeros((BM, BLOCK_D), tl.float32)
    args = (q, do, lse2, delta, k_ptr, v_ptr, sk_t, sv_t, rows, offs_n, offs_d, d_ok, S, S - T, lo, hi, qk_scale)
    if SPANS:
        dq = _dq_blocks(dq, first, mid, args, CAUSAL, SPANS, True, BN, STAGES)
    dq = _dq_blocks(dq, mid, mid2, args, CAUSAL, SPANS, False, BN, STAGES)
    dq = _dq_blocks(dq, mid2, last, args, CAUSAL, SPANS, True, BN, STAGES)
    out = tile_ptr(dq_ptr, b, h, bos_q + m0, sdq_b, sdq_h, sdq_t) + offs_m[:, None] * (sdq_t * 8) + offs_d[None, :]
    tl.store(out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=(rows < T)[:, None] & d_ok[None, :])


_attention_bwd_dkdv_kernel = attention_autotune("_attention_bwd_dkdv_kernel")(_attention_bwd_dkdv_kernel)
_attention_bwd_dq_kernel = attention_autotune("_attention_bwd_dq_kernel")(_attention_bwd_dq_kernel)
