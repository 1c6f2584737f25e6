"""Run directories and processes: debris of killed saves, runs that fail before their first checkpoint,
concurrent writers of benchmark results, and the command line's numeric flags."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from genkern import cli
from genkern._io import locked, temp_target
from genkern.bench import runner
from genkern.train import checkpoint as ckpt
from genkern.train.trainer import train
from utils import ROOT

X = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))  # points: fast to train, evaluate and plot
OPTIONS = dict(data=X, batch_size=16, model={"hidden": 8}, progress=False, eval_every=3, ckpt_every=6, log_every=3)


def _train(out, steps=6, **kw):
    return train("vae", **dict(OPTIONS, steps=steps, out=out, **kw))


def _tree(path: Path) -> dict:
    """{relative path: sha1 of the bytes, or "dir"} of everything under `path`."""
    return {
        str(p.relative_to(path)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt.resolve_checkpoint(out) / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- killed runs: a child trains and SIGKILLs itself at a chosen write ------------------------------

CHILD = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from genkern.train.trainer import train
{patch}
x = torch.rand(64, 2, generator=torch.Generator().manual_seed(0))
train("vae", data=x, steps={steps}, out={out!r}, batch_size=16, model={{"hidden": 8}}, progress=False,
      eval_every=3, ckpt_every=6, log_every=3)
"""
# The kill lands inside the first checkpoint's save: its directory is half written under its temporary name.
KILL_IN_SAVE = """
import safetensors.torch as st
def save_file(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_file
"""
# The kill lands while log.json is written for step 18, whose checkpoint is not written yet: the last is
# step 12's, and the temporary of log.json is left.
KILL_IN_LOG = """
real_replace = os.replace
def replace(src, dst):
    latest = {latest!r}
    if str(dst).endswith("log.json") and os.path.exists(latest) and '"step": 12' in open(latest).read():
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
"""


def _killed_run(out: Path, patch: str, steps: int) -> None:
    script = CHILD.format(root=ROOT, patch=patch, steps=steps, out=str(out))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_a_run_killed_before_its_first_checkpoint_leaves_a_reusable_directory(tmp_path):
    out = tmp_path / "run"
    _killed_run(out, KILL_IN_SAVE, steps=6)
    left = sorted(_tree(out))
    assert "run.json" in left and "samples/step-0000003.png" in left and "latest.json" not in left
    assert any(temp_target(Path(p).name) == "step-0000006" for p in left)  # the half-written checkpoint
    _train(out)  # a new run takes the directory as empty: no "already exists"
    names = set(_tree(out))
    assert not [n for n in names if temp_target(Path(n).name)], names  # no debris left
    assert _weights(out) and json.loads((out / "latest.json").read_text())["step"] == 6
    _train(tmp_path / "clean")
    assert _same_weights(out, tmp_path / "clean")


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(tmp_path):
    out = tmp_path / "run"
    _killed_run(out, KILL_IN_SAVE, steps=6)
    result = train("vae", data=X, resume=out, progress=False, eval_every=3, ckpt_every=6, log_every=3)
    assert result.step == 6 and [r["step"] for r in result.history] == [3, 6]
    assert not [n for n in _tree(out) if temp_target(Path(n).name)]
    _train(tmp_path / "clean")
    assert _same_weights(out, tmp_path / "clean")


def test_resume_removes_the_temporary_of_a_log_killed_mid_write(tmp_path):
    out = tmp_path / "run"
    _killed_run(out, KILL_IN_LOG.format(latest=str(out / "latest.json")), steps=18)
    assert [n for n in os.listdir(out) if temp_target(n) == "log.json"]
    train("vae", data=X, steps=18, resume=out, progress=False, eval_every=3, ckpt_every=6, log_every=3)
    assert not [n for n in _tree(out) if temp_target(Path(n).name)]
    assert [r["step"] for r in json.loads((out / "log.json").read_text())] == [3, 6, 9, 12, 15, 18]


