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
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
BLOCK_DS = (16, 32, 64, 128, 256)  # BLOCK_D = next power of two >= D, D in 16..256, D % 8 == 0
PRE_ROWS = {d: max(16, 4096 // d) for d in BLOCK_DS}  # rows per program of the delta kernel
_MAX_LEN = 65535 * 16  # T, S: grid axis 1 holds cdiv(len, BLOCK) <= 65535 programs
_MAX_ROW_STRIDE = 2**31 // 256  # tile offsets (row * stride) are int32
INTERPRETED = bool(triton.knobs.runtime.interpret)

# The interpreter (numpy 2) cannot take a runtime bound in range(); compiled code needs range()
# for software pipelining (num_stages). The block loops branch on this at compile time.
_WHILE_LOOPS = tl.constexpr(INTERPRETED)
# float32 inputs: exact products, like torch.matmul's default (tf32 would cost ~1e-3 relative).
_DOT = tl.constexpr("ieee")

# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, STAGES) per kernel and BLOCK_D, for 16-bit
# inputs (float32 caps them, see _block), from an ahead-of-time sweep: each compiles for sm_80
# and sm_90 in float32/float16/bfloat16 within the opt-in shared memory (163 KB, 227 KB) and
# without register spills (tests/test_triton_aot.py; `python -m genkern.triton._aot
# genkern.triton.attention` prints the table). Few per head dim: the AOT test compiles them all.
_FWD_SMALL_D = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
_DQ_SMALL_D = [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)]
_DKDV_SMALL_D = [(32, 128, 4, 2), (64, 64, 8, 2), (32, 64, 4, 3)]
CONFIGS = {
    "_attention_fwd_kernel": {16: _FWD_SMALL_D, 32: _FWD_SMALL_D, 64: _FWD_SMALL_D,
                              128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
                              256: [(64, 64, 8, 2), (64, 32, 8, 3)]},
    "_attention_bwd_dkdv_kernel": {16: _DKDV_SMALL_D, 32: _DKDV_SMALL_D,
                                   64: [(32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 8, 3)],
                                   128: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
                                   256: [(32, 64, 8, 2), (32, 32, 8, 3), (16, 64, 8, 2)]},
    "_attention_bwd_dq_kernel": {16: _DQ_SMALL_D, 32: _DQ_SMALL_D, 64: _DQ_SMALL_D,
                                 128: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3)],
                                 256: [(64, 32, 8, 2), (64, 64, 8, 2), (32, 32, 4, 2)]},
}
# Under the interpreter: one small config, unequal blocks so both tilings of the diagonal run.
INTERPRETER_CONFIGS = {"_attention_fwd_kernel": (32, 16, 4, 1), "_attention_bwd_dkdv_kernel": (16, 32, 4, 1),
                       "_attention_bwd_dq_kernel": (32, 16, 4, 1)}


def _autotune(name):
    """triton.autotune over CONFIGS[name] (pruned to the launch's BLOCK_D), keyed on the head
    counts, the head dim, the log2 buckets of T and S (not their exact values: a new prompt
    length must not rerun the benchmark) and causal; the dtypes join the key by themselves."""
    def cfg(c):
        return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "STAGES": c[3]}, num_warps=c[2], num_stages=c[3])
    if INTERPRETED:
        return triton.autotune([cfg(INTERPRETER_CONFIGS[name])], key=[])

    def prune(configs, named_args, **kwargs):
        d, f32, keys = kwargs["BLOCK_D"], named_args["q_ptr"].dtype == torch.float32, "dkdv" in name
        keep, out = set(CONFIGS[name][d]), {}
        for c in configs:
            bm, bn, w, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["STAGES"]
            if (bm, bn, w, st) in keep:  # float32 tiles coincide (see _block): time each once
                out.setdefault((_block(bm, d, f32, keys), _block(bn, d, f32, keys), w, st), c)
        return list(out.values())
    union = sorted({c for configs in CONFIGS[name].values() for c in configs})
    return triton.autotune([cfg(c) for c in union], key=["H", "group", "D8", "tune_t", "tune_s", "CAUSAL"],
                           prune_configs_by={"early_config_prune": prune})


