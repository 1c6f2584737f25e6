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
# Under the interpreter: one small config, unequal blocks so both tilings of the diagonal run.
INTERPRETER_CONFIGS = {
    "_attention_fwd_kernel": (32, 16, 4, 1),
    "_attention_bwd_dkdv_kernel": (16, 32, 4, 1),
    "_attention_bwd_dq_kernel": (32, 16, 4, 1),
}


def attention_autotune(name):
    """triton.autotune over CONFIGS[name] (pruned to the launch's BLOCK_D), keyed on the head
    counts, the head dim, the log2 buckets of T and S (not their exact values: a new prompt
    length must not rerun the benchmark) and causal; the dtypes join the key by themselves."""

    def cfg(c):
        return triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "STAGES": c[3]}, num_warps=c[2], num_stages=c[3])

    def prune(configs, named_args, **kwargs):
        d, f32, keys = kwargs["BLOCK_D"], named_args["q_ptr"].dtype == torch.float32, "dkdv" in name
        keep, out = set(CONFIGS[name][d]), {}
        for c in configs:
            bm, bn, w, st = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.kwargs["STAGES"]
            if (bm, bn, w, st) in keep:  # float32 tiles coincide (see tile_block): time each once
                out.setdefault((tile_block(bm, d, f32, keys), tile_block(bn, d, f32, keys), w, st), c)
        return list(out.values())

    return autotune(
        CONFIGS[name], cfg, INTERPRETER_CONFIGS[name], ["H", "group", "D8", "tune_t", "tune_s", "CAUSAL"], prune
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
def visible(rows, cols, S, diag, CAUSAL: tl.constexpr):
    """(len(rows), len(cols)) mask: key cols[j] < S that query rows[i] sees (j <= i + diag)."""
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
