"""The training loop as small named steps: prepare, train one step, log, evaluate, checkpoint, finish.

Reproducibility: the model is initialised from the seed, and the data order and
every random number of step s derive from (seed, s) alone, so a run resumed
from a checkpoint at step s reaches the same weights as one that never stopped.

A failed run changes nothing on disk: every setting is checked before the run
directory is opened, and a run that fails before its first checkpoint puts the
directory back as it found it (genkern.train.config.revert_run_dir). One killed
before it could leaves a directory that a new run may reuse or `resume` starts
from step 0.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genkern._io import write_atomic
from genkern.data.base import Dataset
from genkern.train import checkpoint as ckpt
from genkern.train.batches import step_generator
from genkern.train.config import OpenedRun, RunConfig, check_run, checkpoint_config, open_run_dir, revert_run_dir
from genkern.train.distributed import Dist, wrap_ddp
from genkern.train.family import Family, build_model
from genkern.train.logs import LossWindow, read_history, write_logs


@dataclass
class TrainResult:
    model: torch.nn.Module
    out: Path | None
    step: int
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


@dataclass
class Run:
    """A resolved run: what every step of the loop reads."""

    family: Family
    settings: dict  # the run's configuration, as in run.json
    config: RunConfig  # the caller's options (impl, device, intervals, ...)
    train_data: Dataset
    test_data: Dataset | None
    out: Path | None  # the run directory; None writes nothing
    device: torch.device
    dist: Dist
    checkpoint: Path | None = None  # the checkpoint a resumed run starts from
    meta: dict | None = None  # its metadata


@dataclass
class State:
    """What the loop changes: the model, the module the steps call (DDP or the model), the optimizers."""

    model: torch.nn.Module
    net: torch.nn.Module
    opts: dict
    start: int
    history: list
    opened: OpenedRun | None = None  # the run directory as this process opened it (the first process only)


def run_training(run: Run) -> TrainResult:
    state = prepare(run)
    try:
        return _train(run, state)
    except BaseException:
        if state.opened is not None:
            revert_run_dir(state.opened)
        raise


def _train(run: Run, state: State) -> TrainResult:
    steps = run.settings["steps"]
    bar = _progress(run.config.progress and run.dist.rank == 0, steps, state.start)
    window = LossWindow()
    t_start = time.perf_counter()
    state.model.train()
    for step in range(state.start, steps):
        _run_step(run, state, step, window, bar)
    bar.close()
    return finish(run, state, time.perf_counter() - t_start)


def prepare(run: Run) -> State:
    """Builds the model and optimizers, restores a checkpoint, opens the run directory."""
    fam, settings = run.family, run.settings
    check_run(settings, fam.num_examples(run.train_data), run.dist.world)
    model = build_model(fam, settings["model"], settings["seed"], run.config.impl, run.device)
    fam.check_data(model, run.train_data, "data")
    if run.test_data is not None:
        fam.check_data(model, run.test_data, "test data")
    opts = fam.optimizers(model, settings["lr"], settings["betas"])
    start, history = restore(run, model, opts)
    if start > settings["steps"]:
        raise ValueError(f"steps {settings['steps']} is below the checkpoint's step {start}: nothing to continue")
    run.dist.barrier()  # every process has validated before anything is written
    if run.dist.world > 1 and settings["model"].get("loss") == "relativistic" and run.dist.rank == 0:
        warnings.warn(
            "the relativistic average GAN loss takes its means over each process's shard of the "
            "batch, so a sharded run differs from a single-process one (the other losses do not)",
            stacklevel=4,
        )
    net = wrap_ddp(model, run.dist, run.device, find_unused=fam.name == "gan")
    opened = open_run_dir(run.out, settings) if run.out is not None and run.dist.rank == 0 else None
    return State(model=model, net=net, opts=opts, start=start, history=history, opened=opened)


def restore(run: Run, model: torch.nn.Module, opts: dict) -> tuple:
    """(first step, logged history): from the resumed checkpoint, or (0, []) for a new run."""
    if run.meta is None:
        return 0, []
    ckpt.load_weights(run.checkpoint, model, run.device)
    ckpt.load_optimizers(run.checkpoint, run.meta, opts)
    start = int(run.meta["step"])
    return start, read_history(run.out, start)


def _run_step(run: Run, state: State, step: int, window: LossWindow, bar) -> None:
    """One optimizer step, then whatever falls due after it: log, evaluate, checkpoint."""
    window.add(train_step(run, state, step))
    done = step + 1
    last = done == run.settings["steps"]
    if done % run.config.log_every == 0 or last:
        row = window.row(done, run.dist, run.device)
        state.history.append(row)
        bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("step", "step_ms")}, refresh=False)
    if run.dist.rank == 0 and (done % run.config.eval_every == 0 or last):
        _merge_row(state.history, done, evaluate(run, state.model, done, last))
    if run.out is not None and (done % run.config.ckpt_every == 0 or last):
        save(run, state, done)
    bar.update(1)
    window.restart_clock()  # evaluation and saving are not training time


def train_step(run: Run, state: State, step: int) -> dict:
    """The step's losses: this process's shard of the global batch and noise of `step`."""
    fam, seed, size = run.family, run.settings["seed"], run.settings["batch_size"]
    rows, dev = run.dist.shard(size), run.device
    batch = fam.batch(state.model, run.train_data, step, seed, size)
    noise = fam.noise(state.model, step_generator(seed, step, "noise"), size)
    batch = {k: v[rows].to(dev) for k, v in batch.items()}
    noise = {k: v[rows].to(dev) for k, v in noise.items()}
    return fam.step(state.net, state.model, state.opts, batch, noise)


def evaluate(run: Run, model: torch.nn.Module, step: int, final: bool) -> dict:
    """The family's metrics on the test data and, with a run directory, a picture of samples."""
    fam, seed = run.family, run.settings["seed"]
    model.eval()
    try:
        row = fam.evaluate(model, run.test_data, final=final, seed=seed)
        if run.out is not None:
            samples = fam.samples(model, run.config.n_samples, step_generator(seed, step, "samples"))
            fam.plot(
                samples, run.train_data, run.out / "samples" / f"step-{step:07d}.png", title=f"{fam.name}, step {step}"
            )
    finally:
        model.train()
    return row