# --- block helpers ----------------------------------------------------------------------------

@triton.constexpr_function
def _block(block, block_d, f32, holds_keys=False):
    """The tile edge a config's BLOCK_M or BLOCK_N means for the inputs' dtype. float32 dots run
    on CUDA cores (exact products, like torch.matmul; tf32 would cost ~1e-3), which keep operand
    fragments and products in registers: float32 tiles are capped (16 for head dims over 64 and
    for the dK/dV kernel, which holds four key tiles) so that every config also compiles in
    float32 without spilling. The 16-bit tiles are the ones tuned."""
    return min(block, 16 if holds_keys or block_d > 64 else 32) if f32 else block


@triton.jit
def _ptr(ptr, b, h, row, sb, sh, st):
    """ptr + the offset of element (b, h, row, 0); strides in units of 8 elements, int64 math."""
    return ptr + (b.to(tl.int64) * sb + h.to(tl.int64) * sh + tl.cast(row, tl.int64) * st) * 8


@triton.jit
def _load_rows(base, start, n, st, offs, offs_d, d_ok, MASK: tl.constexpr):
    """Rows start + offs (rows >= n masked if MASK) x columns offs_d < D of the rows at base,
    row stride st * 8 elements. The strides arrive divided by 8 so the compiler knows each row
    starts 16-byte aligned (D % 8 == 0) and vectorizes along D."""
    ptrs = base + tl.cast(start, tl.int64) * st * 8 + offs[:, None] * (st * 8) + offs_d[None, :]
    mask = d_ok[None, :]
    if MASK:
        mask = mask & (start + offs < n)[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _visible(rows, cols, S, diag, CAUSAL: tl.constexpr):
    """(len(rows), len(cols)) mask: key cols[j] < S that query rows[i] sees (j <= i + diag)."""
    ok = (cols < S)[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + diag)
    return ok


@triton.jit
def _fwd_step(acc, m_i, l_i, start, q, k_ptr, v_ptr, st_k, st_v, rows, offs_n, offs_d, d_ok, S, diag, qk_scale,
              CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """One key block of the online softmax: s2 = qk_scale q k^T, m' = max(m, rowmax s2),
    l' = l 2^(m - m') + rowsum 2^(s2 - m'), acc' = acc 2^(m - m') + 2^(s2 - m') v."""
    k = _load_rows(k_ptr, start, S, st_k, offs_n, offs_d, d_ok, MASK)
    s = tl.dot(q, tl.trans(k), input_precision=_DOT) * qk_scale
    if MASK:
        s = tl.where(_visible(rows, start + offs_n, S, diag, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_ptr, start, S, st_v, offs_n, offs_d, d_ok, MASK)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=_DOT)
    return acc, m_new, l_i


@triton.jit
def _fwd_blocks(acc, m_i, l_i, lo, hi, args, CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                STAGES: tl.constexpr):
    """_fwd_step over the key blocks starting in [lo, hi), software-pipelined STAGES deep."""
    if _WHILE_LOOPS:
        start = lo
        while start < hi:
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, start, *args, CAUSAL, MASK)
            start += BLOCK_N
    else:
        for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, start, *args, CAUSAL, MASK)
    return acc, m_i, l_i


