"""The Triton kernels of genkern/triton/kv_decode.py (its docstring gives the math and the launches)."""

from __future__ import annotations

import triton
import triton.language as tl

from genkern.triton._common import (
    BLOCK_DS,
    DOT_PRECISION,
    WHILE_LOOPS,
    autotune,
)

# Query rows per program: tl.dot's minimum M, and G * Tnew <= 16 covers decoding (G <= 8 with
# Tnew <= 2, G <= 4 with Tnew <= 4). More rows (a prefill chunk) take more programs, each reading
# the chunk's K/V again, mostly from L2; one tile size keeps the compiled variants few.
BLOCK_M = 16
APPEND_ROWS = 16  # new positions per append program
MAX_SPLITS = 128  # the combine kernel holds every split's lse in one tile
CHUNK_ALIGN = 128  # chunks are whole blocks of every BLOCK_N, so one split plan suits every config
MIN_CHUNK = 256  # fewer positions per program would not amortise the q load and the partial writes
MAX_STRIDE = 2**31 // (128 * 8)  # in-block offsets (position * stride) are int32

# Split-kernel autotune candidates (BLOCK_N, num_warps, num_stages) per BLOCK_D: of BLOCK_N
# {32, 64, 128} x warps {4, 8} x stages {2, 3}, those that fit sm_80's 163 KB of shared memory in
# float32 (the compiler keeps stages - 1 float32 K and V blocks in flight plus up to 30 KB of
# layout conversions, so those blocks get 128 KB) and do not spill registers: float32 products
# run on FMAs with whole K blocks in registers, and with 4 warps they spill once a K block holds
# 8192 elements or D >= 128. `python -m genkern.triton._aot genkern.triton.kv_decode` prints the table;
# tests/test_triton_aot.py checks every entry for sm_80 and sm_90 in fp32, fp16, bf16. BLOCK_N 64 at
# D = 128 is left out: with the window and key_lo bounds it needs 128 bytes of stack per thread on
# sm_90 in float32 (BLOCK_N 32 and 128 at the same D do not).
_ALL = [(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
CONFIGS = {
    bd: [
        (bn, w, s)
        for bn, w, s in _ALL
        if (s - 1) * bn * bd * 4 * 2 <= 128 * 1024
        and (w == 8 or (bn * bd < 8192 and bd < 128))
        and (bn, bd) != (64, 128)
    ]
    for bd in BLOCK_DS
}
INTERPRETER_CONFIG = (16, 4, 1)  # blocks smaller than a chunk: several blocks and splits run
# An oddly strided cache (SU = 1, rare) loads element by element, one 64-bit address per element
# in registers: one small config, not tuned (BLOCK_N 32 spills at D = 256 in float32).
STRIDED_CONFIG = (16, 4, 2)
SMALL_WARPS = 4  # the append and combine kernels: a few KB per program


def _autotune(kernel):
    """triton.autotune over CONFIGS (pruned to the launch's BLOCK_D), keyed on D; the dtypes join
    the key by themselves. The split kernel only reads the caches, so its reruns are harmless."""
    cfg = lambda c: triton.Config({"BLOCK_N": c[0]}, num_warps=c[1], num_stages=c[2])  # noqa: E731

    def prune(configs, named_args, **kwargs):
        keep = set(CONFIGS[kwargs["BLOCK_D"]])
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in keep]

    return autotune(CONFIGS, cfg, INTERPRETER_CONFIG, ["D8"], prune)(kernel)


@triton.jit
def _clamped_lengths(seqlens_ptr, b, n_add, Smax):
    """(L_b, n_b) clamped to [0, Smax]: lengths that break the contract stay in bounds."""
    L = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), Smax)
    return L, tl.minimum(L + n_add, Smax)


