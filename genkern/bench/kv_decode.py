"""Benchmark cases for genkern.attention_with_kvcache: one decoding step against a full cache.

Size labels (case names and `--sizes`): "BxHxSxD", then optionally "-kvN" (N key/value
heads, dividing H; default H) and a dtype "-fp32" (the default, never written in a
name) | "-bf16" | "-fp16" | "-fp64". E.g. "8x8x4096x64", "8x32x4096x64-kv8".
q is (B, H, 1, D); the caches are (B, N, S, D) with S - 1 positions filled in every row,
and the step appends one new key/value per row (k_new, v_new) and attends to all S.

Impls: "torch" is the plain-PyTorch baseline genkern.bench.baselines.attention_with_kvcache
(the append as an index copy, 4-D matmuls over the cache without copying K or V, the ragged
causal mask applied in place, softmax), the fast impl, COMPILE: torch.compile of that
baseline, and SDPA: the append as a slice copy, then
torch.nn.functional.scaled_dot_product_attention over the filled cache (every row has
one length here, which SDPA needs). Forward only: the op has no backward.

GB/s counts the bytes a decoding step must move: reading K and V over all S positions
(which dominates), reading q and the new key/value, writing them into the caches and
writing out. The CPU target reads at 80% of the device's measured read bandwidth.
"""

from __future__ import annotations

import re

import torch

from genkern.bench import COMPILE, SDPA, Case, Target, baselines

OP = "kv_decode"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_SUFFIX = {dtype: name for name, dtype in DTYPES.items()}
_LABEL = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)(?:-kv(\d+))?(?:-(fp32|bf16|fp16|fp64))?")


class KVDecodeCase(Case):
    """q (B, H, 1, D) against caches (B, Hkv, S, D) holding S - 1 positions, plus one new."""

    op = OP
    bound = "read"
    directions = ("fwd",)
    baselines = (SDPA,)

    def __init__(
        self,
        B: int,
        H: int,
        S: int,
        D: int,
        kv_heads: int | None = None,
        dtype=torch.float32,
        targets=(),
        quick=False,
        devices=("cpu", "cuda"),
    ):
        kv_heads = H if kv_heads is None else kv_heads
        if min(B, H, S, D, kv_heads) < 1 or H % kv_heads:
            raise ValueError(
                f"kv_decode cases need B, H, S, D >= 1 and kv heads dividing H, "
                f"got B={B} H={H} S={S} D={D} kv={kv_heads}"
            )
        super().__init__({"B": B, "H": H, "Hkv": kv_heads, "S": S, "D": D}, dtype, targets, quick, devices)

    @property
    def name(self) -> str:
        s = self.sizes
        kv = f"-kv{s['Hkv']}" if s["Hkv"] != s["H"] else ""
        dtype = f"-{_SUFFIX[self.dtype]}" if self.dtype != torch.float32 else ""
        return f"{s['B']}x{s['H']}x{s['S']}x{s['D']}{kv}{dtype}"

    def make_inputs(self, device) -> dict:
        s, kw = self.sizes, {"device": device, "dtype": self.dtype}
        b, hkv, n, d = s["B"], s["Hkv"], s["S"], s["D"]
        return {
            "q": torch.randn(b, s["H"], 1, d, **kw),
            "k_cache": torch.randn(b, hkv, n, d, **kw),
            "v_cache": torch.randn(b, hkv, n, d, **kw),
            "k_new": torch.randn(b, hkv, 1, d, **kw),
            "v_new": torch.randn(b, hkv, 1, d, **kw),
            "seqlens": torch.full((b,), n - 1, dtype=torch.int32, device=device),
        }

    def impl_fn(self, impl: str):
        if impl == SDPA:
            from genkern.functional import _TORCH_SDPA as sdpa  # torch's own, even under genkern.patch()

            gqa = {"enable_gqa": True} if self.sizes["Hkv"] != self.sizes["H"] else {}

            def run(x):
                x["k_cache"][:, :, -1:].copy_(x["k_new"])
                x["v_cache"][:, :, -1:].copy_(x["v_new"])
                return (sdpa(x["q"], x["k_cache"], x["v_cache"], **gqa),)

            return run
        if impl in ("torch", COMPILE):
            fn = baselines.attention_with_kvcache
            fn = torch.compile(fn, dynamic=False) if impl == COMPILE else fn
            return lambda x: (fn(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], x["k_new"], x["v_new"]),)
        from genkern.ops.kv_decode import attention_with_kvcache

        return lambda x: (
            attention_with_kvcache(x["q"], x["k_cache"], x["v_cache"], x["seqlens"], x["k_new"], x["v_new"], impl=impl),
        )

    def bytes_moved(self, direction: str) -> int:
        s, size = self.sizes, torch.empty((), dtype=self.dtype).element_size()
        kv_read = 2 * s["B"] * s["Hkv"] * s["S"] * s["D"]
        q_out = 2 * s["B"] * s["H"] * s["D"]
        new = 2 * 2 * s["B"] * s["Hkv"] * s["D"]  # read k_new/v_new, write them into the caches
        return (kv_read + q_out + new) * size


