"""Benchmark cases for genkern.reparameterize_kl (eps drawn inside, standard prior).

Impls: "torch" is the plain-PyTorch baseline genkern.bench.baselines.reparameterize_kl (noise
from torch.randn_like, the standard prior's KL without zero passes), the fast impl, and
COMPILE: torch.compile of that baseline.
"""

from __future__ import annotations

import torch

from genkern.bench import COMPILE, Case, Target, baselines

OP = "reparameterize_kl"


class ReparamKLCase(Case):
    """mu, logvar of shape (B, D); outputs z (B, D) and kl (B,)."""

    op = OP
    grad_inputs = ("mu", "logvar")

    def __init__(self, B: int, D: int, dtype=torch.float32, targets=(), quick=False, devices=("cpu", "cuda")):
        super().__init__({"B": B, "D": D}, dtype, targets, quick, devices)

    def make_inputs(self, device) -> dict:
        shape = (self.sizes["B"], self.sizes["D"])
        # logvar around 0 keeps exp() in range, as in a trained VAE encoder.
        mu = torch.randn(shape, device=device, dtype=self.dtype)
        logvar = 0.5 * torch.randn(shape, device=device, dtype=self.dtype)
        return {"mu": mu, "logvar": logvar}

    def impl_fn(self, impl: str):
        if impl in ("torch", COMPILE):
            fn = baselines.reparameterize_kl
            fn = torch.compile(fn, dynamic=False) if impl == COMPILE else fn
            return lambda x: fn(x["mu"], x["logvar"])
        from genkern.ops.reparam_kl import reparameterize_kl

        return lambda x: reparameterize_kl(x["mu"], x["logvar"], impl=impl)

    def bytes_moved(self, direction: str) -> int:
        # fwd: read mu, logvar; write z, kl.  bwd: read grad_z, grad_kl, mu,
        # logvar; write grad_mu, grad_logvar. The in-kernel noise is never stored.
        n, b = self.sizes["B"] * self.sizes["D"], self.sizes["B"]
        elems = {"fwd": 3 * n + b, "bwd": 5 * n + b}
        elems["fwd+bwd"] = elems["fwd"] + elems["bwd"]
        return elems[direction] * torch.empty((), dtype=self.dtype).element_size()


def make_case(label: str) -> ReparamKLCase:
    """A case of any size, from a label "BxD" (e.g. "8x16"), with no targets."""
    try:
        B, D = (int(v) for v in label.lower().split("x"))
    except ValueError:
        raise ValueError(f"reparameterize_kl sizes are 'BxD' (e.g. 4096x1024), got {label!r}") from None
    return ReparamKLCase(B, D)


_FB = "fwd+bwd"


def _cpu_targets(speedup: float | None):
    vs_compile = [Target("cpu", _FB, "speedup", 1.0, vs=COMPILE)]
    return ([Target("cpu", _FB, "speedup", speedup)] if speedup else []) + vs_compile


_GPU = [Target("cuda", _FB, "copy_bw", 0.8), Target("cuda", _FB, "speedup", 1.0, vs=COMPILE)]

CASES = [
    ReparamKLCase(256, 64, targets=_cpu_targets(1.5), quick=True),
    ReparamKLCase(4096, 1024, targets=_cpu_targets(4.0)),
    ReparamKLCase(65536, 512, targets=_cpu_targets(None) + [Target("cuda", _FB, "copy_bw", 0.8)]),
]
# The GPU suite: 1M, 16M and 64M elements (with 65536x512, 32M, above), against copy bandwidth and torch.compile.
GPU_SIZES = ((1024, 1024), (8192, 2048), (65536, 1024))
GPU_CASES = [ReparamKLCase(b, d, targets=_GPU, devices=("cuda",)) for b, d in GPU_SIZES]
DEFAULT = {"cpu": ("4096x1024",), "cuda": ("8192x2048",)}
