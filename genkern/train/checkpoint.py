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
is ever unpickled. A run directory may have been written by someone else, so
loading trusts none of it: everything it points to must resolve inside it,
config.json holds known keys only, and the tensors' names, shapes and dtypes
(from the safetensors headers) must be the model's before any data is read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

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


# --- where a run directory may point ------------------------------------------------------------

# What a run directory holds: files read on resume, directories written into.
RUN_ENTRIES = ("run.json", "latest.json", "log.json", "log.csv", "summary.json", "checkpoints", "samples")


def _inside(root: Path, entry: Path, what: str) -> Path:
    """`entry`, refused unless it resolves (symlinks followed) inside `root`: a run directory someone else
    wrote must not make genkern read or write files elsewhere."""
    base, real = root.resolve(), entry.resolve()
    if real != base and base not in real.parents:
        raise CheckpointError(f"{what} {str(entry)!r} leads to {str(real)!r}, outside {str(root)!r}: refused")
    return entry


def _relative(ref, latest: Path) -> PurePosixPath:
    """The checkpoint latest.json names: a relative path without '..' (it must stay in the run directory)."""
    if not isinstance(ref, str) or not ref:
        raise CheckpointError(f"{latest} is corrupt: 'checkpoint' must be a relative path, got {ref!r}")
    rel = PurePosixPath(ref)
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(
            f"{latest} points to {ref!r}: a run directory may only point inside itself (a relative path without '..')"
        )
    return rel


