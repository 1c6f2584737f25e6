"""End-to-end training steps: the models built on genkern's ops, default impl against plain PyTorch.

One "step" is what the trainer runs per batch (forward, backward, optimizer
update; for a GAN the discriminator and the generator updates and the EMA;
for the Transformer one batch of windows through its causal attention),
with the model's ops on the fast impl or on the plain-PyTorch baseline. Both
models start from the same weights and see the same batch and noise.

The "torch" impl is the model with impl="torch" (genkern.reference's ops) and,
for the Transformer, its attention on torch's SDPA
(genkern.bench.baseline_models.PlainSDPAAttention): a user's plain-PyTorch
Transformer attends with SDPA, not with a float64-safe spec. The VAE and the
GAN have no attention; their ops stay on impl="torch".
"""

from __future__ import annotations

import torch

from genkern.bench import Case, Target
from genkern.bench.baseline_models import use_plain_sdpa
from genkern.train.batches import load_data
from genkern.train.config import model_config
from genkern.train.families import get_family
from genkern.train.family import build_model

OP = "train_step"


class TrainStepCase(Case):
    """A family's model on a dataset's shape, one global batch of size B."""

    op = OP
    bound = None
    directions = ("step",)
    compiles = False

    def __init__(self, family: str, data: str, B: int, model: dict | None = None, targets=(), quick=False):
        super().__init__({"model": f"{family}-{data}", "B": B}, torch.float32, targets, quick)
        self.family, self.data, self.model = family, data, dict(model or {})

    def _setup(self):
        fam = get_family(self.family)
        train, _, _ = load_data(self.data)
        return fam, train, model_config(fam, self.model, train)

    def make_inputs(self, device) -> dict:
        fam, train, config = self._setup()
        model = build_model(fam, config, 0, "torch", "cpu")  # only for the batch's shape (LM windows)
        return {k: v.to(device) for k, v in fam.batch(model, train, 0, 0, self.sizes["B"]).items()}

    def impl_fn(self, impl: str):
        fam, _, config = self._setup()
        state = {}

        def step(inputs):
            if not state:  # built on first use, on the inputs' device
                device = next(iter(inputs.values())).device
                model = build_step_model(fam, config, impl, device)
                noise = fam.noise(model, torch.Generator().manual_seed(1), self.sizes["B"])
                state.update(
                    model=model,
                    opts=fam.optimizers(model, fam.lr, fam.betas),
                    noise={k: v.to(device) for k, v in noise.items()},
                )
            model = state["model"]
            out = fam.step(model, model, state["opts"], inputs, state["noise"])
            return tuple(out.values())

        return step

    def bytes_moved(self, direction: str) -> int:
        return 0


def build_step_model(fam, config: dict, impl: str, device) -> torch.nn.Module:
    """The family's model (seed 0) on `impl`; for "torch" the plain-PyTorch baseline (module docstring)."""
    model = build_model(fam, config, 0, impl, device)
    return use_plain_sdpa(model) if impl == "torch" else model  # a no-op without attention modules


_NEVER_SLOWER = (Target("cpu", "step", "speedup", 1.0), Target("cuda", "step", "speedup", 1.0))

CASES = [
    TrainStepCase("vae", "digits", 128, targets=_NEVER_SLOWER, quick=True),
    TrainStepCase("vae", "digits", 1024, targets=_NEVER_SLOWER),
    TrainStepCase("gan", "digits", 128, targets=_NEVER_SLOWER, quick=True),
    TrainStepCase("gan", "digits", 1024, targets=_NEVER_SLOWER),
    TrainStepCase("gan", "ring", 512, targets=_NEVER_SLOWER),
    # The Transformer trains through genkern.flash_attention (forward and backward); "torch" through SDPA.
    TrainStepCase("transformer", "digits", 64, targets=_NEVER_SLOWER, quick=True),
    TrainStepCase("transformer", "text", 32, targets=_NEVER_SLOWER),
]
# A default run times the Transformer's step (flash attention forward and backward inside).
DEFAULT = {"cpu": ("transformer-digitsx64",), "cuda": ("transformer-textx32",)}
