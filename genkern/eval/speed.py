"""Generation and training speed, measured the same way for every model family.

Sampling is timed through the family's own `samples` (what `genkern sample` and the
trainer call): a VAE or a GAN draws a batch in one decoder pass, an autoregressive
model needs one pass per pixel. Runs are warmed up first (allocator, kernels, caches)
and, on a GPU, bracketed by synchronisation so the time covers the work, not the launch.
"""
from __future__ import annotations

import time

import torch


def _family(family):
    from genkern.train.families import Family, get_family
    if isinstance(family, str):
        return get_family(family)
    if not isinstance(family, Family):
        raise TypeError(f"family must be a family name or a genkern Family, got {type(family).__name__}")
    return family


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_samples(family, model, n: int, *, seed: int = 0, device=None) -> tuple:
    """Draws n samples once, timed: (samples, seconds). No warm-up (see sampling_speed).

    The noise comes from a CPU generator seeded with `seed` (the trainer's convention).
    """
    fam = _family(family)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        _sync(device)
        start = time.perf_counter()
        samples = fam.samples(model, n, gen)
        _sync(device)
        return samples, time.perf_counter() - start
    finally:
        model.train(was_training)


def sampling_speed(family, model, n: int = 1000, *, device=None, repeats: int = 3, warmup: int = 1,
                   seed: int = 0) -> float:
    """Samples per second of family.samples(model, n, ...): the median of `repeats` timed runs
    after `warmup` untimed ones.

    Args:
        family: a family name ("vae", "gan", "transformer", "rnn") or a genkern Family.
        model: the family's model, on the device it samples on.
        n: samples per run (one batch).
        device: the device to synchronise (default: the model's).
    """
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for i in range(warmup):
        timed_samples(family, model, n, seed=seed + i, device=device)
    times = sorted(timed_samples(family, model, n, seed=seed + warmup + i, device=device)[1]
                   for i in range(repeats))
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
        raise TypeError(f"run must be a TrainResult, its summary (dict) or its history (list), "
                        f"got {type(run).__name__}")
    if not ms > 0:
        raise ValueError(f"run: the step time must be positive, got {ms!r} ms")
    return 1e3 / ms
