"""The trainer shared by every model family: `genkern train <family>` and `genkern.train.train`.

Reproducibility: the model is initialised from the seed, and the data order and
every random number of step s derive from (seed, s) alone, so a run resumed
from a checkpoint at step s reaches the same weights as one that never stopped.
Under `torchrun` each process takes its shard of the same global batch and
DistributedDataParallel averages the gradients, so N processes follow the
single-process run on the same global batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from genkern._io import write_atomic
from genkern.data.base import Dataset
from genkern.train import checkpoint as ckpt
from genkern.train.families import Family, get_family

RUN_FORMAT = "genkern-run"
# Settings a resumed run must share with the run it continues.
FIXED = ("family", "data", "model", "batch_size", "lr", "betas", "seed")


@dataclass
class TrainResult:
    model: torch.nn.Module
    out: Path | None
    step: int
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, stream, step)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# --- data ------------------------------------------------------------------------------------


def load_data(data) -> tuple:
    """(train, test or None, description) from a dataset name, a Dataset or a tensor of samples."""
    if isinstance(data, str):
        if data == "digits":
            from genkern.data.digits import digits
            return digits("train"), digits("test"), {"name": "digits"}
        if data == "ring":
            from genkern.data.toy import ring_of_gaussians
            return (ring_of_gaussians(n=20_000, seed=0), ring_of_gaussians(n=2_000, seed=1), {"name": "ring"})
        if data == "text":
            from genkern.data.text import text
            return text("train"), text("valid"), {"name": "text"}
        raise ValueError(f"data must be 'digits', 'ring', 'text', a genkern Dataset or a tensor, got {data!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] < 1:
            raise ValueError(f"data must be a tensor of samples (N, ...) with N >= 1, got shape {tuple(data.shape)}")
        data = Dataset(x=data, y=None, shape=tuple(data.shape[1:]), levels=None, name="tensor")
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be 'digits', 'ring', a genkern Dataset or a tensor, got {type(data).__name__}")
    x = data.x.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()
    return data, None, {"name": data.name, "shape": list(x.shape), "fingerprint": digest}


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of step `step`: epochs are seeded permutations, the last partial batch dropped."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, "epoch"))
    return perm[pos * batch_size:(pos + 1) * batch_size]


# --- distribution ------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this trainer created the process group (and destroys it)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def _dist_setup(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), owned)


def _device(device, world: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        if world > 1 and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# --- configuration and resume ---------------------------------------------------------------


def _resolve(fam: Family, train_ds: Dataset, data_desc: dict, opts: dict, stored: dict | None) -> dict:
    """The run's configuration: stored values on resume (given ones must agree), else defaults."""
    if stored is not None:
        if stored.get("family") != fam.name:
            raise ValueError(f"resume: the run in the directory trains {stored.get('family')!r}, not {fam.name!r}")
        given = {k: v for k, v in opts.items() if v is not None}
        if "model" in given:
            merged = dict(stored["model"])
            merged.update(given["model"])
            given["model"] = _model_config(fam, merged, train_ds)
        if "data" in given:
            given["data"] = data_desc
        for key in FIXED:
            if key in given and _jsonable(given[key]) != stored.get(key):
                raise ValueError(f"resume: {key} differs from the run being resumed "
                                 f"({_jsonable(given[key])!r} != {stored.get(key)!r})")
        return dict(stored, steps=opts["steps"] if opts["steps"] is not None else stored["steps"])
    if opts["steps"] is None:
        raise ValueError("steps is required for a new run")
    return {"format": RUN_FORMAT, "family": fam.name, "data": data_desc,
            "model": _model_config(fam, opts["model"] or {}, train_ds),
            "batch_size": opts["batch_size"] or fam.batch_size, "lr": opts["lr"] or fam.lr,
            "betas": list(opts["betas"] or fam.betas), "seed": 0 if opts["seed"] is None else opts["seed"],
            "steps": opts["steps"]}


def _model_config(fam: Family, overrides: dict, data: Dataset) -> dict:
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


def _check_run(run: dict, n_train: int, world: int) -> None:
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


def _read_run(path: Path) -> dict:
    if not path.exists():
        raise ckpt.CheckpointError(f"resume: {str(path)!r} does not exist")
    if not path.is_dir():
        raise ckpt.CheckpointError(f"resume: {str(path)!r} is not a directory")
    try:
        run = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        raise ckpt.CheckpointError(f"resume: {str(path)!r} holds no run (no run.json)") from None
    except (OSError, ValueError) as exc:
        raise ckpt.CheckpointError(f"resume: {path / 'run.json'} is corrupt: {exc}") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT or any(k not in run for k in FIXED):
        raise ckpt.CheckpointError(f"resume: {path / 'run.json'} is not a genkern run description")
    return run


