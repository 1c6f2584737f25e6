"""A run's configuration: what the caller asks for (`RunConfig`) and what the run is (run.json).

run.json holds the settings that define the run (family, data, model, batch, optimizer,
seed, steps); a resumed run reads them back and refuses given ones that differ.

The run directory: a new run needs one that is new or empty, where "empty" includes a
directory left by a run that stopped before its first checkpoint (killed, or failed
before anything could revert it): only its run.json, its sample grids and the temporaries
of interrupted writes. Such a directory can also be resumed: from step 0, with the
settings of its run.json. Opening a directory removes the temporaries that interrupted
saves left (`remove_debris`: genkern's own temporary names only, never a user's file).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

from genkern._io import remove_temp_files, temp_target, write_atomic
from genkern.data.base import Dataset
from genkern.train.checkpoint import CheckpointError
from genkern.train.family import Family

RUN_FORMAT = "genkern-run"
# Settings a resumed run must share with the run it continues.
FIXED = ("family", "data", "model", "batch_size", "lr", "betas", "seed")
SEED_MAX = 2**63 - 1  # seeds are 0 .. SEED_MAX: a non-negative int64, which every torch generator takes
# What genkern writes in a run directory (see genkern.train.checkpoint for the layout), by name.
RUN_FILES = ("run.json", "latest.json", "log.csv", "log.json", "summary.json")
# The files a run writes before its first checkpoint, put back as they were if it fails before that.
EARLY_FILES = ("run.json", "log.csv", "log.json")
_SAMPLE = re.compile(r"step-\d+\.(png|txt)")
_CHECKPOINT = re.compile(r"step-\d+")


@dataclass
class RunConfig:
    """The options of `genkern.train.train` (see its docstring); None means the family's default
    for a new run and the stored value on resume."""

    data: object = None
    steps: int | None = None
    out: object = None
    seed: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    betas: object = None
    model: dict | None = None
    impl: str | None = None
    device: object = None
    resume: object = None
    eval_every: int = 500
    ckpt_every: int = 500
    log_every: int = 50
    n_samples: int = 64
    progress: bool = True

    @classmethod
    def from_options(cls, options: dict) -> RunConfig:
        """A RunConfig from train()'s keyword arguments, naming one it does not take."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r}")
        cfg = cls(**options)
        for name in ("eval_every", "ckpt_every", "log_every"):
            value = getattr(cfg, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        return cfg

    def run_options(self) -> dict:
        """The options that make up run.json (None where not given)."""
        return {
            "steps": self.steps,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "betas": self.betas,
            "model": self.model,
            "data": self.data,
        }


def resolve_run(fam: Family, train_ds: Dataset, data_desc: dict, opts: dict, stored: dict | None) -> dict:
    """The run's configuration: stored values on resume (given ones must agree), else defaults."""
    if stored is not None:
        return _resumed_run(fam, train_ds, data_desc, opts, stored)
    if opts["steps"] is None:
        raise ValueError("steps is required for a new run")
    seed = 0 if opts["seed"] is None else opts["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in 0 .. 2**63-1 ({SEED_MAX}), got {seed!r}")
    # None means the default; any other value (0 included) is the caller's and is checked by check_run.
    return {
        "format": RUN_FORMAT,
        "family": fam.name,
        "data": data_desc,
        "model": model_config(fam, {} if opts["model"] is None else opts["model"], train_ds),
        "batch_size": fam.batch_size if opts["batch_size"] is None else opts["batch_size"],
        "lr": fam.lr if opts["lr"] is None else opts["lr"],
        "betas": _listed(fam.betas if opts["betas"] is None else opts["betas"]),
        "seed": seed,
        "steps": opts["steps"],
    }


def _listed(betas):
    try:
        return list(betas)
    except TypeError:
        return betas  # refused by check_run, naming it


def _resumed_run(fam: Family, train_ds: Dataset, data_desc: dict, opts: dict, stored: dict) -> dict:
    if stored.get("family") != fam.name:
        raise ValueError(f"resume: the run in the directory trains {stored.get('family')!r}, not {fam.name!r}")
    given = {k: v for k, v in opts.items() if v is not None}
    if "model" in given:
        merged = dict(stored["model"])
        merged.update(given["model"])
        given["model"] = model_config(fam, merged, train_ds)
    if "data" in given:
        given["data"] = data_desc
    for key in FIXED:
        if key in given and _jsonable(given[key]) != stored.get(key):
            raise ValueError(
                f"resume: {key} differs from the run being resumed ({_jsonable(given[key])!r} != {stored.get(key)!r})"
            )
    return dict(stored, steps=opts["steps"] if opts["steps"] is not None else stored["steps"])


def model_config(fam: Family, overrides: dict, data: Dataset) -> dict:
    """The full model config; the impl is a run-time choice (`impl=`), not part of the run."""
    if not isinstance(overrides, dict):
        raise ValueError(f"model must be a dict of model config overrides, got {type(overrides).__name__}")
    if "impl" in overrides:
        raise ValueError("model: pass the kernels' impl as impl=..., not inside the model config")
    config = fam.model_config(overrides, data)
    config.pop("impl", None)
    return config


def _jsonable(value):
    return json.loads(json.dumps(value))


def check_run(run: dict, n_train: int, world: int) -> None:
    """Refuses settings the run cannot train with, naming the setting (before anything is written)."""
    for name in ("steps", "batch_size"):
        if isinstance(run[name], bool) or not isinstance(run[name], int) or run[name] < 1:
            raise ValueError(f"{name} must be a positive integer, got {run[name]!r}")
    bs = run["batch_size"]
    if bs > n_train:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n_train} samples)")
    if bs % world:
        raise ValueError(f"batch_size {bs} must be divisible by the number of processes ({world})")
    if not (_is_number(run["lr"]) and run["lr"] > 0 and math.isfinite(run["lr"])):
        raise ValueError(f"lr must be a positive number, got {run['lr']!r}")
    betas = run["betas"]
    if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkpoint_config(run: dict) -> dict:
    """What a checkpoint's config.json records of the run (enough to rebuild its model)."""
    return {k: run[k] for k in FIXED}