@triton.jit
def _key_range(m0, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, hi) for the query block at m0: keys [0, full) are seen by every row of the block
    and lie in whole key blocks; keys [full, hi) are seen by some row (the masked blocks)."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, T) + S - T, 0), S)
        full = tl.minimum(tl.maximum(m0 + S - T + 1, 0), hi) // BLOCK_N * BLOCK_N
    else:
        hi = S
        full = S // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _attention_fwd_kernel(
    # outputs: out (B, H, T, D) contiguous in q's dtype, lse (B, H, T) float32 contiguous
    out_ptr, lse_ptr,
    # inputs q (B, H, T, D), k and v (B, Hkv, S, D); strides of dims 0-2 in units of 8 elements
    q_ptr, k_ptr, v_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
    # sizes: group = H // Hkv, D8 = D // 8; qk_scale = scale log2(e); tune_*: autotune key only
    H, group, T, S, D8, qk_scale, tune_t, tune_s,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """out_i = sum_j softmax_j(s_ij) v_j and lse_i = log sum_j exp(s_ij) over the keys j that
    query i sees, s_ij = scale q_i . k_j. Running m, l, acc in float32 (see _fwd_step); then
    out = acc / l, lse = (m + log2 l) ln 2; rows with l = 0 (no key) get out = 0, lse = -inf.
    m starts finite (-1e30): a row masked so far keeps alpha = 1, p = 0 (no -inf - -inf)."""
    # float32 runs smaller tiles than the config's (see _block); the launcher's grid agrees
    BM: tl.constexpr = _block(BLOCK_M, BLOCK_D, q_ptr.dtype.element_ty == tl.float32)
    BN: tl.constexpr = _block(BLOCK_N, BLOCK_D, q_ptr.dtype.element_ty == tl.float32)
    bh = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BM  # causal: the longest rows start first
    b, h = bh // H, bh % H
    offs_m, offs_n, offs_d = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    q = _load_rows(_ptr(q_ptr, b, h, m0, sq_b, sq_h, sq_t), 0, T - m0, sq_t, offs_m, offs_d, d_ok, True)
    k_ptr = _ptr(k_ptr, b, h // group, 0, sk_b, sk_h, sk_t)
    v_ptr = _ptr(v_ptr, b, h // group, 0, sv_b, sv_h, sv_t)
    full, hi = _key_range(m0, T, S, CAUSAL, BM, BN)
    acc = tl.zeros((BM, BLOCK_D), tl.float32)
    m_i = tl.full((BM,), -1.0e30, tl.float32)
    l_i = tl.zeros((BM,), tl.float32)
    rows, diag = m0 + offs_m, S - T
    args = (q, k_ptr, v_ptr, sk_t, sv_t, rows, offs_n, offs_d, d_ok, S, diag, qk_scale)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, 0, full, args, CAUSAL, False, BN, STAGES)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, full, hi, args, CAUSAL, True, BN, STAGES)
    empty = l_i == 0.0
    l_i = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_i)) * 0.6931471805599453)
    row0 = bh.to(tl.int64) * T + m0
    ok = rows < T
    tl.store(lse_ptr + row0 + offs_m, lse, mask=ok)
    o_ptrs = out_ptr + row0 * D8 * 8 + offs_m[:, None] * (D8 * 8) + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


# --- backward ---------------------------------------------------------------------------------