def _check_new_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out {str(out)!r} already exists and is not empty: pass --resume {out} to continue "
                         f"that run, or choose a new directory")


# --- logging --------------------------------------------------------------------------------------


def _write_logs(out: Path, history: list) -> None:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)] + [",".join(_csv(row.get(k)) for k in keys) for row in history]
    write_atomic(out / "log.csv", "\n".join(lines) + "\n")
    write_atomic(out / "log.json", json.dumps(history, indent=1) + "\n")


def _csv(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _read_history(out: Path, upto: int) -> list:
    try:
        rows = json.loads((out / "log.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and r.get("step", upto + 1) <= upto]


# --- the loop ---------------------------------------------------------------------------------------


def train(family: str, *, data=None, steps: int | None = None, out=None, seed: int | None = None,
          batch_size: int | None = None, lr: float | None = None, betas=None, model: dict | None = None,
          impl: str | None = None, device=None, resume=None, eval_every: int = 500, ckpt_every: int = 500,
          log_every: int = 50, n_samples: int = 64, progress: bool = True) -> TrainResult:
    """Trains a model of `family` ("vae", "gan", ...) and returns it with its logged history.

    Args:
        data: "digits" (default), "ring", "text", a genkern.data Dataset or a (N, ...) tensor of samples;
            on resume, the run's own data (a run on a Dataset or tensor needs it passed again).
        steps: the total number of optimizer steps (a resumed run continues up to it).
        out: the run directory (must be new or empty); None trains without writing anything.
        seed: model initialisation, data order and noise (default 0).
        batch_size, lr, betas: the global batch and Adam's settings (family defaults).
        model: model config overrides (e.g. {"hidden": 128, "latent_dim": 8}).
        impl: the kernels' impl for the model ("auto" | "torch" | "cpp" | "triton").
        resume: a run directory to continue (its latest checkpoint); given settings must match it.
        eval_every, ckpt_every, log_every: in steps; the last step always evaluates and saves.
    """
    fam = get_family(family)
    opts = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "betas": betas,
            "model": model, "data": data}
    for name, value in (("eval_every", eval_every), ("ckpt_every", ckpt_every), ("log_every", log_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    stored = meta = None
    if resume is not None:
        resume = Path(resume)
        stored = _read_run(resume)
        if out is not None and Path(out).resolve() != resume.resolve():
            raise ValueError(f"out {str(out)!r} differs from resume {str(resume)!r}: a run continues in its directory")
        out = resume
        cdir = ckpt.resolve_checkpoint(resume)
        meta = ckpt.read_meta(cdir)
        if data is None:
            if "fingerprint" in stored["data"]:
                raise ValueError("resume: the run trained on a Dataset or tensor; pass the same data again")
            data = stored["data"]["name"]
    elif out is not None:
        out = Path(out)
        _check_new_out(out)
    data = "digits" if data is None else data
    train_ds, test_ds, data_desc = load_data(data)
    run = _resolve(fam, train_ds, data_desc, opts, stored)
    dev = _device(device, int(os.environ.get("WORLD_SIZE", "1")))
    dist = _dist_setup(dev)
    try:
        return _train(fam, run, train_ds, test_ds, out, dev, dist, impl, meta, cdir if meta else None,
                      eval_every, ckpt_every, log_every, n_samples, progress)
    finally:
        if dist.owned:
            torch.distributed.destroy_process_group()


def build_model(fam: Family, model_config: dict, seed: int, impl: str | None, device) -> torch.nn.Module:
    """The family's model initialised from `seed` on the CPU (same weights on every device), then moved."""
    config = dict(model_config)
    if impl is not None:
        config["impl"] = impl
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = fam.build(config)
    return net.to(device)


def _train(fam, run, train_ds, test_ds, out, dev, dist, impl, meta, cdir, eval_every, ckpt_every, log_every,
           n_samples, progress) -> TrainResult:
    _check_run(run, fam.num_examples(train_ds), dist.world)
    model = build_model(fam, run["model"], run["seed"], impl, dev)
    fam.check_data(model, train_ds, "data")
    if test_ds is not None:
        fam.check_data(model, test_ds, "test data")
    opts = fam.optimizers(model, run["lr"], run["betas"])
    start, history = 0, []
    if meta is not None:
        ckpt.load_weights(cdir, model, dev)
        ckpt.load_optimizers(cdir, meta, opts)
        start = int(meta["step"])
        history = _read_history(out, start)
    if start > run["steps"]:
        raise ValueError(f"steps {run['steps']} is below the checkpoint's step {start}: nothing to continue")
    dist.barrier()  # every process has validated before anything is written
    if out is not None and dist.rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        write_atomic(out / "run.json", json.dumps(run, indent=1) + "\n")
    net = model
    if dist.world > 1 and run["model"].get("loss") == "relativistic" and dist.rank == 0:
        warnings.warn("the relativistic average GAN loss takes its means over each process's shard of the "
                      "batch, so a sharded run differs from a single-process one (the other losses do not)",
                      stacklevel=2)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                      find_unused_parameters=fam.name == "gan")
    B, shard = run["batch_size"], run["batch_size"] // dist.world
    lo, hi = dist.rank * shard, (dist.rank + 1) * shard
    summary = {"family": fam.name, "impl": impl or "auto", "device": str(dev), "processes": dist.world}
    bar = _progress(progress and dist.rank == 0, run["steps"], start)
    window, t_window, sums = 0, time.perf_counter(), {}
    t_start = time.perf_counter()
    model.train()
    for step in range(start, run["steps"]):
        batch = {k: v[lo:hi].to(dev) for k, v in fam.batch(model, train_ds, step, run["seed"], B).items()}
        noise = {k: v[lo:hi].to(dev) for k, v in fam.noise(model, step_generator(run["seed"], step, "noise"),
                                                               B).items()}
        losses = fam.step(net, model, opts, batch, noise)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        window += 1
        done = step + 1
        last = done == run["steps"]
        if done % log_every == 0 or last:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if dist.world > 1:  # log the whole global batch's losses, not this shard's
                keys = sorted(sums)
                packed = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys]).to(dev)
                torch.distributed.all_reduce(packed)
                sums = dict(zip(keys, (packed / dist.world).tolist()))
            now = time.perf_counter()
            row = {"step": done, **{k: float(v) / window for k, v in sums.items()},
                   "step_ms": 1e3 * (now - t_window) / window}
            if not all(math.isfinite(v) for k, v in row.items() if k != "step"):
                raise FloatingPointError(f"training diverged at step {done}: {row}")
            history.append(row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("step", "step_ms")}, refresh=False)
            window, sums, t_window = 0, {}, time.perf_counter()
        if dist.rank == 0 and (done % eval_every == 0 or last):
            row = _evaluate(fam, model, test_ds, train_ds, out, done, run["seed"], last, n_samples)
            if history and history[-1]["step"] == done:
                history[-1].update(row)
            else:
                history.append({"step": done, **row})
        if out is not None and (done % ckpt_every == 0 or last):
            if dist.rank == 0:
                ckpt.save_checkpoint(out, done, model, opts, _ckpt_config(run))
                _write_logs(out, history)
            dist.barrier()
        bar.update(1)
        if window == 0:  # evaluation and saving are not training time
            t_window = time.perf_counter()
    bar.close()
    ran = run["steps"] - start
    ms = [r["step_ms"] for r in history if "step_ms" in r and r["step"] > start]
    summary.update(step=run["steps"], steps_run=ran, wall_s=time.perf_counter() - t_start,
                   median_step_ms=sorted(ms)[len(ms) // 2] if ms else None,
                   final={k: v for k, v in (history[-1] if history else {}).items() if k != "step"})
    if out is not None and dist.rank == 0:
        write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    return TrainResult(model=model, out=out, step=run["steps"], history=history, summary=summary)


def _ckpt_config(run: dict) -> dict:
    return {k: run[k] for k in ("family", "data", "model", "batch_size", "lr", "betas", "seed")}


def _evaluate(fam, model, test_ds, train_ds, out, step, seed, final, n_samples) -> dict:
    model.eval()
    try:
        row = fam.evaluate(model, test_ds, final=final, seed=seed)
        if out is not None:
            samples = fam.samples(model, n_samples, step_generator(seed, step, "samples"))
            fam.plot(samples, train_ds, out / "samples" / f"step-{step:07d}.png", title=f"{fam.name}, step {step}")
    finally:
        model.train()
    return row


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True, leave=False)


def load_trained(path, device=None, impl: str | None = None):
    """(model in eval mode, family, checkpoint metadata) from a checkpoint or run directory."""
    cdir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(cdir)
    try:
        fam = get_family(meta["config"]["family"])
        model = build_model(fam, meta["config"]["model"], meta["config"].get("seed", 0), impl,
                            _device(device, 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(f"{cdir / 'config.json'} describes no model genkern can build: {exc}") from None
    ckpt.load_weights(cdir, model, next(model.parameters()).device)
    return model.eval(), fam, meta