def test_debris_is_removed_and_a_users_files_are_not(tmp_path):
    out = tmp_path / "run"
    _train(out)
    debris = [
        Path(tempfile.mkdtemp(dir=out / "checkpoints", prefix=".step-0000012.", suffix=".tmp")),
        Path(tempfile.mkstemp(dir=out, prefix=".log.json.", suffix=".tmp")[1]),
        Path(tempfile.mkstemp(dir=out, prefix=".log.csv.", suffix=".tmp")[1]),
        Path(tempfile.mkstemp(dir=out, prefix=".latest.json.", suffix=".tmp")[1]),
        Path(tempfile.mkstemp(dir=out / "samples", prefix=".step-0000012.png.", suffix=".tmp")[1]),
    ]
    (debris[0] / "model.safetensors").write_bytes(b"partial")
    mine = [out / "notes.tmp", out / ".notes.abcdefgh.tmp", out / "samples" / "mine.png"]
    mine += [out / "checkpoints" / ".backup.abcdefgh.tmp", out / "checkpoints" / "step-keep.tmp"]
    for path in mine:
        path.write_text("a user's file")
    train("vae", data=X, steps=12, resume=out, progress=False, eval_every=3, ckpt_every=6, log_every=3)
    assert not any(p.exists() for p in debris)
    assert all(p.read_text() == "a user's file" for p in mine)