@triton.jit
def _attention_bwd_pre_kernel(
    # outputs (B, H, T) float32 contiguous: delta, and lse2 = lse log2(e) (+inf where lse = -inf)
    delta_ptr, lse2_ptr,
    # out and grad_out (B, H, T, D) (strides of dims 0-2 in units of 8 elements); lse, grad_lse
    # (B, H, T) float32 contiguous (grad_lse read only if HAS_GRAD_LSE)
    out_ptr, do_ptr, lse_ptr, glse_ptr,
    so_b, so_h, so_t, sd_b, sd_h, sd_t,
    H, T, D8,
    HAS_GRAD_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id - grad_lse_i (float32), and the log2-unit lse the other
    backward kernels subtract: +inf for rows that see no key, so exp2(s2 - lse2) = 0 there."""
    bh, m0 = tl.program_id(0), tl.program_id(1) * BLOCK_M
    b, h = bh // H, bh % H
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    o = _load_rows(_ptr(out_ptr, b, h, m0, so_b, so_h, so_t), 0, T - m0, so_t, offs_m, offs_d, d_ok, True)
    do = _load_rows(_ptr(do_ptr, b, h, m0, sd_b, sd_h, sd_t), 0, T - m0, sd_t, offs_m, offs_d, d_ok, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    rows = bh.to(tl.int64) * T + m0 + offs_m
    ok = m0 + offs_m < T
    if HAS_GRAD_LSE:
        delta -= tl.load(glse_ptr + rows, mask=ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=ok, other=0.0)
    tl.store(delta_ptr + rows, delta, mask=ok)
    tl.store(lse2_ptr + rows, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=ok)


@triton.jit
def _dkdv_step(dk, dv, it, n_blk, lo, group, k, v, q_ptr, do_ptr, lse2_ptr, delta_ptr, sq_b, sq_h, sq_t, sd_b, sd_h,
               sd_t, b, hk, H, T, keys, offs_m, offs_d, d_ok, diag, qk_scale,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Query block lo + (it % n_blk) BLOCK_M of head hk group + it // n_blk, transposed (keys x
    queries): P^T = 2^(qk_scale k q^T - lse2), dV += P^T dO, dS^T = P^T * (V dO^T - delta),
    dK += dS^T Q (scale applied by the caller). Rows past T load q = dO = 0 and lse2 = +inf:
    P^T = 0 there without a row mask on the scores."""
    h = hk * group + it // n_blk
    start = lo + (it % n_blk) * BLOCK_M
    q = _load_rows(_ptr(q_ptr, b, h, 0, sq_b, sq_h, sq_t), start, T, sq_t, offs_m, offs_d, d_ok, True)
    do = _load_rows(_ptr(do_ptr, b, h, 0, sd_b, sd_h, sd_t), start, T, sd_t, offs_m, offs_d, d_ok, True)
    rows = start + offs_m
    row0 = (b * H + h).to(tl.int64) * T
    lse2 = tl.load(lse2_ptr + row0 + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(delta_ptr + row0 + rows, mask=rows < T, other=0.0)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=_DOT) * qk_scale - lse2[None, :])
    if MASK:
        p_t = tl.where(keys[:, None] <= rows[None, :] + diag, p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=_DOT)
    ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=_DOT) - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=_DOT)
    return dk, dv


@triton.jit
def _dkdv_blocks(dk, dv, lo, hi, group, args, CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                 STAGES: tl.constexpr):
    """_dkdv_step over the query blocks starting in [lo, hi) of every head of the group, as one
    flat loop software-pipelined STAGES deep (a loop over heads around it costs registers)."""
    n_blk = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    if _WHILE_LOOPS:
        it = n_blk * 0
        while it < n_blk * group:
            dk, dv = _dkdv_step(dk, dv, it, n_blk, lo, group, *args, CAUSAL, MASK, BLOCK_M)
            it += 1
    else:
        for it in tl.range(0, n_blk * group, num_stages=STAGES):
            dk, dv = _dkdv_step(dk, dv, it, n_blk, lo, group, *args, CAUSAL, MASK, BLOCK_M)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    # outputs (B, Hkv, S, D) contiguous, in k's and v's dtype
    dk_ptr, dv_ptr,
    # q, grad_out (B, H, T, D); k, v (B, Hkv, S, D); strides of dims 0-2 in units of 8 elements;
    # lse2, delta (B, H, T) float32 contiguous from _attention_bwd_pre_kernel
    q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t,
    # sizes: group = H // Hkv, D8 = D // 8; qk_scale = scale log2(e); tune_*: autotune key only
    H, group, T, S, D8, qk_scale, scale, tune_t, tune_s,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """For one key block of KV head hk, summed over the query heads h of its group and the
    query blocks that see it: dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij q_i. Query blocks
    [lo, mid) cross the causal diagonal (masked); from mid on every row sees every key."""
    # float32 runs smaller tiles than the config's (see _block); the launcher's grid agrees
    BM: tl.constexpr = _block(BLOCK_M, BLOCK_D, q_ptr.dtype.element_ty == tl.float32, True)
    BN: tl.constexpr = _block(BLOCK_N, BLOCK_D, q_ptr.dtype.element_ty == tl.float32, True)
    n0 = tl.program_id(1) * BN
    b, hk = tl.program_id(0) // (H // group), tl.program_id(0) % (H // group)
    offs_m, offs_n, offs_d = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    k = _load_rows(_ptr(k_ptr, b, hk, n0, sk_b, sk_h, sk_t), 0, S - n0, sk_t, offs_n, offs_d, d_ok, True)
    v = _load_rows(_ptr(v_ptr, b, hk, n0, sv_b, sv_h, sv_t), 0, S - n0, sv_t, offs_n, offs_d, d_ok, True)
    dk = tl.zeros((BN, BLOCK_D), tl.float32)
    dv = tl.zeros((BN, BLOCK_D), tl.float32)
    diag, keys = S - T, n0 + offs_n
    lo, mid = n0 * 0, n0 * 0
    if CAUSAL:  # first query that sees key n0; first that sees the block's last key
        lo = tl.maximum(n0 - diag, 0) // BM * BM
        mid = tl.minimum(tl.cdiv(tl.maximum(tl.minimum(n0 + BN, S) - 1 - diag, 0), BM) * BM, T)
    args = (k, v, q_ptr, do_ptr, lse2_ptr, delta_ptr, sq_b, sq_h, sq_t, sd_b, sd_h, sd_t, b, hk, H, T, keys,
            offs_m, offs_d, d_ok, diag, qk_scale)
    dk, dv = _dkdv_blocks(dk, dv, lo, mid, group, args, CAUSAL, True, BM, STAGES)
    dk, dv = _dkdv_blocks(dk, dv, mid, T, group, args, CAUSAL, False, BM, STAGES)
    out = (tl.program_id(0).to(tl.int64) * S + keys)[:, None] * (D8 * 8) + offs_d[None, :]
    ok = (keys < S)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=ok)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dq_step(dq, start, q, do, lse2, delta, k_ptr, v_ptr, st_k, st_v, rows, offs_n, offs_d, d_ok, S, diag, qk_scale,
             CAUSAL: tl.constexpr, MASK: tl.constexpr):
    """One key block: P = 2^(qk_scale q k^T - lse2), dS = P * (dO v^T - delta), dQ += dS K
    (scale applied by the caller)."""
    k = _load_rows(k_ptr, start, S, st_k, offs_n, offs_d, d_ok, MASK)
    v = _load_rows(v_ptr, start, S, st_v, offs_n, offs_d, d_ok, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=_DOT) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(_visible(rows, start + offs_n, S, diag, CAUSAL), p, 0.0)
    ds = p * (tl.dot(do, tl.trans(v), input_precision=_DOT) - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=_DOT)


