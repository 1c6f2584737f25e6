"""Tiles of the Triton attention kernels: the autotune candidates, the tile edge per dtype, and the
row loads and masks that the forward (attention_fwd.py) and backward (attention_bwd.py) kernels share.
The layout and the math: genkern/triton/attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genkern.triton._common import autotune

# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, STAGES) per kernel and BLOCK_D, for 16-bit
# inputs (float32 caps them, see tile_block), from an ahead-of-time sweep: each compiles for sm_80
# and sm_90 in float32/float16/bfloat16 within the opt-in shared memory (163 KB, 227 KB) and
# without register spills (tests/test_triton_aot.py; `python -m genkern.triton._aot
# genkern.triton.attention` prints the table). Few per head dim: the AOT test compiles them all.
_FWD_SMALL_D = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]
_DQ_SMALL_D = [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)]
_DKDV_SMALL_D = [(32, 128, 4, 2), (64, 64, 8, 2), (32, 64, 4, 3)]
CONFIGS = {
    "_attention_fwd_kernel": {
        16: _FWD_SMALL_D,
        32: _FWD_SMALL_D,
        64: _FWD_SMALL_D,
        128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
        256: [(64, 64, 8, 2), (64, 32, 8, 3)],
    },
    "_attention_bwd_dkdv_kernel": {
        16: _DKDV_SMALL_D,
        32: _DKDV_SMALL_D,
        64: [(32, 128, 8, 2), (32, 64, 4, 2), (32, 64, 8, 3)],
        128: [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2)],
        256: [(32, 64, 8, 2), (32, 32, 8, 3), (16, 64, 8, 2)],
    },
    "_attention_bwd_dq_kernel": {
        16: _DQ_SMALL_D,
        32: _DQ_SMALL_D,
        64: _DQ_SMALL_D,
        128: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3)],
        # (64, 64, 8, 2) left out: with masked keys' inf/NaN kept out of dq it needs 64-72 bytes of
        # stack per thread on sm_90 in 16-bit types.
        256: [(64, 32, 8, 2), (32, 32, 4, 2)],
    },
}
# Configs the span/packed variant (SPANS) leaves out: with each row's key span in registers they need
# 40-184 bytes of stack per thread in 16-bit types (sm_80 at BLOCK_D 64, sm_90 at 256; found by
# tests/test_triton_aot.py). The plain causal/full variant keeps them.
SPANS_SPILL = {
    "_attention_bwd_dkdv_kernel": {64: {(32, 64, 8, 3)}, 256: {(32, 64, 8, 2), (16, 64, 8, 2)}},
    "_attention_bwd_dq_kernel": {256: {(64, 32, 8, 2)}},
}


def configs_for(name, block_d, spans):
    """The autotune candidates of kernel `name` at `block_d` for the plain (spans False) or the span variant."""
    drop = SPANS_SPILL.get(name, {}).get(block_d, set()) if spans else set()
    return [c for c in CONFIGS[name][block_d] if c not in drop]


# Under the interpreter: one small config, unequal blocks so both tilings of the diagonal run.
INTERPRETER_CONFIGS = {
    "_attention_fwd_kernel": (32, 16, 4, 1),
    "_attention_bwd_dkdv_kernel": (16, 32, 4, 1),
    "_attention_bwd_dq_kernel": (32, 16, 4, 1),
}


def attention_autotune(name):
    """triton.autotune over CONFIGS[name] (pruned to the launch's BLOCK_D), keyed on the head
    counts, the head dim, the log2 buckets of T and S (not their exact values: a new prompt
    length must not rerun the benchmark), causal and the span/packed variants; the dtypes join the
    key by themselves."""

    def cfg(c):
        return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "STAGES": c[3]}, num_warps=c[2], num_stages=c[3])

    def prune(configs, named_args, **kwargs):
        d, f32, keys = kwargs["BLOCK_D"], named_args["q_ptr"].dtype == torch.float32, "dkdv" in name
        keep, out = set(configs_for(name, d, kwargs.get("SPANS", False))), {}
        for c in configs:
            bm, bn, w, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["STAGES"]
            if (bm, bn, w, st) in keep:  # float32 tiles coincide (see tile_block): time each once
                out.setdefault((tile_block(bm, d, f32, keys), tile_block(bn, d, f32, keys), w, st), c)
        return list(out.values())

    return autotune(
        CONFIGS[name],
        cfg,
        INTERPRETER_CONFIGS[name],
        ["H", "group", "D8", "tune_t", "tune_s", "CAUSAL", "SPANS", "VARLEN"],
        prune,
    )


# --- block helpers ----------------------------------------------------------------------------


@triton.constexpr_function
def tile_block(block, block_d, f32, holds_keys=False):
    """The tile edge a config's BLOCK_M or BLOCK_N means for the inputs' dtype. float32 dots run
    on CUDA cores (exact products, like torch.matmul; tf32 would cost ~1e-3), which keep operand
    fragments and products in registers: float32 tiles are capped (16 for head dims over 64 and
    for the dK/dV kernel, which holds four key tiles) so that every config also compiles in
    float32 without spilling. The 16-bit tiles are the ones tuned."""
    return min(block, 16 if holds_keys or block_d > 64 else 32) if f32 else block


@triton.jit
def tile_ptr(ptr, b, h, row, sb, sh, st):
    """ptr + the offset of element (b, h, row, 0); strides in units of 8 elements, int64 math."""
    return ptr + (b.to(tl.int64) * sb + h.to(tl.int64) * sh + tl.cast(row, tl.int64) * st) * 8


@triton.jit
def load_rows(base, start, n, st, offs, offs_d, d_ok, MASK: tl.constexpr):
    """Rows start + offs (rows >= n masked if MASK) x columns offs_d < D of the rows at base,
    row stride st * 8 elements. The strides arrive divided by 8 so the compiler knows each row
    starts 16-byte aligned (D % 8 == 0) and vectorizes along D."""
    ptrs = base + tl.cast(start, tl.int64) * st * 8 + offs[:, None] * (st * 8) + offs_d[None, :]
    mask = d_ok[None, :]
    if MASK:
        mask = mask & (start + offs < n)[:, None]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def visible(rows, cols, S, diag, lo, hi, CAUSAL: tl.constexpr, SPANS: tl.constexpr):
    """(len(rows), len(cols)) mask: key cols[j] that query rows[i] sees. SPANS: lo[i] <= j < hi[i]
    (row_spans, which clamps to [0, S)); else j < S, and j <= i + diag if CAUSAL."""
    if SPANS:
        ok = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
    else:
        ok = (cols < S)[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + diag)
    return ok


@triton.jit
def key_range(m0, T, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, hi) for the query block at m0: keys [0, full) are seen by every row of the block
    and lie in whole key blocks; keys [full, hi) are seen by some row (the masked blocks)."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(tl.minimum(m0 + BLOCK_M, T) + S - T, 0), S)
        full = tl.minimum(tl.maximum(m0 + S - T + 1, 0), hi) // BLOCK_N * BLOCK_N
    else:
        hi = S
        full = S // BLOCK_N * BLOCK_N
    return full, hi


# --- spans: windows, per-row key spans, packed sequences ---------------------------------------


@triton.jit
def seq_bounds(cuq_ptr, cuk_ptr, b, T, S, VARLEN: tl.constexpr):
    """(T_b, S_b, first query row, first key row) of batch row / packed sequence b. VARLEN reads
    them from cu_seqlens (T, S: the max_seqlen bounds, which clamp them); else (T, S, 0, 0)."""
    if VARLEN:
        bos_q = tl.load(cuq_ptr + b)
        bos_k = tl.load(cuk_ptr + b)
        t = tl.minimum(tl.maximum(tl.load(cuq_ptr + b + 1) - bos_q, 0), T)
        s = tl.minimum(tl.maximum(tl.load(cuk_ptr + b + 1) - bos_k, 0), S)
        return t, s, bos_q, bos_k
    return T, S, b * 0, b * 0


@triton.jit
def row_spans(rows, T, S, b, sp):
    """[lo, hi) per query row: the keys row i sees, i + S - T - wl <= j <= i + S - T + wr (-1: no
    limit; the launcher sets wr = 0 under causal), key_lo[b, i] <= j < key_hi[b, i] (strides 0: one
    unbounded span for every row), 0 <= j < S. Rows >= T get an empty span. sp = (klo_ptr, khi_ptr,
    skl_b, skl_t, wl, wr)."""
    klo_ptr, khi_ptr, skl_b, skl_t, wl, wr = sp
    diag = rows + S - T
    lo = tl.where(wl >= 0, diag - wl, 0)
    hi = tl.where(wr >= 0, diag + wr + 1, S)
    ok = rows < T
    offs = b.to(tl.int64) * skl_b + rows * skl_t
    lo = tl.maximum(tl.maximum(lo, tl.load(klo_ptr + offs, mask=ok, other=0)), 0)
    hi = tl.minimum(tl.minimum(hi, tl.load(khi_ptr + offs, mask=ok, other=0)), S)
    return lo, hi


@triton.jit
def span_blocks(lo, hi, ok, S, BLOCK_N: tl.constexpr):
    """(first, mid, mid2, last) for a query block whose rows (ok) see [lo, hi): key blocks start
    in [first, last) where some row sees a key; [mid, mid2), whole key blocks, every row sees in
    full (unmasked); first <= mid <= mid2 <= last, all multiples of BLOCK_N but last."""
    seen = ok & (lo < hi)
    first = tl.min(tl.where(seen, lo, S), 0) // BLOCK_N * BLOCK_N
    last = tl.max(tl.where(seen, hi, 0), 0)
    mid = tl.cdiv(tl.max(tl.where(ok, lo, 0), 0), BLOCK_N) * BLOCK_N
    mid2 = tl.min(tl.where(ok, hi, S), 0) // BLOCK_N * BLOCK_N
    whole = mid < mid2  # false when some row is empty (its lo >= hi bounds both)
    return first, tl.where(whole, mid, first), tl.where(whole, mid2, first), last


@triton.jit
def query_range(n0, kend, T, S, b, sp, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """(first, mid, mid2, last) for the key block [n0, kend): query rows [first, last) hold every
    row that sees one of its keys; rows [mid, mid2), whole query blocks, see all of them (none
    when such rows are not contiguous). One pass over the rows the window allows, CHUNK at once."""
    wl, wr = sp[4], sp[5]
    r0 = tl.where(wr >= 0, tl.maximum(n0 - (S - T) - wr, 0), 0)
    r1 = tl.where(wl >= 0, tl.minimum(kend - (S - T) + wl, T), T)
    first, last, ffirst, flast, nfull = T, r0 * 0, T, r0 * 0, r0 * 0
    while r0 < r1:
        rows = r0 + tl.arange(0, CHUNK)
        lo, hi = row_spans(rows, T, S, b, sp)
        ok = rows < r1
        hit = ok & (lo < kend) & (hi > n0) & (lo < hi)
        full = ok & (lo <= n0) & (hi >= kend)
        first = tl.minimum(first, tl.min(tl.where(hit, rows, T), 0))
        last = tl.maximum(last, tl.max(tl.where(hit, rows + 1, 0), 0))
        ffirst = tl.minimum(ffirst, tl.min(tl.where(full, rows, T), 0))
        flast = tl.maximum(flast, tl.max(tl.where(full, rows + 1, 0), 0))
        nfull += tl.sum(full.to(tl.int32), 0)
        r0 += CHUNK
    first = tl.minimum(first, last) // BLOCK_M * BLOCK_M
    mid, mid2 = tl.cdiv(ffirst, BLOCK_M) * BLOCK_M, flast // BLOCK_M * BLOCK_M
    whole = (mid < mid2) & (nfull == flast - ffirst)
    return first, tl.where(whole, mid, first), tl.where(whole, mid2, first), last
