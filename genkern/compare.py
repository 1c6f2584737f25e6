"""VAE vs GAN vs autoregressive Transformer on the 8x8 digits, under one training budget.

`genkern compare` trains the three families for the same number of steps on batches of the
same size, for several seeds, and measures each on the axes they are usually compared on:

- likelihood: bits/dim of the test digits (Transformer: exact; VAE: the ELBO and the
  importance-weighted bound, upper bounds on bits/dim; GAN: none, its density is implicit);
- sample quality: Fréchet distance and class coverage under the digit classifier (1000 samples);
- training stability: the spread over seeds of the final training loss and of the Fréchet distance;
- speed: training wall time and steps/s, and samples/s through each family's sampler.

Results go to `<out>/compare.json` and `<out>/samples.png`; `format_table` renders the report. The
runs are here; aggregation, the files and the table are in `genkern.compare_report`.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from genkern.compare_report import LOSS_KEY, LOSS_MEANING, aggregate, environment, format_table, write_report

__all__ = [
    "FAMILIES",
    "LOSS_KEY",
    "LOSS_MEANING",
    "N_PANEL",
    "N_QUALITY",
    "PRESETS",
    "Settings",
    "compare",
    "format_table",
    "settings_for",
]

FAMILIES = ("vae", "gan", "transformer")
N_QUALITY = 1000  # samples scored by the digit classifier, per run
N_PANEL = 64  # samples per family in samples.png


@dataclass
class Settings:
    """One training budget for every family, and the model sizes."""

    steps: int
    batch_size: int
    seeds: list
    num_samples: int  # K of the VAE's importance-weighted bound
    models: dict = field(default_factory=dict)
    preset: str = "default"


# Small enough for a 2-core CPU (default: ~2.5 min): a Transformer step costs ~15-25x an MLP step
# there, so its runs take most of the time. Large: for a GPU.
_SMALL = {
    "vae": {"hidden": 256, "depth": 2, "latent_dim": 16},
    "gan": {"hidden": 256, "depth": 2},
    "transformer": {"dim": 64, "n_layers": 2, "n_heads": 4},
}
_LARGE = {
    "vae": {"hidden": 512, "depth": 2, "latent_dim": 32},
    "gan": {"hidden": 512, "depth": 2},
    "transformer": {"dim": 128, "n_layers": 4, "n_heads": 4},
}
PRESETS = {
    "quick": Settings(steps=80, batch_size=32, seeds=[0, 1], num_samples=20, models=_SMALL, preset="quick"),
    "default": Settings(steps=1500, batch_size=64, seeds=[0, 1, 2], num_samples=100, models=_SMALL),
    "large": Settings(steps=3000, batch_size=128, seeds=[0, 1, 2], num_samples=100, models=_LARGE, preset="large"),
}


def settings_for(
    *, quick: bool = False, large: bool | None = None, seeds=None, steps=None, device: torch.device | None = None
) -> Settings:
    """The preset (quick, default, or large: the default on a CUDA device) with overrides."""
    if quick and large:
        raise ValueError("quick and large exclude each other")
    if large is None:
        large = not quick and device is not None and device.type == "cuda"
    base = PRESETS["quick" if quick else "large" if large else "default"]
    s = Settings(**{**asdict(base), "models": {k: dict(v) for k, v in base.models.items()}})
    if seeds is not None:
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            if seeds < 1:
                raise ValueError(f"seeds must be a positive number of seeds or a list of seeds, got {seeds}")
            seeds = list(range(seeds))
        seeds = list(seeds)
        if (
            not seeds
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds)
            or len(set(seeds)) != len(seeds)
        ):
            raise ValueError(f"seeds must be a positive int or a list of distinct ints >= 0, got {seeds!r}")
        s.seeds = seeds
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        s.steps = steps
    return s


def compare(
    *,
    quick: bool = False,
    out="compare-results",
    seeds=None,
    steps=None,
    device=None,
    large: bool | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Trains a VAE, a GAN and a Transformer on the digits under one budget and compares them.

    Args:
        quick: a small budget (2 seeds, 80 steps) that runs in well under a minute on a CPU.
        out: directory for compare.json and samples.png (created; files in it are replaced);
            None writes nothing.
        seeds: the number of seeds (0, 1, ...) or a list of seeds; default 3 (quick: 2).
        steps: optimizer steps per run, the same for every family; default per preset.
        device: "cpu" | "cuda" (default: cuda if available).
        large: bigger models and budget; default: on when the device is CUDA (not with quick).
        threads: torch's intra-op CPU threads during the call (restored after). Default 1 on a
            CPU device: these models are too small to gain from more, and on shared cores a
            thread whose core is busy stalls every parallel region (measured 10-50x slower).
        progress: a progress bar over the runs, and the table printed at the end.

    Returns:
        The report (the content of compare.json): settings, environment, per-family results
        aggregated over seeds ("families") with each run's numbers ("runs").
    """
    from genkern.train.distributed import resolve_device

    dev = resolve_device(device, 1)
    s = settings_for(quick=quick, large=large, seeds=seeds, steps=steps, device=dev)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    out = Path(out) if out is not None else None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"out {str(out)!r} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)  # before minutes of training, not after
    before = torch.get_num_threads()
    torch.set_num_threads(threads or (1 if dev.type == "cpu" else before))
    try:
        report = _compare(s, dev, out, progress)
    finally:
        torch.set_num_threads(before)
    if progress:
        print(format_table(report))
    return report


