"""The trainer shared by every model family: `genkern train <family>` and `genkern.train.train`.

`train` turns its options into a resolved run (data, configuration, device, the
checkpoint it resumes) and hands it to the loop (genkern.train.loop). Everything is
checked before anything is written: the settings, the device, and that the kernels'
impl (`impl=` or GENKERN_IMPL) runs on it, so a bad option fails at once, not at the
first step with a half-written run directory. Under
`torchrun` each process takes its shard of the same global batch and
DistributedDataParallel averages the gradients, so N processes follow the
single-process run on the same global batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from genkern.train import checkpoint as ckpt
from genkern.train.batches import batch_indices, load_data, step_generator
from genkern.train.config import RunConfig, check_new_out, is_unstarted, read_run, resolve_run
from genkern.train.distributed import resolve_device, setup_dist, world_size
from genkern.train.families import get_family
from genkern.train.family import build_model
from genkern.train.loop import Run, TrainResult, run_training

__all__ = [
    "RunConfig",
    "TrainResult",
    "batch_indices",
    "build_model",
    "load_data",
    "load_trained",
    "resolve_device",
    "step_generator",
    "train",
]


def train(family: str, **options) -> TrainResult:
    """Trains a model of `family` ("vae", "gan", ...) and returns it with its logged history.

    Options (keywords, the fields of RunConfig):
        data: "digits" (default), "ring", "text", a genkern.data Dataset or a (N, ...) tensor of samples;
            on resume, the run's own data (a run on a Dataset or tensor needs it passed again).
        steps: the total number of optimizer steps (a resumed run continues up to it).
        out: the run directory (must be new or empty); None trains without writing anything. A directory
            left by a run that stopped before its first checkpoint (only its run.json, logs, sample grids
            and temporary files) counts as empty: the new run replaces them.
        seed: model initialisation, data order and noise (default 0).
        batch_size, lr, betas: the global batch and Adam's settings (family defaults).
        model: model config overrides (e.g. {"hidden": 128, "latent_dim": 8}).
        impl: the kernels' impl for the model ("auto" | "torch" | "cpp" | "triton").
        device: "cpu" | "cuda" | a torch.device (default: cuda if available).
        resume: a run directory to continue (its latest checkpoint); given settings must match it. A run
            directory without a checkpoint (its run stopped before the first) resumes from step 0.
        eval_every, ckpt_every, log_every: in steps (500, 500, 50); the last step always evaluates and saves.
        n_samples: samples drawn for the picture at each evaluation (64).
        progress: a progress bar (True).
    """
    fam = get_family(family)
    cfg = RunConfig.from_options(options)
    out, stored, cdir, meta, data = _locate(cfg)
    train_ds, test_ds, data_desc = load_data("digits" if data is None else data)
    settings = resolve_run(fam, train_ds, data_desc, cfg.run_options(), stored)
    if cdir is not None:  # the checkpoint's weights against the run's model, before anything is built
        ckpt.check_model(cdir, ckpt.meta_model(build_model, fam, settings["model"], settings["seed"], cfg.impl))
    device = _device(cfg.device)
    _check_impl(cfg.impl, device)
    dist = setup_dist(device)
    try:
        return run_training(
            Run(
                family=fam,
                settings=settings,
                config=cfg,
                train_data=train_ds,
                test_data=test_ds,
                out=out,
                device=device,
                dist=dist,
                checkpoint=cdir,
                meta=meta,
            )
        )
    finally:
        if dist.owned:
            torch.distributed.destroy_process_group()


def _device(device) -> torch.device:
    """The run's device: cpu or cuda, an existing one."""
    try:
        device = resolve_device(device, world_size())
    except RuntimeError:  # torch.device's own message lists every device type torch knows
        raise ValueError(f"device must be cpu or cuda (cuda:N), got {device!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda (cuda:N), got {str(device)!r}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_impl(impl, device: torch.device) -> None:
    """Refuses an impl (impl= or, for "auto", GENKERN_IMPL) that cannot run the model's kernels on `device`."""
    from genkern._dispatch import check_impl, default_impl, resolve

    impl = check_impl(impl)
    chosen, source = (default_impl(), "GENKERN_IMPL") if impl == "auto" else (impl, "impl")
    if chosen not in ("auto", "torch"):
        resolve(chosen, device, torch.float32, f"train ({source})")


def _locate(cfg: RunConfig) -> tuple:
    """(run directory, stored run.json, checkpoint directory, its metadata, data) of a new or resumed run."""
    if cfg.resume is None:
        out = None if cfg.out is None else Path(cfg.out)
        if out is not None:
            check_new_out(out)
        return out, None, None, None, cfg.data
    resume = Path(cfg.resume)
    ckpt.check_run_dir(resume)  # nothing it points to may lead outside it
    stored = read_run(resume)
    if cfg.out is not None and Path(cfg.out).resolve() != resume.resolve():
        raise ValueError(f"out {str(cfg.out)!r} differs from resume {str(resume)!r}: a run continues in its directory")
    if not (resume / "latest.json").exists() and is_unstarted(resume):
        cdir = meta = None  # stopped before its first checkpoint: from step 0
    else:
        cdir = ckpt.resolve_checkpoint(resume)
        meta = ckpt.read_meta(cdir)
    data = cfg.data
    if data is None:
        if "fingerprint" in stored["data"]:
            raise ValueError("resume: the run trained on a Dataset or tensor; pass the same data again")
        data = stored["data"]["name"]
    return resume, stored, cdir, meta, data


def load_trained(path, device=None, impl: str | None = None):
    """(model in eval mode, family, checkpoint metadata) from a checkpoint or run directory.

    The model is first built on the meta device (no memory) and checked against the weights' header,
    so a config.json that does not fit its weights is refused before anything is allocated.
    """
    cdir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(cdir)
    try:
        fam = get_family(meta["config"]["family"])
        config, seed = meta["config"]["model"], meta["config"].get("seed", 0)
        device = resolve_device(device, 1)
        shadow = ckpt.meta_model(build_model, fam, config, seed, impl)
    except (KeyError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{cdir / 'config.json'} describes no model genkern can build: {exc}") from None
    ckpt.check_model(cdir, shadow)
    model = build_model(fam, config, seed, impl, device)
    ckpt.load_weights(cdir, model, next(model.parameters()).device)
    return model.eval(), fam, meta
