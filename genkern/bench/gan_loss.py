"""Benchmark cases for the fused GAN losses (genkern.discriminator_loss / genkern.generator_loss).

One case per (loss, kind, logits shape): the discriminator loss of every kind and the
generator loss of the nonsaturating and relativistic kinds, reduction "mean", on logits of
shape (B, 1) for B = 64, 256, 4096, 2^20 and on PatchGAN maps (64, 1, 30, 30); real and
fake logits of one shape. Case names read "<d|g>-<kind>-<shape>", e.g. "d-hinge-256x1",
and `--sizes` takes any such label.

Impls: "torch" is the plain-PyTorch baseline genkern.bench.baselines.discriminator_loss /
generator_loss (torch.nn.functional's softplus and relu, means, constants on the 0-d means),
the fast impl, and COMPILE: torch.compile of that baseline.
"""

from __future__ import annotations

import math

import torch

from genkern.bench import COMPILE, Case, Target, baselines
from genkern.reference.gan_loss import KINDS as _KINDS

OP = "gan_loss"
LOSSES = {"d": "discriminator_loss", "g": "generator_loss"}


class GANLossCase(Case):
    """Real and fake logits of `shape`; output: the 0-d loss ("mean")."""

    op = OP

    def __init__(
        self, loss: str, kind: str, shape, dtype=torch.float32, targets=(), quick=False, devices=("cpu", "cuda")
    ):
        if loss not in LOSSES or kind not in _KINDS:
            raise ValueError(f"gan_loss cases are d|g and one of {', '.join(_KINDS)}, got {loss!r}, {kind!r}")
        shape = tuple(int(s) for s in shape)
        if not 1 <= len(shape) <= 4 or any(s < 1 for s in shape):
            raise ValueError(f"gan_loss logits are (B,), (B, C), (B, C, H) or (B, C, H, W), got {shape}")
        super().__init__(dict(zip("BCHW", shape)), dtype, targets, quick, devices)
        self.loss, self.kind, self.shape = loss, kind, shape
        self.uses_real = loss == "d" or kind == "relativistic"
        # The generator's non-relativistic losses do not read the real logits (no gradient either).
        self.grad_inputs = ("real", "fake") if self.uses_real else ("fake",)

    @property
    def name(self) -> str:
        return f"{self.loss}-{self.kind}-{'x'.join(map(str, self.shape))}"

    def make_inputs(self, device) -> dict:
        # Logits of a discriminator in training: real ones mostly positive, fake ones mostly negative.
        real = torch.randn(self.shape, device=device, dtype=self.dtype) * 2 + 1
        fake = torch.randn(self.shape, device=device, dtype=self.dtype) * 2 - 1
        return {"real": real, "fake": fake}

    def _baseline(self):
        kind, real_used = self.kind, self.uses_real
        if self.loss == "d":
            return lambda real, fake: baselines.discriminator_loss(real, fake, kind)
        return lambda real, fake: baselines.generator_loss(fake, kind, real if real_used else None)

    def impl_fn(self, impl: str):
        if impl in ("torch", COMPILE):
            fn = self._baseline()
            fn = torch.compile(fn, dynamic=False) if impl == COMPILE else fn
            return lambda x: (fn(x["real"], x["fake"]),)
        from genkern.ops import gan_loss as ops

        loss, kind = getattr(ops, LOSSES[self.loss]), self.kind
        if self.loss == "d":
            return lambda x: (loss(x["real"], x["fake"], kind, impl=impl),)
        real_used = self.uses_real
        return lambda x: (loss(x["fake"], kind, real_logits=x["real"] if real_used else None, impl=impl),)

    def const_grads(self) -> tuple:
        """(real, fake): whether that side's gradient is one constant for every logit (the linear
        terms: wasserstein, the generator's hinge), which a fused kernel never writes per element."""
        linear = ("wasserstein",) if self.loss == "d" else ("wasserstein", "hinge")
        return self.kind in linear, self.kind in linear

    def bytes_moved(self, direction: str) -> int:
        # fwd: read the logits the loss uses (the loss is 0-d). bwd: per logit with a per-element
        # gradient, read it (the logits, or a saved gradient of their size) and write the gradient;
        # a constant gradient is a 0-d value handed out broadcast, so nothing per element.
        # fwd+bwd: a fused kernel reads the logits once and writes the per-element gradients once.
        # The relativistic means need a second read unless the logits stay in cache; not counted.
        n = math.prod(self.shape)
        sides = (self.uses_real, True)  # (real, fake) read by the loss
        read = n * sum(sides)
        grads = n * sum(used and not const for used, const in zip(sides, self.const_grads()))
        elems = {"fwd": read, "bwd": 2 * grads, "fwd+bwd": read + grads}[direction]
        return elems * torch.empty((), dtype=self.dtype).element_size()


def make_case(label: str) -> GANLossCase:
    """A case from a label "<d|g>-<kind>-<dims>" (e.g. "d-hinge-256x1", "g-relativistic-8x1x30x30")."""
    parts = label.lower().split("-")
    try:
        loss, kind, dims = parts
        shape = tuple(int(v) for v in dims.split("x"))
        return GANLossCase(loss, kind, shape)
    except ValueError:
        raise ValueError(
            f"gan_loss sizes are '<d|g>-<kind>-<dims>' with kind one of {', '.join(_KINDS)} "
            f"(e.g. d-hinge-256x1, g-relativistic-64x1x30x30), got {label!r}"
        ) from None


_FB = "fwd+bwd"
SHAPES = [(64, 1), (256, 1), (4096, 1), (1 << 20, 1), (64, 1, 30, 30)]


def _targets(shape):
    targets = [Target("cuda", _FB, "speedup", 3.0), Target("cuda", _FB, "speedup", 1.0, vs=COMPILE)]
    if shape == (1 << 20, 1):
        targets.append(Target("cpu", _FB, "speedup", 3.0))
    elif shape in ((256, 1), (64, 1, 30, 30)):
        targets.append(Target("cpu", _FB, "speedup", 2.0))
    return targets


def _cases():
    variants = [("d", k) for k in _KINDS] + [("g", "nonsaturating"), ("g", "relativistic")]
    return [
        GANLossCase(
            loss,
            kind,
            shape,
            targets=_targets(shape),
            quick=shape == (256, 1) and (loss, kind) == ("d", "nonsaturating"),
        )
        for loss, kind in variants
        for shape in SHAPES
    ]


CASES = _cases()
# The GPU suite adds 16M and 64M logits per side (1M is in CASES) for three common losses, CUDA only.
GPU_SHAPES = [(1 << 24, 1), (1 << 26, 1)]
GPU_CASES = [
    GANLossCase(loss, kind, shape, targets=_targets(shape), devices=("cuda",))
    for loss, kind in (("d", "nonsaturating"), ("d", "hinge"), ("g", "nonsaturating"))
    for shape in GPU_SHAPES
]
DEFAULT = {"cpu": ("d-nonsaturating-1048576x1",), "cuda": ("d-nonsaturating-16777216x1",)}
