"""A run's configuration: what the caller asks for (`RunConfig`) and what the run is (run.json).

run.json holds the settings that define the run (family, data, model, batch, optimizer,
seed, steps); a resumed run reads them back and refuses given ones that differ.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from genkern.data.base import Dataset
from genkern.train.checkpoint import CheckpointError
from genkern.train.family import Family

RUN_FORMAT = "genkern-run"
# Settings a resumed run must share with the run it continues.
FIXED = ("family", "data", "model", "batch_size", "lr", "betas", "seed")


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
    return {
        "format": RUN_FORMAT,
        "family": fam.name,
        "data": data_desc,
        "model": model_config(fam, opts["model"] or {}, train_ds),
        "batch_size": opts["batch_size"] or fam.batch_size,
        "lr": opts["lr"] or fam.lr,
        "betas": list(opts["betas"] or fam.betas),
        "seed": 0 if opts["seed"] is None else opts["seed"],
        "steps": opts["steps"],
    }


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
    if not isinstance(run["steps"], int) or run["steps"] < 1:
        raise ValueError(f"steps must be a positive integer, got {run['steps']!r}")
    bs = run["batch_size"]
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch_size must be a positive integer, got {bs!r}")
    if bs > n_train:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n_train} samples)")
    if bs % world:
        raise ValueError(f"batch_size {bs} must be divisible by the number of processes ({world})")
    if not (isinstance(run["lr"], (int, float)) and run["lr"] > 0 and math.isfinite(run["lr"])):
        raise ValueError(f"lr must be a positive number, got {run['lr']!r}")


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
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"out {str(out)!r} already exists and is not empty: pass --resume {out} to continue "
            f"that run, or choose a new directory"
        )
