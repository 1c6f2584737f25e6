"""Benchmark cases for genkern.flash_attention: softmax(scale * q k^T) v without the score matrix.

Size labels (case names and `--sizes`): "BxHxTxD-causal" or "BxHxTxD-full", then
optionally "-kvN" (N key/value heads, grouped-query attention; N divides H) and a
dtype "-fp32" (the default, never written in a name) | "-bf16" | "-fp16" | "-fp64".
E.g. "1x8x2048x64-causal", "1x8x2048x64-causal-kv2", "16x16x1024x128-causal-bf16".
q is (B, H, T, D); k and v are (B, N, T, D). Queries and keys have one length T, so
genkern's causal mask (bottom-right aligned) and sdpa's is_causal (top-left) agree.

Impls: "torch" is the plain-PyTorch baseline genkern.bench.baselines.attention (4-D matmuls
with the grouped-query heads folded into rows, the scale folded into q, the causal mask
applied in place, softmax, matmul), the fast impl, SDPA
(torch.nn.functional.scaled_dot_product_attention, with enable_gqa when N < H; it picks its
own fused kernel on CPU and CUDA) and COMPILE: torch.compile of the baseline.

Flops (the FlashAttention benchmarks' accounting): the forward is two matmuls, q k^T
and P v, of 2*B*H*T*S*D flops each: fwd = 4*B*H*T*S*D (S = T here). The backward is
five (q k^T recomputed, dP = dO v^T, dV = P^T dO, dQ = dS k, dK = dS^T q):
bwd = 2.5 * fwd, fwd+bwd = 3.5 * fwd. Causal counts half (the masked half is skipped;
exactly it is T(T+1)/2 of T^2 pairs). Softmax and masking are not counted. Every impl
is credited with the same flops, the problem's work rather than its own (the plain
version also computes the masked half, and does not recompute in its backward), so
TFLOP/s ranks impls as their times do.

Memory: peak bytes per call, measured as genkern.bench.memory describes. The guard's
estimate for the plain version (and its torch.compile) is 2.25 (fwd), 5.25 (bwd with its
retained graph) or 4.25 (fwd+bwd) score matrices of B*H*T*S elements of the inputs' dtype,
as measured on CPU for float32 and bfloat16 (scores, probabilities, their gradients).
The fused kernels and sdpa need O(B*H*T*D): never guarded.
"""

from __future__ import annotations

import re

import torch

from genkern.bench import COMPILE, SDPA, Case, Target, baselines

OP = "attention"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
_SUFFIX = {dtype: name for name, dtype in DTYPES.items()}
_LABEL = re.compile(r"(\d+)x(\d+)x(\d+)x(\d+)-(causal|full)(?:-kv(\d+))?(?:-(fp32|bf16|fp16|fp64))?")
_FLOPS_PER_FWD = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
_SCORES_HELD = {"fwd": 2.25, "bwd": 5.25, "fwd+bwd": 4.25}  # plain version: score matrices at once


class AttentionCase(Case):
    """q (B, H, T, D), k and v (B, Hkv, T, D); output (B, H, T, D)."""

    op = OP
    bound = "matmul"
    grad_inputs = ("q", "k", "v")
    baselines = (SDPA,)

    def __init__(
        self,
        B: int,
        H: int,
        T: int,
        D: int,
        causal: bool = True,
        kv_heads: int | None = None,
        dtype=torch.float32,
        targets=(),
        quick=False,
        devices=("cpu", "cuda"),
    ):
        kv_heads = H if kv_heads is None else kv_heads
        if min(B, H, T, D, kv_heads) < 1 or H % kv_heads:
            raise ValueError(
                f"attention cases need B, H, T, D >= 1 and kv heads dividing H, "
                f"got B={B} H={H} T={T} D={D} kv={kv_heads}"
            )
        super().__init__({"B": B, "H": H, "Hkv": kv_heads, "T": T, "D": D}, dtype, targets, quick, devices)
        self.causal = bool(causal)

    @property
    def name(self) -> str:
        s = self.sizes
        kv = f"-kv{s['Hkv']}" if s["Hkv"] != s["H"] else ""
        dtype = f"-{_SUFFIX[self.dtype]}" if self.dtype != torch.float32 else ""
        return f"{s['B']}x{s['H']}x{s['T']}x{s['D']}-{'causal' if self.causal else 'full'}{kv}{dtype}"

    def make_inputs(self, device) -> dict:
        s = self.sizes
        q = torch.randn(s["B"], s["H"], s["T"], s["D"], device=device, dtype=self.dtype)
        k = torch.randn(s["B"], s["Hkv"], s["T"], s["D"], device=device, dtype=self.dtype)
        v = torch.randn(s["B"], s["Hkv"], s["T"], s["D"], device=device, dtype=self.dtype)
        return {"q": q, "k": k, "v": v}

    def impl_fn(self, impl: str):
        causal = self.causal
        if impl == SDPA:
            from genkern.functional import _TORCH_SDPA as sdpa  # torch's own, even under genkern.patch()

            gqa = {"enable_gqa": True} if self.sizes["Hkv"] != self.sizes["H"] else {}
            return lambda x: (sdpa(x["q"], x["k"], x["v"], is_causal=causal, **gqa),)
        if impl in ("torch", COMPILE):
            fn = baselines.attention
            fn = torch.compile(fn, dynamic=False) if impl == COMPILE else fn
            return lambda x: (fn(x["q"], x["k"], x["v"], causal),)
        from genkern.ops.attention import flash_attention

        return lambda x: (flash_attention(x["q"], x["k"], x["v"], causal=causal, impl=impl),)

    def flops(self, direction: str) -> int:
        s = self.sizes
        fwd = 4 * s["B"] * s["H"] * s["T"] * s["T"] * s["D"] // (2 if self.causal else 1)
        return int(fwd * _FLOPS_PER_FWD[direction])

    def bytes_moved(self, direction: str) -> int:
        # fwd: read q, k, v; write out and the float32 lse. bwd: read q, k, v, out, d_out and lse;
        # write dq, dk, dv. fwd+bwd: both (out and lse go through memory between the two).
        s, size = self.sizes, torch.empty((), dtype=self.dtype).element_size()
        nq, nkv, lse = s["B"] * s["H"] * s["T"] * s["D"], s["B"] * s["Hkv"] * s["T"] * s["D"], s["B"] * s["H"] * s["T"]
        fwd = (2 * nq + 2 * nkv) * size + 4 * lse
        bwd = (4 * nq + 4 * nkv) * size + 4 * lse
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction]

    def memory_needed(self, impl: str, direction: str) -> int | None:
        if impl not in ("torch", COMPILE):
            return None
        s = self.sizes
        score_bytes = s["B"] * s["H"] * s["T"] * s["T"] * torch.empty((), dtype=self.dtype).element_size()
        return int(_SCORES_HELD[direction] * score_bytes)