@triton.jit
def _kv_decode_append_kernel(
    # caches (B, Hkv, Smax, D), written in place: strides of dims 0-2 in units of SU elements
    k_ptr,
    v_ptr,
    # k_new, v_new (B, Hkv, Tnew, D): strides of dims 0-2 in units of 8 elements; lengths (B,) int32
    kn_ptr,
    vn_ptr,
    seqlens_ptr,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    skn_b,
    skn_h,
    skn_t,
    svn_b,
    svn_h,
    svn_t,
    Hkv,
    Tnew,
    Smax,
    D8,
    SU: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """cache[b, hk, L_b + t] = new[b, hk, t] for the new positions t of this program with
    L_b + t < Smax (the op checked L_b + Tnew <= Smax; the mask keeps a broken length in bounds)."""
    b, hk = tl.program_id(0) // Hkv, tl.program_id(0) % Hkv
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    L, n = _clamped_lengths(seqlens_ptr, b, Tnew, Smax)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (t < n - L)[:, None] & (offs_d < D8 * 8)[None, :]
    b64, h64, pos = b.to(tl.int64), hk.to(tl.int64), (L + t).to(tl.int64)
    src = (b64 * skn_b + h64 * skn_h + t * skn_t) * 8
    tl.store(
        k_ptr + ((b64 * sk_b + h64 * sk_h + pos * sk_t) * SU)[:, None] + offs_d[None, :],
        tl.load(kn_ptr + src[:, None] + offs_d[None, :], mask=ok),
        mask=ok,
    )
    src = (b64 * svn_b + h64 * svn_h + t * svn_t) * 8
    tl.store(
        v_ptr + ((b64 * sv_b + h64 * sv_h + pos * sv_t) * SU)[:, None] + offs_d[None, :],
        tl.load(vn_ptr + src[:, None] + offs_d[None, :], mask=ok),
        mask=ok,
    )


@triton.jit
def _softmax_step(
    acc, m_i, l_i, q, k_ptr, v_ptr, st_k, st_v, start, n, lo, lim, offs_n, offs_d, d_ok, qk_scale, SU: tl.constexpr
):
    """One block of the online softmax in log2 units over positions j = start + offs_n < n, row r
    seeing lo_r <= j <= lim_r: s2 = qk_scale q k^T, m' = max(m, rowmax s2), l' = l 2^(m - m') + rowsum
    2^(s2 - m'), acc' = acc 2^(m - m') + 2^(s2 - m') v. Positions j >= n are not loaded (they
    may hold NaN). Every block is masked: a compare and select per score, small next to the loads
    of this memory-bound pass, where a separate unmasked loop would need its own pipeline buffers."""
    j = start + offs_n
    ok = (j < n)[:, None] & d_ok[None, :]
    k = tl.load(
        k_ptr + tl.cast(start, tl.int64) * st_k * SU + (offs_n * (st_k * SU))[:, None] + offs_d[None, :],
        mask=ok,
        other=0.0,
    )
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where((j[None, :] < n) & (j[None, :] <= lim[:, None]) & (j[None, :] >= lo[:, None]), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + tl.cast(start, tl.int64) * st_v * SU + (offs_n * (st_v * SU))[:, None] + offs_d[None, :],
        mask=ok,
        other=0.0,
    )
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _kv_decode_split_kernel(
    # outputs, float32: part_o (rows, splits, D), part_lse (rows, splits); row = flat (b, h, i)
    po_ptr,
    plse_ptr,
    # q (B, H, Tnew, D): strides of dims 0-2 in units of 8 elements; caches (B, Hkv, Smax, D):
    # strides in units of SU elements; lengths (B,) int32
    q_ptr,
    k_ptr,
    v_ptr,
    seqlens_ptr,
    # key_lo (B,) int32, read at b * skl (skl = 0: not read, 0 for every row); wl the window's left side (-1: none)
    klo_ptr,
    skl,
    wl,
    sq_b,
    sq_h,
    sq_t,
    sk_b,
    sk_h,
    sk_t,
    sv_b,
    sv_h,
    sv_t,
    # sizes: group = H // Hkv, n_add = Tnew with new keys else 0, D8 = D // 8, m_tiles =
    # cdiv(G Tnew, BLOCK_M), chunk = positions per split (a multiple of BLOCK_N); qk_scale = scale log2(e)
    Hkv,
    group,
    Tnew,
    n_add,
    Smax,
    D8,
    m_tiles,
    chunk,
    qk_scale,
    SU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """For the query rows r = g Tnew + i (head h = hk G + g, query i) of this tile and the
    positions j of chunk [split chunk, (split + 1) chunk) that row r sees (j < n_b, j <= i + n_b -
    Tnew, j >= key_lo[b], j >= i + n_b - Tnew - wl): out_s = sum_j softmax_j(s_rj) v_j, lse_s =
    log sum_j exp(s_rj), s_rj = scale q_r . k_j. A chunk past n_b, or before every row's first
    position, runs no block; rows that see no position of the chunk get lse_s = -inf and
    no out_s. m starts finite (-1e30): a fully masked block gives p = 0, never -inf - -inf."""
    pid_bh, split = tl.program_id(0) // m_tiles, tl.program_id(1)
    b, hk = pid_bh // Hkv, pid_bh % Hkv
    L, n = _clamped_lengths(seqlens_ptr, b, n_add, Smax)
    rows = tl.program_id(0) % m_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * Tnew
    g, i = rows // Tnew, rows % Tnew
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    q_rows = b.to(tl.int64) * sq_b + (hk * group + g).to(tl.int64) * sq_h + i.to(tl.int64) * sq_t
    q = tl.load(q_ptr + (q_rows * 8)[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptr += (b.to(tl.int64) * sk_b + hk.to(tl.int64) * sk_h) * SU
    v_ptr += (b.to(tl.int64) * sv_b + hk.to(tl.int64) * sv_h) * SU
    lim = i + n - Tnew
    lo_r = tl.maximum(tl.load(klo_ptr + b * skl, mask=skl != 0, other=0), tl.where(wl >= 0, lim - wl, 0))
    # blocks before every row's first position are skipped (chunk is a multiple of BLOCK_N)
    lo = tl.maximum(split * chunk, tl.min(tl.where(row_ok, lo_r, n), 0) // BLOCK_N * BLOCK_N)
    hi = tl.minimum((split + 1) * chunk, n)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if WHILE_LOOPS:
        start = lo
        while start < hi:
            acc, m_i, l_i = _softmax_step(
                acc, m_i, l_i, q, k_ptr, v_ptr, sk_t, sv_t, start, n, lo_r, lim, offs_n, offs_d, d_ok, qk_scale, SU
            )
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _softmax_step(
                acc, m_i, l_i, q, k_ptr, v_ptr, sk_t, sv_t, start, n, lo_r, lim, offs_n, offs_d, d_ok, qk_scale, SU
            )
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) * 0.6931471805599453)
    flat = (pid_bh.to(tl.int64) * group * Tnew + rows) * tl.num_programs(1) + split
    tl.store(plse_ptr + flat, lse, mask=row_ok)
    o_ptrs = po_ptr + (flat * (D8 * 8))[:, None] + offs_d[None, :]
    tl.store(o_ptrs, acc / l_i[:, None], mask=(row_ok & ~empty)[:, None] & d_ok[None, :])


@triton.jit
def _kv_decode_combine_kernel(
    out_ptr,  # output (rows, D) contiguous, in q's dtype
    po_ptr,
    plse_ptr,  # float32 partials (rows, splits, D), (rows, splits) from the split kernel
    splits,
    D8,
    BLOCK_S: tl.constexpr,
    CHUNK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s w_s out_s / sum_s w_s, w_s = exp(lse_s - max_s lse_s) (each split's softmax
    rescaled to the common maximum); empty splits (lse_s = -inf) have w_s = 0 and their out_s,
    never written, is not loaded; a row with every split empty gets 0."""
    row = tl.program_id(0).to(tl.int64)
    offs_s, offs_c, offs_d = tl.arange(0, BLOCK_S), tl.arange(0, CHUNK_S), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    lse = tl.load(plse_ptr + row * splits + offs_s, mask=offs_s < splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse - m), 0)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    s0 = tl.full((), 0, tl.int32)
    while s0 < splits:  # CHUNK_S partials a round: one round for the usual few splits
        s = s0 + offs_c
        ls = tl.load(plse_ptr + row * splits + s, mask=s < splits, other=float("-inf"))
        o = tl.load(
            po_ptr + ((row * splits + s) * (D8 * 8))[:, None] + offs_d[None, :],
            mask=(ls > float("-inf"))[:, None] & d_ok[None, :],
            other=0.0,
        )
        acc += tl.sum(tl.exp(ls - m)[:, None] * o, 0)
        s0 += CHUNK_S
    out = acc / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + row * (D8 * 8) + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


_kv_decode_split_kernel = _autotune(_kv_decode_split_kernel)
