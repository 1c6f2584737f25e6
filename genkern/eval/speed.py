"""Generation and training speed, measured the same way for every model family.

Sampling is timed through a sampler `(model, n, generator) -> samples`: by default the
model's own (genkern.eval.sampling.draw_samples, what `genkern sample` and the trainer
call), or a training family's `samples`. A VAE or a GAN draws a batch in one decoder
pass, an autoregressive model needs one pass per pixel. Runs are warmed up first (allocator, kernels, caches)
and, on a GPU, bracketed by synchronisation so the time covers the work, not the launch.
"""

from __future__ import annotations

import time

import torch

from genkern.eval.sampling import sampler_for


def _sampler(family, model):
    """The callable (model, n, generator) -> samples that `family` names or is."""
    if isinstance(family, str):
        return sampler_for(family, model)
    sample = getattr(family, "samples", family)  # a training family: its samples method
    if not callable(sample):
        raise TypeError(
            f"family must be a family name, a sampler (model, n, generator) -> samples or an "
            f"object with such a samples method, got {type(family).__name__}"
        )
    return sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_samples(family, model, n: int, *, seed: int = 0, device=None) -> tuple:
    """Draws n samples once, timed: (samples, seconds). No warm-up (see sampling_speed).

    The noise comes from a CPU generator seeded with `seed` (the trainer's convention).
    """
    sample = _sampler(family, model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        start = time.perf_counter()
        samples = sample(model, n, gen)
        _sync(device)
        return samples, time.perf_counter() - start
    finally:
        model.train(was_training)


def sampling_speed(
    family, model, n: int = 1000, *, device=None, repeats: int = 3, warmup: int = 1, seed: int = 0
) -> float:
    """Samples per second of drawing n samples of `model`: the median of `repeats` timed runs
    after `warmup` untimed ones.

    Args:
        family: a family name ("vae", "gan", "transformer", "rnn": the model's own sampler), a
            callable (model, n, generator) -> samples, or an object with such a `samples` method
            (a genkern.train family).
        model: the family's model, on the device it samples on.
        n: samples per run (one batch).
        device: the device to synchronise (default: the model's).
    """
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for i in range(warmup):
        timed_samples(family, model, n, seed=seed + i, device=device)
    times = sorted(timed_samples(family, model, n, seed=seed + warmup + i, device=device)[1] for i in range(repeats))
    return n / max(times[len(times) // 2], 1e-9)


def training_speed(run) -> float:
    """Optimizer steps per second of a training run, from its logged step times.

    Args:
        run: a TrainResult, its `summary` (uses median_step_ms) or its `history` (the rows'
            step_ms, each the mean over its logging window; their median). Evaluation and
            checkpointing are not training time and are not counted.
    """
    if hasattr(run, "summary") and hasattr(run, "history"):
        run = run.summary
    if isinstance(run, dict):
        ms = run.get("median_step_ms")
        if ms is None:
            raise ValueError("run: the summary has no median_step_ms (did the run take any steps?)")
    elif isinstance(run, (list, tuple)):
        times = sorted(row["step_ms"] for row in run if isinstance(row, dict) and "step_ms" in row)
        if not times:
            raise ValueError("run: the history has no rows with step_ms")
        ms = times[len(times) // 2]
    else:
        raise TypeError(
            f"run must be a TrainResult, its summary (dict) or its history (list), got {type(run).__name__}"
        )
    if not ms > 0:
        raise ValueError(f"run: the step time must be positive, got {ms!r} ms")
    return 1e3 / ms