def make_case(label: str) -> AttentionCase:
    """A case from a label "BxHxTxD-causal|full[-kvN][-fp32|-bf16|-fp16|-fp64]", with no targets."""
    m = _LABEL.fullmatch(label.strip().lower())
    try:
        if m is None:
            raise ValueError
        B, H, T, D = (int(v) for v in m.group(1, 2, 3, 4))
        kv = int(m.group(6)) if m.group(6) else None
        return AttentionCase(B, H, T, D, causal=m.group(5) == "causal", kv_heads=kv, dtype=DTYPES[m.group(7) or "fp32"])
    except ValueError:
        raise ValueError(
            f"attention sizes are 'BxHxTxD-causal|full[-kvN][-bf16|-fp16|-fp64]' with N dividing H "
            f"(e.g. 1x8x2048x64-causal, 1x8x2048x64-full-kv2), got {label!r}"
        ) from None


_FB = "fwd+bwd"
# CPU, float32, 1x8x2048x64 causal: the fused fwd+bwd beats the plain version 4x and sdpa; its fwd beats sdpa.
CPU_TARGETS = (
    Target("cpu", _FB, "speedup", 4.0),
    Target("cpu", _FB, "speedup", 1.0, vs=SDPA),
    Target("cpu", "fwd", "speedup", 1.0, vs=SDPA),
)
# CPU, bfloat16: ahead of SDPA's bfloat16 (which runs the bf16 matrix instructions on AMX machines).
CPU_LOWP_TARGETS = (Target("cpu", "fwd", "speedup", 1.5, vs=SDPA), Target("cpu", _FB, "speedup", 1.5, vs=SDPA))
GPU_TARGETS = (Target("cuda", "fwd", "speedup", 1.0, vs=SDPA), Target("cuda", "bwd", "speedup", 1.0, vs=SDPA))
# GPU sizes as in the FlashAttention benchmarks: B * T = 16k tokens and H * D = 2048, so every
# case does about the same work per token; bfloat16 and float16, D = 64 (H = 32) and 128 (H = 16).
GPU_SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
GPU_TOKENS, GPU_WIDTH, GPU_HEAD_DIMS = 16384, 2048, (64, 128)
GPU_DTYPES = (torch.bfloat16, torch.float16)


def _cases():
    cpu = ("cpu",)
    cases = [
        AttentionCase(1, 2, 128, 32, causal=True, quick=True),
        AttentionCase(1, 4, 128, 32, causal=False, kv_heads=2, quick=True),
        AttentionCase(1, 8, 2048, 64, causal=True, targets=CPU_TARGETS, devices=cpu),
        # bfloat16 on the CPU's matrix instructions where it has them (AMX, AVX512-BF16)
        AttentionCase(1, 8, 2048, 64, causal=True, dtype=torch.bfloat16, targets=CPU_LOWP_TARGETS, devices=cpu),
        AttentionCase(1, 8, 2048, 64, causal=False, devices=cpu),
        # Long context: the fused op runs in O(T * D); the plain version needs 2 GiB per score matrix.
        AttentionCase(1, 8, 8192, 64, causal=True, devices=cpu),
    ]
    for dtype in GPU_DTYPES:
        for d in GPU_HEAD_DIMS:
            for t in GPU_SEQ_LENS:
                for causal in (True, False):
                    targets = GPU_TARGETS if causal else ()
                    sizes = (GPU_TOKENS // t, GPU_WIDTH // d, t, d)
                    cases.append(AttentionCase(*sizes, causal, dtype=dtype, targets=targets, devices=("cuda",)))
    return cases


CASES = _cases()
DEFAULT = {"cpu": ("1x8x2048x64-causal", "1x8x2048x64-causal-bf16"), "cuda": ("4x16x4096x128-causal-bf16",)}