@triton.jit
def _dq_blocks(dq, lo, hi, args, CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
               STAGES: tl.constexpr):
    """_dq_step over the key blocks starting in [lo, hi), software-pipelined STAGES deep."""
    if _WHILE_LOOPS:
        start = lo
        while start < hi:
            dq = _dq_step(dq, start, *args, CAUSAL, MASK)
            start += BLOCK_N
    else:
        for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            dq = _dq_step(dq, start, *args, CAUSAL, MASK)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    # output (B, H, T, D) contiguous, in q's dtype
    dq_ptr,
    # as _attention_bwd_dkdv_kernel
    q_ptr, k_ptr, v_ptr, do_ptr, lse2_ptr, delta_ptr,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sd_b, sd_h, sd_t,
    H, group, T, S, D8, qk_scale, scale, tune_t, tune_s,
    CAUSAL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr,
):
    """dQ_i = scale sum_j dS_ij k_j, dS_ij = P_ij (dO_i . v_j - delta_i), over the keys j that
    query i sees (the forward's block ranges); rows that see no key get dQ = 0."""
    # float32 runs smaller tiles than the config's (see _block); the launcher's grid agrees
    BM: tl.constexpr = _block(BLOCK_M, BLOCK_D, q_ptr.dtype.element_ty == tl.float32)
    BN: tl.constexpr = _block(BLOCK_N, BLOCK_D, q_ptr.dtype.element_ty == tl.float32)
    bh = tl.program_id(0)
    m0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BM  # causal: the longest rows start first
    b, h = bh // H, bh % H
    offs_m, offs_n, offs_d = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BLOCK_D)
    d_ok = offs_d < D8 * 8
    rows = m0 + offs_m
    q = _load_rows(_ptr(q_ptr, b, h, m0, sq_b, sq_h, sq_t), 0, T - m0, sq_t, offs_m, offs_d, d_ok, True)
    do = _load_rows(_ptr(do_ptr, b, h, m0, sd_b, sd_h, sd_t), 0, T - m0, sd_t, offs_m, offs_d, d_ok, True)
    row0 = bh.to(tl.int64) * T
    lse2 = tl.load(lse2_ptr + row0 + rows, mask=rows < T, other=float("inf"))
    delta = tl.load(delta_ptr + row0 + rows, mask=rows < T, other=0.0)
    k_ptr = _ptr(k_ptr, b, h // group, 0, sk_b, sk_h, sk_t)
    v_ptr = _ptr(v_ptr, b, h // group, 0, sv_b, sv_h, sv_t)
    full, hi = _key_range(m0, T, S, CAUSAL, BM, BN)
    dq = tl.zeros((BM, BLOCK_D), tl.float32)
    args = (q, do, lse2, delta, k_ptr, v_ptr, sk_t, sv_t, rows, offs_n, offs_d, d_ok, S, S - T, qk_scale)
    dq = _dq_blocks(dq, 0, full, args, CAUSAL, False, BN, STAGES)
    dq = _dq_blocks(dq, full, hi, args, CAUSAL, True, BN, STAGES)
    out = (row0 + rows)[:, None] * (D8 * 8) + offs_d[None, :]
    tl.store(dq_ptr + out, (dq * scale).to(dq_ptr.dtype.element_ty), mask=(rows < T)[:, None] & d_ok[None, :])


_attention_fwd_kernel = _autotune("_attention_fwd_kernel")(_attention_fwd_kernel)
_attention_bwd_dkdv_kernel = _autotune("_attention_bwd_dkdv_kernel")(_attention_bwd_dkdv_kernel)
_attention_bwd_dq_kernel = _autotune("_attention_bwd_dq_kernel")(_attention_bwd_dq_kernel)


# --- launchers: check, allocate, launch -----------------------------------------------------

def _check(q, k, v, *others):
    """Checks the op's contract; returns (B, H, T, D, Hkv, S). others: (name, tensor, shape, dtype)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q: the Triton attention kernels take float16, bfloat16 or float32, got {q.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, T, D) and k, v (B, Hkv, S, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    (B, H, T, D), (_, Hkv, S, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != D or Hkv == 0 or H % Hkv:
        raise ValueError(f"k, v {tuple(k.shape)} must be (B, Hkv, S, D) with H % Hkv == 0 for q {tuple(q.shape)}")
    if D % 8 or not 16 <= D <= 256 or max(T, S) > _MAX_LEN:
        raise ValueError(f"head dim must be 16..256 in steps of 8 and T, S <= {_MAX_LEN}, got D={D}, T={T}, S={S}")
    for name, t, shape, dtype in (("k", k, k.shape, q.dtype), ("v", v, k.shape, q.dtype)) + others:
        if t is not None and (t.shape != shape or t.dtype != dtype or t.device != q.device):
            raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {q.device}, got {tuple(t.shape)} {t.dtype} "
                             f"on {t.device}")
    return B, H, T, D, Hkv, S


def _rows8(t):
    """(t, its dim 0-2 strides in units of 8 elements); a copy when the last dim is not unit-stride or
    a stride is not a multiple of 8 (the kernels' alignment promise). Size-1 dims get stride 0."""
    if t.stride(3) != 1 or any(t.shape[i] > 1 and t.stride(i) % 8 for i in range(3)) or \
            t.stride(2) >= _MAX_ROW_STRIDE:
        t = t.contiguous()
    return t, [t.stride(i) // 8 if t.shape[i] > 1 else 0 for i in range(3)]


def _meta(q, T, S, D, causal):
    """What every launch shares: the log2 buckets of T, S (autotune key), the meta-parameters,
    and the tile edge of a config's BLOCK_M / BLOCK_N in q's dtype (for the grid)."""
    block_d = triton.next_power_of_2(D)
    edge = lambda c, key, keys=False: _block(c[key], block_d, q.dtype == torch.float32, keys)  # noqa: E731
    return (triton.next_power_of_2(T), triton.next_power_of_2(S)), dict(CAUSAL=bool(causal), BLOCK_D=block_d), edge


def attention_forward(q, k, v, causal, scale):
    """(out (B, H, T, D) contiguous in q's dtype, lse (B, H, T) float32); see _attention_fwd_kernel."""
    B, H, T, D, Hkv, S = _check(q, k, v)
    if q.numel() == 0 or S == 0:  # no key anywhere: out 0, lse -inf
        return q.new_zeros((B, H, T, D)), torch.full((B, H, T), float("-inf"), dtype=torch.float32, device=q.device)
    out, lse = q.new_empty((B, H, T, D)), torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    (q, sq), (k, sk), (v, sv) = _rows8(q), _rows8(k), _rows8(v)
    tune, meta, edge = _meta(q, T, S, D, causal)
    _attention_fwd_kernel[lambda c: (B * H, triton.cdiv(T, edge(c, "BLOCK_M")))](
        out, lse, q, k, v, *sq, *sk, *sv, H, H // Hkv, T, S, D // 8, scale * LOG2E, *tune, **meta)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale):
    """(dq, dk, dv), shaped and typed like q, k, v (contiguous); see the backward kernels."""
    B, H, T, D, Hkv, S = _check(q, k, v, ("grad_out", grad_out, q.shape, q.dtype), ("out", out, q.shape, q.dtype),
                                ("lse", lse, q.shape[:3], torch.float32),
                                ("grad_lse", grad_lse, q.shape[:3], torch.float32))
    new = torch.empty if q.numel() and S else torch.zeros  # the kernels write every element
    dq, dk, dv = (new(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or S == 0:
        return dq, dk, dv
    (q, sq), (k, sk), (v, sv), (out, so), (do, sd) = map(_rows8, (q, k, v, out, grad_out))
    delta, lse2 = (torch.empty((B, H, T), dtype=torch.float32, device=q.device) for _ in range(2))
    tune, meta, edge = _meta(q, T, S, D, causal)
    rows = PRE_ROWS[meta["BLOCK_D"]]
    _attention_bwd_pre_kernel[(B * H, triton.cdiv(T, rows))](
        delta, lse2, out, do, lse.contiguous(), lse if grad_lse is None else grad_lse.contiguous(), *so, *sd, H, T,
        D // 8, HAS_GRAD_LSE=grad_lse is not None, BLOCK_M=rows, BLOCK_D=meta["BLOCK_D"], num_warps=4)
    args = (q, k, v, do, lse2, delta, *sq, *sk, *sv, *sd, H, H // Hkv, T, S, D // 8, scale * LOG2E, scale, *tune)
    _attention_bwd_dkdv_kernel[lambda c: (B * Hkv, triton.cdiv(S, edge(c, "BLOCK_N", True)))](dk, dv, *args, **meta)
    _attention_bwd_dq_kernel[lambda c: (B * H, triton.cdiv(T, edge(c, "BLOCK_M")))](dq, *args, **meta)
    return dq, dk, dv


def aot_cases():
    """For genkern.triton._aot: every kernel x autotune config x BLOCK_D, causal (the masked
    diagonal path included), and non-causal at BLOCK_D 128's first config; the delta kernel at
    every BLOCK_D with and without grad_lse."""
    types = {n: "*fp32" for n in ("lse_ptr", "glse_ptr", "lse2_ptr", "delta_ptr")}
    types.update(qk_scale="fp32", scale="fp32")
    for name, per_d in CONFIGS.items():
        for block_d, configs in per_d.items():
            for i, (bm, bn, w, s) in enumerate(configs):
                for causal in (True, False) if (block_d, i) == (128, 0) else (True,):
                    yield dict(kernel=globals()[name].fn, num_warps=w, num_stages=s, types=types, constexprs=dict(
                        CAUSAL=causal, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, STAGES=s))
    for block_d, rows in PRE_ROWS.items():
        for has in (True, False):
            yield dict(kernel=_attention_bwd_pre_kernel, num_warps=4, types=types,
                       constexprs=dict(HAS_GRAD_LSE=has, BLOCK_M=rows, BLOCK_D=block_d))