def make_case(label: str) -> KVDecodeCase:
    """A case from a label "BxHxSxD[-kvN][-fp32|-bf16|-fp16|-fp64]", with no targets."""
    m = _LABEL.fullmatch(label.strip().lower())
    try:
        if m is None:
            raise ValueError
        B, H, S, D = (int(v) for v in m.group(1, 2, 3, 4))
        kv = int(m.group(5)) if m.group(5) else None
        return KVDecodeCase(B, H, S, D, kv_heads=kv, dtype=DTYPES[m.group(6) or "fp32"])
    except ValueError:
        raise ValueError(
            f"kv_decode sizes are 'BxHxSxD[-kvN][-bf16|-fp16|-fp64]' with N dividing H "
            f"(e.g. 8x8x4096x64, 8x32x4096x64-kv8), got {label!r}"
        ) from None


_CPU_READ = (Target("cpu", "fwd", "read_bw", 0.8),)
_CPU_GQA = (Target("cpu", "fwd", "speedup", 1.5),)
_GPU = (Target("cuda", "fwd", "read_bw", 0.8), Target("cuda", "fwd", "speedup", 1.0, vs=SDPA))
GPU_BATCHES, GPU_CACHE_LENS = (1, 8, 64), (1024, 8192, 65536)


def _cases():
    cpu = ("cpu",)
    cases = [
        KVDecodeCase(2, 4, 128, 32, kv_heads=2, quick=True),
        KVDecodeCase(8, 8, 4096, 64, targets=_CPU_READ, devices=cpu),
        KVDecodeCase(8, 32, 4096, 64, kv_heads=8, targets=_CPU_GQA, devices=cpu),
        KVDecodeCase(32, 32, 1024, 64, kv_heads=8, devices=cpu),
        KVDecodeCase(1, 8, 8192, 64, kv_heads=1, devices=cpu),
    ]
    cases += [KVDecodeCase(1, 8, s, 64, devices=cpu) for s in (512, 2048, 8192, 32768)]
    # GPU: bfloat16, grouped-query (32 query heads on 8 key/value heads, D = 128), batch 1 to 64,
    # caches of 1k to 64k positions (the largest, 64 x 64k, holds 17 GB of K and V).
    for b in GPU_BATCHES:
        for s in GPU_CACHE_LENS:
            targets = _GPU if s >= 8192 else ()
            gqa = {"kv_heads": 8, "dtype": torch.bfloat16, "targets": targets, "devices": ("cuda",)}
            cases.append(KVDecodeCase(b, 32, s, 128, **gqa))
    return cases


CASES = _cases()
DEFAULT = {"cpu": ("8x8x4096x64",), "cuda": ("8x32x65536x128-kv8-bf16",)}