def _merge_row(history: list, step: int, row: dict) -> None:
    if history and history[-1]["step"] == step:
        history[-1].update(row)
    else:
        history.append({"step": step, **row})


def save(run: Run, state: State, step: int) -> None:
    """The logs so far and a checkpoint (written by the first process; the others wait).

    The logs go first: a run killed in between resumes from the previous checkpoint and reads the
    rows up to its step (read_history), where the other order would lose the rows since it."""
    if run.dist.rank == 0:
        write_logs(run.out, state.history)
        ckpt.save_checkpoint(run.out, step, state.model, state.opts, checkpoint_config(run.settings))
    run.dist.barrier()


def finish(run: Run, state: State, wall_s: float) -> TrainResult:
    """The run's summary (summary.json in the run directory) and its result."""
    steps, history = run.settings["steps"], state.history
    ms = [r["step_ms"] for r in history if "step_ms" in r and r["step"] > state.start]
    summary = {
        "family": run.family.name,
        "impl": run.config.impl or "auto",
        "device": str(run.device),
        "processes": run.dist.world,
        "step": steps,
        "steps_run": steps - state.start,
        "wall_s": wall_s,
        "median_step_ms": sorted(ms)[len(ms) // 2] if ms else None,
        "final": {k: v for k, v in (history[-1] if history else {}).items() if k != "step"},
    }
    if run.out is not None and run.dist.rank == 0:
        write_atomic(run.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return TrainResult(model=state.model, out=run.out, step=steps, history=history, summary=summary)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm  # only when training: tqdm costs at import

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True, leave=False)
