"""What the trainer needs to know about each model family: the `Family` base.

A family builds its model from a config dict, names its optimizers, draws the
noise of one training step, runs that step, evaluates and draws samples. The
trainer owns everything else (data order, checkpoints, logging, distribution).

Every random number a step uses comes from the step's generator and is drawn
for the whole global batch, then sliced to this process's shard: a sharded
run and a single-process run on the same global batch see the same noise.
"""

from __future__ import annotations

import torch

from genkern.data.base import Dataset
from genkern.eval.quality import digit_quality
from genkern.eval.sampling import draw_samples
from genkern.train import plots
from genkern.train.batches import batch_indices


class Family:
    """Base: subclasses set `name`, the model classes and the hyperparameter defaults."""

    name = ""
    lr = 1e-3
    betas = (0.9, 0.999)
    batch_size = 128

    def model_config(self, overrides: dict, data: Dataset) -> dict:
        """The full model config (a JSON-safe dict) for `data`, with `overrides` applied."""
        raise NotImplementedError

    def build(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError

    def check_data(self, model, data: Dataset, what: str) -> None:
        shape = tuple(model.config.data_shape)
        if data.x.dim() != len(shape) + 1 or tuple(data.x.shape[1:]) != shape:
            raise ValueError(
                f"{what} must hold samples of shape {shape} (the model's data_shape), "
                f"got a tensor of shape {tuple(data.x.shape)}"
            )
        if not data.x.is_floating_point():
            raise ValueError(f"{what} must be a floating tensor, got {data.x.dtype}")
        if not torch.isfinite(data.x).all():
            raise ValueError(f"{what} holds NaN or infinite values")

    def optimizers(self, model, lr: float, betas) -> dict:
        return {"model": adam(model.parameters(), lr, betas)}

    def num_examples(self, data) -> int:
        return len(data.x)

    def batch(self, model, data, step: int, seed: int, batch_size: int) -> dict:
        """The global batch of `step` (CPU tensors whose first dim is the batch)."""
        return {"x": data.x[batch_indices(len(data.x), batch_size, seed, step)]}

    def noise(self, model, gen: torch.Generator, n: int) -> dict:
        return {}

    def step(self, net, model, opts: dict, batch: dict, noise: dict) -> dict:
        raise NotImplementedError

    def evaluate(self, model, test: Dataset | None, *, final: bool, seed: int) -> dict:
        return {}

    def samples(self, model, n: int, gen: torch.Generator) -> torch.Tensor:
        """n samples on the CPU, all noise drawn from the CPU generator `gen` (the model's own sampler)."""
        return draw_samples(model, n, gen)

    def plot(self, samples: torch.Tensor, data: Dataset, path, title: str) -> None:
        if samples.dim() == 4:
            plots.image_grid(samples, path, title=title)
        elif samples.dim() == 2 and samples.shape[1] == 2:
            plots.scatter(samples, None if data is None else data.x, path, title=title)


def build_model(fam: Family, model_config: dict, seed: int, impl: str | None, device) -> torch.nn.Module:
    """The family's model initialised from `seed` on the CPU (same weights on every device), then moved."""
    config = dict(model_config)
    if impl is not None:
        config["impl"] = impl
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = fam.build(config)
    return net.to(device)


def adam(params, lr: float, betas) -> torch.optim.Adam:
    """Adam with the fused update (one kernel for all parameters: small models spend much of a
    step in the optimizer otherwise); the same for every impl, so comparisons stay fair."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)


def eval_generator(seed: int) -> torch.Generator:
    """The generator of an evaluation's noise and samples: fixed by the run's seed, not the step."""
    return torch.Generator().manual_seed((10_007 * seed + 1) % 2**64)  # any int64 seed: torch takes < 2**64


def is_digits(data: Dataset | None) -> bool:
    return data is not None and data.name.startswith("digits")


def digit_scores(samples: torch.Tensor, test: Dataset) -> dict:
    """The logged digit-quality metrics of `samples` against the test digits."""
    q = digit_quality(samples, reference=test.x)
    return {
        "classes_covered": int(q["covered"]),
        "confidence": float(q["mean_confidence"]),
        "frechet": float(q["frechet"]),
    }