# --- runs that fail before their first checkpoint change nothing ----------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_without_a_gpu_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="impl='triton' is unavailable"):
        _train(tmp_path / "run", impl="triton")
    monkeypatch.setenv("GENKERN_IMPL", "triton")
    with pytest.raises(RuntimeError, match=r"GENKERN_IMPL.*unavailable"):
        _train(tmp_path / "run")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "options,env,match",
    [
        ({}, {"GENKERN_IMPL": "bogus"}, "GENKERN_IMPL must be one of"),
        ({"device": "meta"}, {}, "device must be cpu or cuda"),
        ({"device": "tpu"}, {}, "device must be cpu or cuda"),
        ({"batch_size": 0}, {}, "batch_size must be a positive integer, got 0"),
        ({"lr": 0.0}, {}, "lr must be a positive number, got 0.0"),
        ({"betas": ()}, {}, "betas must be two numbers"),
        ({"seed": 2**63}, {}, r"seed must be an integer in 0 \.\. 2\*\*63-1"),
        ({"seed": -1}, {}, r"seed must be an integer in 0 \.\. 2\*\*63-1"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, monkeypatch, options, env, match):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        with pytest.raises(ValueError, match=match):
            _train(out, **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_the_largest_seed_trains_and_evaluates():
    from genkern.train.family import eval_generator

    assert train("vae", **dict(OPTIONS, steps=2, out=None, seed=2**63 - 1)).step == 2
    gen = eval_generator(2**63 - 1)  # the generator of every evaluation on the digits
    assert torch.rand(3, generator=gen).shape == (3,)
    assert torch.equal(torch.rand(3, generator=eval_generator(5)), torch.rand(3, generator=eval_generator(5)))


def _failing_plot(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("where", ["samples", "checkpoint", "interrupt"])
def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch, where):
    import safetensors.torch as st

    from genkern.train import plots

    error = KeyboardInterrupt if where == "interrupt" else OSError
    if where == "samples":  # the disk fills at the first evaluation's sample grid
        monkeypatch.setattr(plots, "scatter", _failing_plot)
    elif where == "checkpoint":  # ... at the first checkpoint
        monkeypatch.setattr(st, "save_file", _failing_plot)
    else:  # Ctrl-C in the middle of training
        monkeypatch.setattr("genkern.train.loop.evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "a" / "new", tmp_path / "empty"):
        with pytest.raises(error):
            _train(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any((tmp_path / "empty").iterdir())


def test_a_resumed_run_failing_before_its_next_checkpoint_changes_nothing(tmp_path, monkeypatch):
    import safetensors.torch as st

    out = tmp_path / "run"
    _train(out)
    before = _tree(out)
    monkeypatch.setattr(st, "save_file", _failing_plot)
    with pytest.raises(OSError, match="No space"):  # run.json would say 12 steps, samples/ would hold step 9
        train("vae", data=X, steps=12, resume=out, progress=False, eval_every=3, ckpt_every=6, log_every=3)
    assert _tree(out) == before


@pytest.mark.parametrize(
    "files",
    [
        {"run.json": None, "notes.txt": "mine"},  # a user's file
        {"samples/step-0000003.png": "png"},  # grids without a genkern run.json: not genkern's
        {"run.json": "{}"},  # not a genkern run description
        {"run.json": None, "latest.json": "{}"},  # a run with a checkpoint
        {"run.json": None, "checkpoints/step-0000006/x": "x"},
    ],
)
def test_only_a_run_stopped_before_its_first_checkpoint_counts_as_empty(tmp_path, files):
    out = tmp_path / "run"
    run_json = json.dumps({"format": "genkern-run", "family": "vae"})
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(run_json if text is None else text)
    before = _tree(out)
    with pytest.raises(ValueError, match="already exists"):
        _train(out)
    assert _tree(out) == before


# --- concurrent writers of benchmark results ----------------------------------------------------------

HEADER = {"device": {"slug": "cpu-concurrent", "type": "cpu"}}


def _write_entries(out_dir: str, writer: int, n: int) -> None:
    for i in range(n):
        entry = {"op": "op", "case": f"w{writer}-{i}", "dtype": "float32", "direction": "fwd"}
        runner.write_results(out_dir, HEADER, [entry])


def test_concurrent_benchmark_writers_lose_no_entry(tmp_path):
    debris = tmp_path / ".cpu-concurrent.json.abcdefgh.tmp"  # a writer killed mid-write
    debris.write_text("{")
    ctx = multiprocessing.get_context("fork")  # the workers only read and write JSON
    writers, per_writer = 4, 30
    procs = [ctx.Process(target=_write_entries, args=(str(tmp_path), w, per_writer)) for w in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    results = json.loads((tmp_path / "cpu-concurrent.json").read_text())["results"]["op"]
    assert len(results) == writers * per_writer
    assert os.listdir(tmp_path) == ["cpu-concurrent.json"]  # no lock file, no temporary


def test_the_lock_excludes_a_second_holder(tmp_path):
    import fcntl

    target = tmp_path / "results.json"
    with locked(target):
        lock = tmp_path / ".results.json.lock"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert not (tmp_path / ".results.json.lock").exists()


# --- the command line -----------------------------------------------------------------------------------

SEED = str(2**70)
TRAIN = ["train", "vae", "--steps", "2", "--quiet"]


@pytest.mark.parametrize(
    "args,flag",
    [
        (TRAIN + ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (TRAIN + ["--batch-size", "-4"], "--batch-size must be a positive integer"),
        (TRAIN + ["--lr", "0"], "--lr must be a positive finite number, got 0.0"),
        (TRAIN + ["--lr", "-0.1"], "--lr must be a positive finite number"),
        (TRAIN + ["--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (TRAIN + ["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["train", "vae", "--steps", "0", "--quiet"], "--steps must be a positive integer"),
        (TRAIN + ["--seed", SEED], "--seed must be an integer in 0 .. 2**63-1"),
        (TRAIN + ["--seed", "-1"], "--seed must be an integer in 0 .. 2**63-1"),
        (TRAIN + ["--eval-every", "0"], "--eval-every must be a positive integer"),
        (TRAIN + ["--ckpt-every", "-1"], "--ckpt-every must be a positive integer"),
        (TRAIN + ["--log-every", "0"], "--log-every must be a positive integer"),
        (["sample", "--checkpoint", "run", "-n", "0"], "-n must be a positive integer"),
        (["sample", "--checkpoint", "run", "--seed", SEED], "--seed must be an integer in 0 .. 2**63-1"),
        (["profile", "--model", "tiny", "--new-tokens", "1"], "--new-tokens must be an integer >= 2"),
        (["compare", "--quick", "--seeds", "0"], "--seeds must be a positive integer"),
        (["compare", "--quick", "--steps", "0"], "--steps must be a positive integer"),
        (["compare", "--quick", "--threads", "0"], "--threads must be a positive integer"),
    ],
)
def test_bad_numeric_flags_are_one_line_naming_the_flag(tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    args = args + (["--out", str(out / "x.png")] if args[0] == "sample" else ["--out", str(out)])
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and flag in err[0], err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "no CUDA device is available"), ("tpu", "cpu or cuda")])
def test_profile_on_a_missing_device_is_one_clear_line(tmp_path, capsys, device, message):
    args = ["profile", "--model", "tiny", "--context", "8", "--new-tokens", "2", "--out", str(tmp_path / "p")]
    assert cli.main(args + ["--device", device]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "AssertionError" not in err[0], err
    assert not (tmp_path / "p").exists()


def test_cli_errors_from_a_subprocess_are_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GENKERN_DEBUG", None)
    r = subprocess.run(
        [sys.executable, "-m", "genkern", *TRAIN, "--batch-size", "0", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "--batch-size" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