def _compare(s: Settings, dev: torch.device, out: Path | None, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from genkern.data.digits import digits
    from genkern.eval.quality import digit_quality

    train_ds, test_ds = digits("train"), digits("test")
    t0 = time.perf_counter()
    # First, so the digit classifier is trained before any run's clock starts.
    reference = digit_quality(train_ds.x, reference=test_ds.x)
    runs, panels = {f: [] for f in FAMILIES}, {}
    bar = tqdm(total=len(FAMILIES) * len(s.seeds), desc="compare", disable=not progress, dynamic_ncols=True)
    for fam in FAMILIES:
        for seed in s.seeds:
            bar.set_postfix_str(f"{fam} seed {seed}")
            run, panel = _run_one(fam, seed, s, dev, test_ds)
            runs[fam].append(run)
            if panel is not None:
                panels.setdefault(fam, panel)  # the first seed that trained
            bar.update(1)
    bar.close()
    report = {
        "format": "genkern-compare",
        "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(dev),
        "settings": {
            **asdict(s),
            "data": "digits",
            "device": str(dev),
            "n_quality": N_QUALITY,
            "budget": f"every family: {s.steps} steps on batches of {s.batch_size} images per seed",
            "lr": {f: _family_lr(f) for f in FAMILIES},
        },
        "reference": {
            "frechet": reference["frechet"],
            "classes_covered": reference["covered"],
            "confidence": reference["mean_confidence"],
            "note": "digits('train') scored against digits('test'): the floor a perfect model reaches",
        },
        "families": {f: aggregate(f, runs[f]) for f in FAMILIES},
        "wall_s": time.perf_counter() - t0,
    }
    if out is not None:
        write_report(out, report, {**panels, "data (test)": test_ds.x[:N_PANEL]})
    return report


def _run_one(fam: str, seed: int, s: Settings, dev: torch.device, test_ds) -> tuple:
    """Trains one family with one seed and measures it: (run dict, (N_PANEL, 1, 8, 8) samples or None)."""
    from genkern.eval.likelihood import log_likelihood
    from genkern.eval.quality import digit_quality
    from genkern.eval.speed import timed_samples, training_speed
    from genkern.train.families import get_family
    from genkern.train.trainer import train

    family = get_family(fam)
    try:
        res = train(
            fam,
            data="digits",
            steps=s.steps,
            batch_size=s.batch_size,
            seed=seed,
            model=s.models.get(fam),
            device=dev,
            out=None,
            progress=False,
            eval_every=s.steps,
            ckpt_every=s.steps,
            log_every=max(1, min(50, s.steps // 10)),
        )
    except FloatingPointError as exc:  # a diverged run is a result (instability), not a failure
        return {"seed": seed, "diverged": True, "error": str(exc)}, None
    model = res.model
    lik = log_likelihood(model, test_ds, num_samples=s.num_samples, generator=torch.Generator().manual_seed(seed))
    panel, _ = timed_samples(family.samples, model, N_PANEL, seed=10_000 + seed, device=dev)  # also the warm-up
    samples, secs = timed_samples(family.samples, model, N_QUALITY, seed=20_000 + seed, device=dev)
    q = digit_quality(samples, reference=test_ds.x)
    final = res.summary.get("final", {})
    run = {
        "seed": seed,
        "diverged": False,
        "likelihood": lik.to_dict(),
        "frechet": q["frechet"],
        "classes_covered": q["covered"],
        "class_counts": q["counts"],
        "confidence": q["mean_confidence"],
        "final_loss": final.get(LOSS_KEY[fam]),
        "final_losses": {k: v for k, v in final.items() if "loss" in k or k in ("recon", "kl")},
        "train_s": _train_seconds(res.history),
        "wall_s": res.summary["wall_s"],
        "steps_per_s": training_speed(res.summary),
        "samples_per_s": N_QUALITY / max(secs, 1e-9),
        "model": family.model_config(s.models.get(fam) or {}, test_ds),
    }
    return run, panel


def _train_seconds(history: list) -> float:
    """Time in optimizer steps: each logged row's mean step_ms times the steps of its window."""
    total, last = 0.0, 0
    for row in history:
        if "step_ms" in row:
            total += row["step_ms"] * (row["step"] - last) / 1e3
            last = row["step"]
    return total


def _family_lr(fam: str) -> float:
    from genkern.train.families import get_family

    return get_family(fam).lr
