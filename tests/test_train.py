"""The trainer: run directories, checkpoints, resume, bad input, the CLI and distributed training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genkern.train import checkpoint as ckpt
from genkern.train.families import get_family
from genkern.train.trainer import batch_indices, build_model, load_trained, step_generator, train
from utils import ROOT

SMALL = {"vae": {"hidden": 32, "latent_dim": 4}, "gan": {"hidden": 32, "latent_dim": 8}}
QUIET = {"progress": False, "log_every": 5}


def _tree_digest(path: Path) -> dict:
    """{relative path: sha1 of its bytes} for every file under `path`."""
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _weights(run_dir: Path) -> dict:
    return load_file(str(ckpt.resolve_checkpoint(run_dir) / "model.safetensors"))


def _run(family, out, steps=12, **kw):
    args = dict(QUIET, steps=steps, out=out, batch_size=32, model=SMALL[family], eval_every=6, ckpt_every=6)
    args.update(kw)
    return train(family, **args)


# --- the deterministic pieces ---------------------------------------------------------------------


def test_step_generator_depends_only_on_seed_step_stream():
    a = torch.randn(4, generator=step_generator(3, 7, "noise"))
    assert torch.equal(a, torch.randn(4, generator=step_generator(3, 7, "noise")))
    for other in (step_generator(3, 8, "noise"), step_generator(4, 7, "noise"), step_generator(3, 7, "epoch")):
        assert not torch.equal(a, torch.randn(4, generator=other))


def test_batch_indices_cover_each_epoch_once():
    n, bs = 103, 10
    per_epoch = n // bs
    seen = torch.cat([batch_indices(n, bs, seed=1, step=s) for s in range(per_epoch)])
    assert seen.numel() == per_epoch * bs and seen.unique().numel() == seen.numel()
    nxt = torch.cat([batch_indices(n, bs, seed=1, step=s) for s in range(per_epoch, 2 * per_epoch)])
    assert not torch.equal(seen, nxt)  # a new permutation each epoch


# --- a run directory --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vae", "gan"])
def test_run_directory_contents(tmp_path, family):
    out = tmp_path / "run"
    res = _run(family, out)
    assert res.step == 12
    names = {p.name for p in out.iterdir()}
    assert {"run.json", "latest.json", "checkpoints", "log.csv", "log.json", "samples", "summary.json"} <= names
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    assert json.loads((out / "latest.json").read_text())["step"] == 12
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000006.png", "step-0000012.png"]
    for png in (out / "samples").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,")
    assert [int(r.split(",")[0]) for r in rows[1:]] == [5, 6, 10, 12]  # logged every 5, evaluated every 6
    files = {p.suffix for p in (out / "checkpoints").rglob("*") if p.is_file()}
    assert files == {".json", ".safetensors"}  # nothing pickled
    # The saved weights are the returned model's.
    for name, value in res.model.state_dict().items():
        saved = _weights(out)
        if name in saved:
            assert torch.equal(saved[name], value.cpu()), name


def test_vae_eval_reports_bits_per_dim(tmp_path):
    res = _run("vae", tmp_path / "run")
    final = res.history[-1]
    assert 0 < final["test_iw100_bpd"] <= final["test_elbo_bpd"] + 1e-3
    assert final["classes_covered"] >= 0 and "frechet" in final


# --- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,model", [("vae", {}), ("gan", {"spectral_norm": True, "r1_gamma": 1.0})])
def test_resumed_run_reaches_the_same_weights(tmp_path, family, model):
    full = _run(family, tmp_path / "full", steps=12, model={**SMALL[family], **model})
    part = _run(family, tmp_path / "part", steps=6, model={**SMALL[family], **model})
    assert full.step == 12 and part.step == 6
    resumed = train(family, steps=12, resume=tmp_path / "part", **QUIET, eval_every=6, ckpt_every=6)
    assert resumed.step == 12
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    opt_a = load_file(str(ckpt.resolve_checkpoint(tmp_path / "full") / "optimizer.safetensors"))
    opt_b = load_file(str(ckpt.resolve_checkpoint(tmp_path / "part") / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    steps = [r["step"] for r in json.loads((tmp_path / "part" / "log.json").read_text())]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_resume_with_a_different_configuration_changes_nothing(tmp_path):
    out = tmp_path / "run"
    _run("vae", out, steps=6)
    before = _tree_digest(out)
    cases = [
        ({"lr": 0.5}, "lr"),
        ({"seed": 1}, "seed"),
        ({"batch_size": 16}, "batch_size"),
        ({"model": {"latent_dim": 5}}, "model"),
        ({"data": "ring"}, "data"),
    ]
    for change, word in cases:
        with pytest.raises(ValueError, match=word):
            train("vae", steps=12, resume=out, progress=False, **change)
    with pytest.raises(ValueError, match="gan"):
        train("gan", steps=12, resume=out, progress=False)
    with pytest.raises(ValueError, match="below the checkpoint"):
        train("vae", steps=3, resume=out, progress=False)
    assert _tree_digest(out) == before


def test_new_run_never_reuses_a_directory(tmp_path):
    out = tmp_path / "run"
    _run("vae", out, steps=6)
    before = _tree_digest(out)
    with pytest.raises(ValueError, match="already exists"):
        _run("vae", out, steps=6)
    assert _tree_digest(out) == before


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run("vae", out, steps=6)
    before = _tree_digest(out / "checkpoints")
    import safetensors.torch as st

    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        train("vae", steps=12, resume=out, **QUIET, eval_every=6, ckpt_every=6)
    assert _tree_digest(out / "checkpoints") == before  # no partial directory left behind
    assert json.loads((out / "latest.json").read_text())["step"] == 6
    model, fam, meta = load_trained(out)
    assert meta["step"] == 6 and fam.name == "vae"


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        train("vae", steps=4, resume=tmp_path / "nope", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no run"):
        train("vae", steps=4, resume=empty, progress=False)
    out = tmp_path / "run"
    _run("vae", out, steps=6)
    cdir = ckpt.resolve_checkpoint(out)
    weights = cdir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        train("vae", steps=12, resume=out, progress=False)
    (cdir / "config.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="config.json"):
        load_trained(out)
    (out / "latest.json").write_text("[]")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        load_trained(out)


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_data_and_settings(tmp_path):
    x = torch.rand(256, 1, 8, 8)
    with pytest.raises(ValueError, match="levels"):  # not on the 17-level grid of the categorical decoder
        train("vae", data=x, steps=2, model={"levels": 17, "likelihood": "categorical", "hidden": 8}, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train("vae", data=x * 3, steps=2, model={"likelihood": "bernoulli", "hidden": 8}, progress=False)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train("gan", data=bad, steps=2, progress=False)
    with pytest.raises(ValueError, match="shape"):
        train("vae", data=torch.rand(64), steps=2, progress=False)
    with pytest.raises(ValueError, match="data must be"):
        train("vae", data="mnist", steps=2, progress=False)
    with pytest.raises(ValueError, match="family"):
        train("flow", steps=2, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train("vae", steps=2, batch_size=100_000, progress=False)
    with pytest.raises(ValueError, match="steps"):
        train("vae", steps=0, progress=False)
    with pytest.raises(ValueError, match="impl"):
        train("vae", steps=2, model={"impl": "torch"}, progress=False)
    assert not any(tmp_path.iterdir())


def test_custom_tensor_data_trains_and_resumes(tmp_path):
    x = torch.rand(256, 5)
    out = tmp_path / "run"
    train("vae", data=x, steps=4, out=out, batch_size=32, model={"hidden": 16}, progress=False, ckpt_every=2)
    with pytest.raises(ValueError, match="pass the same data"):
        train("vae", steps=6, resume=out, progress=False)
    with pytest.raises(ValueError, match="data"):
        train("vae", data=x + 0.5, steps=6, resume=out, progress=False)
    assert train("vae", data=x, steps=6, resume=out, progress=False).step == 6


# --- the command line ------------------------------------------------------------------------------


def _cli(*args, env=None, timeout=300):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    full_env.pop("GENKERN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "genkern", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=full_env,
        timeout=timeout,
    )


def test_cli_train_sample_and_errors(tmp_path):
    out = tmp_path / "run"
    r = _cli(
        "train",
        "vae",
        "--steps",
        "4",
        "--out",
        str(out),
        "--batch-size",
        "32",
        "--set",
        "hidden=16",
        "--eval-every",
        "4",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "step 4" in r.stdout and (out / "latest.json").is_file()
    png = tmp_path / "grid.png"
    r = _cli("sample", "--checkpoint", str(out), "-n", "16", "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    before = _tree_digest(out)
    for args, word in [
        (("train", "vae", "--steps", "8", "--resume", str(out), "--lr", "0.3"), "lr"),
        (("train", "vae", "--steps", "8", "--out", str(out)), "already exists"),
        (("sample", "--checkpoint", str(tmp_path / "missing")), "does not exist"),
        (("train", "vae", "--steps", "2", "--out", str(tmp_path / "new"), "--set", "latent_dim=-1"), "latent_dim"),
        (("train", "vae", "--steps", "2"), "--out DIR is required"),
    ]:
        r = _cli(*args)
        assert r.returncode == 1, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert _tree_digest(out) == before
    assert not (tmp_path / "new").exists()


# --- distributed ----------------------------------------------------------------------------------


# The relativistic *average* loss takes its means over each process's shard (as BatchNorm takes its
# statistics), so the sharded GAN is checked with a loss that is a mean over examples.
GAN_DDP = ["--set", "loss=nonsaturating", "--set", "r1_gamma=0.1", "--set", "spectral_norm=true"]


@pytest.mark.parametrize("family,settings", [("vae", []), ("gan", GAN_DDP)])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, family, settings):
    common = [
        family,
        "--steps",
        "6",
        "--batch-size",
        "64",
        "--set",
        "hidden=32",
        *settings,
        "--eval-every",
        "6",
        "--log-every",
        "2",
        "--quiet",
    ]
    one = _cli("train", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "genkern",
            "train",
            *common,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert two.returncode == 0, two.stderr[-3000:]
    run = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert run["processes"] == 2
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    # The logged losses are the global batch's, not one shard's.
    logs = [json.loads((tmp_path / d / "log.json").read_text()) for d in ("one", "two")]
    for a_row, b_row in zip(*logs):
        for key in ("loss", "recon", "kl", "d_loss", "g_loss", "r1"):
            if key in a_row:
                assert b_row[key] == pytest.approx(a_row[key], rel=1e-5), key
    # ... and training moved the weights well beyond that tolerance.
    stored = json.loads((tmp_path / "one" / "run.json").read_text())
    init = build_model(get_family(family), stored["model"], stored["seed"], None, "cpu").state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3


def test_sample_command_on_a_ring_gan(tmp_path):
    out = tmp_path / "ring"
    train("gan", data="ring", steps=2, batch_size=32, out=out, model=SMALL["gan"], progress=False)
    r = _cli("sample", "--checkpoint", str(out), "-n", "32", "--out", str(tmp_path / "ring.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ring.png").read_bytes()[:4] == b"\x89PNG"


def test_gan_without_ema_trains():
    res = train("gan", steps=3, batch_size=32, model={**SMALL["gan"], "ema_decay": 0.0}, progress=False, eval_every=3)
    assert res.model.generator_ema is None and res.step == 3
    assert res.history[-1]["classes_covered"] >= 1
