"""Checkpoints: weights and optimizer tensors in safetensors, everything else in JSON.

A run directory holds:

    run.json                    the run's configuration (family, data, model, training)
    latest.json                 {"checkpoint": "checkpoints/step-000500", "step": 500}
    checkpoints/step-000500/    config.json, model.safetensors, optimizer.safetensors
    log.csv  log.json           the logged metrics
    samples/step-000500.png     sample grids

A checkpoint directory is written under a temporary name, flushed, then renamed
into place; only then does latest.json (replaced atomically) point to it, and
only then are older checkpoints removed. A crash at any moment leaves the
previous checkpoint readable. Loading reads JSON and safetensors only: nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from genkern._io import current_umask, write_atomic

FORMAT = "genkern-checkpoint"
VERSION = 1
KEEP = 2  # checkpoints kept on disk (the newest ones)


class CheckpointError(ValueError):
    """A checkpoint or run directory that is missing, corrupt or does not fit."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(path)


# --- optimizer state as flat tensors + JSON -------------------------------------------


def _optimizer_to_flat(name: str, opt: torch.optim.Optimizer, tensors: dict) -> dict:
    """Puts the optimizer's tensors into `tensors` (keys "name/param/key") and returns the rest as JSON."""
    sd = opt.state_dict()
    state_json = {}
    for idx, entry in sd["state"].items():
        plain = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{idx}/{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain[key] = value
        state_json[str(idx)] = plain
    return {"param_groups": sd["param_groups"], "state": state_json}


def _optimizer_from_flat(name: str, info: dict, tensors: dict) -> dict:
    state = {int(idx): dict(plain) for idx, plain in info["state"].items()}
    prefix = f"{name}/"
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, field = key[len(prefix) :].split("/", 1)
            state.setdefault(int(idx), {})[field] = value
    groups = []
    for group in info["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --- save / load -------------------------------------------------------------------------


def save_checkpoint(
    run_dir, step: int, model: torch.nn.Module, optimizers: dict, config: dict, keep: int = KEEP
) -> Path:
    """Writes checkpoints/step-<step>/ atomically, points latest.json at it, prunes old ones."""
    from safetensors.torch import save_file, save_model

    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        # save_model drops the duplicate names of shared (tied) tensors and load_model restores them.
        save_model(model, str(tmp / "model.safetensors"))
        tensors, opt_json = {}, {}
        for opt_name, opt in optimizers.items():
            opt_json[opt_name] = _optimizer_to_flat(opt_name, opt, tensors)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        meta = {"format": FORMAT, "version": VERSION, "step": step, "config": config, "optimizers": opt_json}
        (tmp / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (a resumed run re-reaching it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / "latest.json", json.dumps({"checkpoint": f"checkpoints/{name}", "step": step}) + "\n")
    _prune(root, keep, final)
    return final


def _prune(root: Path, keep: int, newest: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else done:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself or from a run directory (through latest.json)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / "config.json").is_file() and (path / "model.safetensors").exists():
        return path
    latest = path / "latest.json"
    if not latest.is_file():
        raise CheckpointError(
            f"{str(path)!r} is neither a checkpoint directory nor a run directory with a checkpoint (no latest.json)"
        )
    try:
        target = path / json.loads(latest.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{latest} is corrupt: {exc}") from None
    if not (target / "config.json").is_file():
        raise CheckpointError(f"{latest} points to {str(target)!r}, which is not a checkpoint")
    return target


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'config.json'} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a genkern checkpoint (config.json has no format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint version {meta.get('version')}, this genkern reads {VERSION}")
    for key in ("step", "config", "optimizers"):
        if key not in meta:
            raise CheckpointError(f"{ckpt / 'config.json'} lacks {key!r}")
    return meta


def load_weights(ckpt: Path, model: torch.nn.Module, device=None) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    try:
        load_model(
            model, str(ckpt / "model.safetensors"), strict=True, device=str(device) if device is not None else "cpu"
        )
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not fit the model: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def load_optimizers(ckpt: Path, meta: dict, optimizers: dict) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'optimizer.safetensors'} is unreadable: {exc}") from None
    if set(meta["optimizers"]) != set(optimizers):
        raise CheckpointError(
            f"{ckpt} holds optimizers {sorted(meta['optimizers'])}, the model trains with {sorted(optimizers)}"
        )
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(_optimizer_from_flat(name, meta["optimizers"][name], tensors))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt}: optimizer {name!r} does not fit: {exc}") from None