def check_run_dir(run_dir) -> None:
    """Refuses a run directory whose entries (and what checkpoints/ and samples/ hold) lead outside it,
    before anything in it is opened; a missing directory is left to the caller to report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for name in RUN_ENTRIES:
        entry = run_dir / name
        if entry.is_symlink() or entry.exists():
            _inside(run_dir, entry, name)
    for sub in ("checkpoints", "samples"):
        if (run_dir / sub).is_dir():
            for child in (run_dir / sub).iterdir():
                _inside(run_dir, child, f"{sub}/{child.name}")


def _checkpoint_file(ckpt: Path, name: str) -> Path:
    return _inside(ckpt, ckpt / name, name)


def _in_its_run(path: Path) -> None:
    """A checkpoint named directly as <run>/checkpoints/<name> must still resolve inside that run directory."""
    parent = path.absolute().parent
    run_dir = parent.parent
    if parent.name == "checkpoints" and ((run_dir / "latest.json").exists() or (run_dir / "run.json").exists()):
        _inside(run_dir, path, "checkpoint")


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself or from a run directory (through latest.json).

    Whatever the run directory points to must resolve inside it (no absolute path, no '..', no symlink
    leading out); anything else is refused before a checkpoint file is opened.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if (path / "config.json").is_file() and (path / "model.safetensors").exists():
        _in_its_run(path)
        return path
    latest = path / "latest.json"
    if not latest.is_file():
        raise CheckpointError(
            f"{str(path)!r} is neither a checkpoint directory nor a run directory with a checkpoint (no latest.json)"
        )
    _inside(path, latest, "latest.json")
    try:
        ref = json.loads(latest.read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{latest} is corrupt: {exc}") from None
    target = _inside(path, path / _relative(ref, latest), "the checkpoint of latest.json")
    if not (target / "config.json").is_file():
        raise CheckpointError(f"{latest} points to {str(target)!r}, which is not a checkpoint")
    return target


# --- what a checkpoint holds ---------------------------------------------------------------------------

META_KEYS = ("format", "version", "step", "config", "optimizers")
# What genkern.train.config.checkpoint_config records of a run (its FIXED settings; that module imports this one).
CONFIG_KEYS = ("family", "data", "model", "batch_size", "lr", "betas", "seed")


def read_meta(ckpt: Path) -> dict:
    """config.json of a checkpoint, refused unless every key is known and the step is an int >= 0."""
    path = _checkpoint_file(ckpt, "config.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not a genkern checkpoint (config.json has no format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint version {meta.get('version')}, this genkern reads {VERSION}")
    for key in META_KEYS:
        if key not in meta:
            raise CheckpointError(f"{path} lacks {key!r}")
    _check_keys(meta, META_KEYS, path, "")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{path}: step must be an integer >= 0, got {step!r}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{path}: config must be an object, got {type(meta['config']).__name__}")
    _check_keys(meta["config"], CONFIG_KEYS, path, "config ")
    if not isinstance(meta["optimizers"], dict):
        raise CheckpointError(f"{path}: optimizers must be an object, got {type(meta['optimizers']).__name__}")
    return meta


def _check_keys(d: dict, known, path: Path, what: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise CheckpointError(f"{path} has an unknown {what}key {unknown[0]!r}; known keys are {list(known)}")


# safetensors' names of the dtypes a genkern model or optimizer holds
_DTYPE_CODES = {
    getattr(torch, name): code
    for name, code in [("float64", "F64"), ("float32", "F32"), ("float16", "F16"), ("bfloat16", "BF16")]
    + [("int64", "I64"), ("int32", "I32"), ("int16", "I16"), ("int8", "I8"), ("uint8", "U8"), ("bool", "BOOL")]
}


def _spec(t: torch.Tensor) -> tuple:
    return tuple(t.shape), _DTYPE_CODES.get(t.dtype, str(t.dtype))


def _header(path: Path) -> dict:
    """{name: (shape, dtype)} of a safetensors file, from its header alone (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {' '.join(str(exc).split())}") from None


def _listing(items: list, limit: int = 6) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _mismatches(found: dict, want: dict, optional=frozenset()) -> list:
    """What keeps tensors `found` {name: (shape, dtype)} from being `want`, one phrase per kind."""
    pairs = [(k, found[k], want[k]) for k in found if k in want]
    kinds = (
        ("missing", [k for k in want if k not in found and k not in optional]),
        ("unexpected", [k for k in found if k not in want]),
        ("shape mismatch", [f"{k} (checkpoint {f[0]}, model {w[0]})" for k, f, w in pairs if f[0] != w[0]]),
        ("dtype mismatch", [f"{k} (checkpoint {f[1]}, model {w[1]})" for k, f, w in pairs if f[1] != w[1]]),
    )
    return [f"{kind}: {_listing(items)}" for kind, items in kinds if items]


def meta_model(build, *args) -> torch.nn.Module:
    """`build(*args, device)` on the meta device: the model's tensor names, shapes and dtypes with no
    memory allocated (`build` is genkern.train.family.build_model, as for the real model)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build(*args, torch.device("meta"))


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf: only the absurd is refused
        return 1 << 40


def check_model(ckpt: Path, model: torch.nn.Module) -> None:
    """Refuses the checkpoint unless `model` (best on the meta device, see meta_model) fits in memory and
    model.safetensors holds exactly its tensors with their shapes and dtypes; reads the header only, so
    a model config that does not fit the weights is refused before the model is built."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}.values()
    size, limit = sum(t.numel() * t.element_size() for t in tensors), _memory_bytes()
    if size > limit:
        raise CheckpointError(
            f"the model for {ckpt} would hold {size / 2**30:.4g} GiB of parameters and buffers, "
            f"more than this machine's {limit / 2**30:.4g} GiB of memory: refused"
        )
    _check_weights(ckpt, model)


def _check_weights(ckpt: Path, model: torch.nn.Module) -> None:
    path = _checkpoint_file(ckpt, "model.safetensors")
    state = model.state_dict(keep_vars=True)
    want = {k: _spec(t) for k, t in state.items()}
    found = _header(path)
    # safetensors.torch.save_model stores one name of tensors shared by several (tied weights).
    names = {}
    for k, t in state.items():
        names.setdefault(id(t), []).append(k)
    optional = {k for group in names.values() if any(n in found for n in group) for k in group}
    problems = _mismatches(found, want, optional)
    if problems:
        raise CheckpointError(f"{path} does not fit the model: {'; '.join(problems)}")


def load_weights(ckpt: Path, model: torch.nn.Module, device=None) -> None:
    """The model's weights from model.safetensors, after its header is checked: never cast, never partial."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    _check_weights(ckpt, model)
    path = _checkpoint_file(ckpt, "model.safetensors")
    try:
        load_model(model, str(path), strict=True, device=str(device) if device is not None else "cpu")
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path} does not fit the model: {detail}") from None


def _optimizer_specs(meta: dict, optimizers: dict, found: dict) -> dict:
    """{name: (shape, dtype)} the optimizer tensors must have: each state field is shaped like its
    parameter, except the step count, a float32 scalar in Adam (every state entry has the same fields)."""
    want = {}
    for name, opt in optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"]]
        prefix = f"{name}/"
        held = {k[len(prefix) :].split("/", 1)[0] for k in found if k.startswith(prefix)}
        fields = {k[len(prefix) :].split("/", 1)[-1] for k in found if k.startswith(prefix)}
        for idx in held | set(meta["optimizers"][name].get("state", {})):
            if not (idx.isdigit() and int(idx) < len(params)):
                continue  # an entry for no parameter: "unexpected" names it
            for field in fields:
                spec = ((), "F32") if field == "step" else _spec(params[int(idx)])
                want[f"{prefix}{idx}/{field}"] = spec
    return want


def load_optimizers(ckpt: Path, meta: dict, optimizers: dict) -> None:
    """The optimizers' state from optimizer.safetensors, after its header is checked against their parameters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _checkpoint_file(ckpt, "optimizer.safetensors")
    if set(meta["optimizers"]) != set(optimizers):
        raise CheckpointError(
            f"{ckpt} holds optimizers {sorted(meta['optimizers'])}, the model trains with {sorted(optimizers)}"
        )
    found = _header(path)
    try:
        problems = _mismatches(found, _optimizer_specs(meta, optimizers, found))
    except (AttributeError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / 'config.json'}: the optimizers' state is corrupt: {exc}") from None
    if problems:
        raise CheckpointError(f"{path} does not fit the optimizers: {'; '.join(problems)}")
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(_optimizer_from_flat(name, meta["optimizers"][name], tensors))
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt}: optimizer {name!r} does not fit: {exc}") from None