def read_run(path: Path) -> dict:
    if not path.exists():
        raise CheckpointError(f"resume: {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"resume: {str(path)!r} is not a directory")
    try:
        run = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"resume: {str(path)!r} holds no run (no run.json)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"resume: {path / 'run.json'} is corrupt: {exc}") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT or any(k not in run for k in FIXED):
        raise CheckpointError(f"resume: {path / 'run.json'} is not a genkern run description")
    return run


def check_new_out(out: Path) -> None:
    """Refuses an `out` that holds anything but what a run that stopped before its first checkpoint left."""
    if out.exists() and (not out.is_dir() or not is_unstarted(out)):
        raise ValueError(
            f"out {str(out)!r} already exists and is not empty: pass --resume {out} to continue "
            f"that run, or choose a new directory"
        )


def is_unstarted(out: Path) -> bool:
    """Whether the directory `out` holds nothing, or only what a run that stopped before its first
    checkpoint left: its run.json, logs, samples/ with its sample grids, checkpoints/ with a
    checkpoint being written, and temporaries of interrupted writes. Logs and grids count only
    beside a genkern run.json (written first), so a user's own files are never taken for them."""
    entries = {p.name: p for p in out.iterdir()}
    if any(p.is_symlink() for p in entries.values()):
        return False
    run_file = entries.pop("run.json", None)
    if run_file is not None and not _is_run_file(run_file):
        return False
    has_run = run_file is not None
    samples, checkpoints = entries.pop("samples", None), entries.pop("checkpoints", None)
    for name, path in entries.items():
        ours = temp_target(name) in RUN_FILES or (has_run and name in EARLY_FILES)
        if not (ours and path.is_file()):
            return False
    if samples is not None and not _only(samples, lambda p: has_run and _is_sample(p.name) and p.is_file()):
        return False
    return checkpoints is None or _only(checkpoints, lambda p: _is_checkpoint_temp(p.name) and p.is_dir())


def _only(directory: Path, accept) -> bool:
    return directory.is_dir() and all(not p.is_symlink() and accept(p) for p in directory.iterdir())


def _is_run_file(path: Path) -> bool:
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and run.get("format") == RUN_FORMAT


def _is_sample(name: str) -> bool:
    """A sample grid's name, or the temporary of one being written."""
    return bool(_SAMPLE.fullmatch(temp_target(name) or name))


def _is_checkpoint_temp(name: str) -> bool:
    """The temporary name a checkpoint directory is written under before it is renamed into place."""
    return bool(_CHECKPOINT.fullmatch(temp_target(name) or ""))


def remove_debris(out: Path) -> list:
    """Removes what writes interrupted by a kill left in the run directory `out`: temporaries of its files,
    of sample grids and of checkpoint directories. Only genkern's own temporary names (".<name>.<random>.tmp"
    of a name genkern writes there) are removed. Returns their paths, relative to `out`."""
    removed = remove_temp_files(out, lambda t: t in RUN_FILES)
    removed += [f"samples/{n}" for n in remove_temp_files(out / "samples", lambda t: bool(_SAMPLE.fullmatch(t)))]
    checkpoints = remove_temp_files(out / "checkpoints", lambda t: bool(_CHECKPOINT.fullmatch(t)))
    return removed + [f"checkpoints/{n}" for n in checkpoints]


@dataclass
class OpenedRun:
    """What opening a run directory changed, for `revert_run_dir` to put back."""

    out: Path
    created: list  # the directories opening made (or the first save will), deepest first
    latest: bytes | None  # latest.json before: a run that changed it has a checkpoint and is kept
    files: dict = field(default_factory=dict)  # {name in EARLY_FILES: its bytes before, None: none}
    samples: set = field(default_factory=set)  # the names in samples/ before the run drew any


def open_run_dir(out: Path, settings: dict) -> OpenedRun:
    """Opens the run directory once every setting has been checked: removes the debris of interrupted
    writes and, where no checkpoint was ever made, the logs and sample grids of the run that stopped
    there; then makes samples/ and writes run.json. A failure here puts everything back."""
    created = [p for p in (out / "checkpoints", out / "samples", out, *out.parents) if not p.exists()]
    if out.is_dir():
        remove_debris(out)
        if not (out / "latest.json").exists() and is_unstarted(out):
            for path in _sample_files(out) + [out / "log.csv", out / "log.json"]:
                path.unlink(missing_ok=True)
    opened = OpenedRun(out, created, _read(out / "latest.json"), {n: _read(out / n) for n in EARLY_FILES})
    opened.samples = {p.name for p in _sample_files(out)}
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", json.dumps(settings, indent=1) + "\n")
    except BaseException:
        revert_run_dir(opened)
        raise
    return opened


def revert_run_dir(opened: OpenedRun) -> None:
    """After a run failed before its first checkpoint: run.json and the logs as they were, none of its
    sample grids, no directory it made: the directory is as the run found it (less debris). A run
    that made a checkpoint (latest.json changed) is kept as it is: it can be resumed. Best effort:
    the run's own error is the one reported."""
    out = opened.out
    if _read(out / "latest.json") != opened.latest:
        return
    with contextlib.suppress(OSError):
        if out / "checkpoints" in opened.created:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for grid in _sample_files(out):
            if grid.name not in opened.samples:
                grid.unlink()
        for name, data in opened.files.items():
            if data is None:
                (out / name).unlink(missing_ok=True)
            elif _read(out / name) != data:
                write_atomic(out / name, data)
        for directory in opened.created:
            if directory.exists():
                directory.rmdir()  # only if empty: stops at the first that holds anything else


def _sample_files(out: Path) -> list:
    samples = out / "samples"
    if not samples.is_dir() or samples.is_symlink():
        return []
    return [p for p in samples.iterdir() if _SAMPLE.fullmatch(p.name) and p.is_file() and not p.is_symlink()]


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
