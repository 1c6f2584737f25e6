"""What the Triton kernel modules share: the interpreter switch, compile-time constants the kernels
read, the dtype check, the row-stride promise of the attention-shaped launchers, the autotune wrapper.

Triton resolves a kernel's globals in the module that defines it: a kernel module imports the
constants and helpers it uses into its own namespace (`from genkern.triton._common import DOT_PRECISION`),
and they stay usable inside its kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
BLOCK_DS = (16, 32, 64, 128, 256)  # BLOCK_D = next power of two >= D, D in 16..256, D % 8 == 0
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what every Triton kernel takes
INTERPRETED = bool(triton.knobs.runtime.interpret)

# The interpreter (numpy 2) cannot take a runtime bound in range(); compiled code needs range()
# for software pipelining (num_stages). The block loops branch on this at compile time.
WHILE_LOOPS = tl.constexpr(INTERPRETED)
# float32 inputs: exact products, like torch.matmul's default (tf32 would cost ~1e-3 relative).
DOT_PRECISION = tl.constexpr("ieee")


@triton.jit
def split_nonfinite(x, keys):
    """(x with its inf/NaN entries zeroed, first, val) for a (keys, D) tile x: per column, the
    first of `keys` whose row holds an inf/NaN there (2^30 when none) and that value. tl.dot(p, x)
    with p = 0 at a masked key would turn its inf/NaN into NaN for every row (0 * NaN = NaN):
    the caller multiplies the finite part and puts the value back only into the rows that see
    `first` (with causal masks a row sees a prefix of the keys: any of them, then the first)."""
    finite = tl.abs(x) < float("inf")
    first = tl.min(tl.where(finite, 1 << 30, keys[:, None]), 0)
    val = tl.sum(tl.where(keys[:, None] == first[None, :], x, 0.0), 0)
    return tl.where(finite, x, 0.0), first, val


def check_dtype(name: str, t: torch.Tensor, op: str) -> None:
    """TypeError unless t is float16, bfloat16 or float32 (the kernels compute in float32 from those)."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: the Triton {op} kernels take float16, bfloat16 or float32, got {t.dtype}")


def rows8(t, max_row_stride=None):
    """(t, its dim 0-2 strides in units of 8 elements) of a 4-d tensor; a copy when the last dim is
    not unit-stride or a stride is not a multiple of 8 (the kernels' alignment promise), or when the
    dim-2 stride reaches max_row_stride (a kernel computing tile offsets in int32). Size-1 dims get
    stride 0."""
    if (
        t.stride(3) != 1
        or any(t.shape[i] > 1 and t.stride(i) % 8 for i in range(3))
        or (max_row_stride is not None and t.stride(2) >= max_row_stride)
    ):
        t = t.contiguous()
    return t, [t.stride(i) // 8 if t.shape[i] > 1 else 0 for i in range(3)]


def autotune(per_d, cfg, interpreter_config, key, prune):
    """A triton.autotune decorator over the union of per_d's candidates ({BLOCK_D: [tuple]}), each
    made a triton.Config by cfg, keyed on `key`; prune (triton's early_config_prune) keeps those of
    the launch's BLOCK_D. Under the interpreter: interpreter_config alone, no key (nothing to time)."""
    if INTERPRETED:
        return triton.autotune([cfg(interpreter_config)], key=[])
    union = sorted({c for configs in per_d.values() for c in configs})
    return triton.autotune([cfg(c) for c in union], key=key, prune_configs_by={"early_config_prune": prune})
