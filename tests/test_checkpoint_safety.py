"""Loading checkpoints someone else wrote: paths leading out of the run, wrong dtypes, bad config.json,
sizes that do not fit the weights, and the detail of a state-dict mismatch."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from genkern.train import checkpoint as ckpt
from genkern.train import trainer
from genkern.train.families import get_family
from genkern.train.trainer import build_model, load_trained, train

MODEL = {"hidden": 16, "latent_dim": 4}
QUIET = {"progress": False, "eval_every": 2, "ckpt_every": 2, "log_every": 1}
STEP = "checkpoints/step-0000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny real run directory (two VAE steps, one checkpoint); tests tamper with copies."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train("vae", steps=2, out=out, batch_size=32, model=MODEL, **QUIET)
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    return copy


def _resume(run_dir: Path):
    return train("vae", steps=4, resume=run_dir, **QUIET)


def _elsewhere(run: Path, tmp_path: Path) -> Path:
    """A valid checkpoint outside the run directory."""
    other = tmp_path / "elsewhere"
    shutil.copytree(run / STEP, other)
    return other


def _edit_meta(run: Path, edit) -> None:
    path = run / STEP / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _refused_both(run: Path, match: str) -> None:
    """`genkern sample` (load_trained) and --resume both refuse the run directory."""
    with pytest.raises(ckpt.CheckpointError, match=match):
        load_trained(run)
    with pytest.raises(ckpt.CheckpointError, match=match):
        _resume(run)


# --- paths: everything a run directory points to stays inside it ----------------------------------


def test_genuine_run_loads_and_resumes(run):
    model, fam, meta = load_trained(run)
    assert fam.name == "vae" and meta["step"] == 2
    assert _resume(run).step == 4


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_latest_json_pointing_outside_is_refused(run, tmp_path, kind):
    other = _elsewhere(run, tmp_path)
    ref = str(other) if kind == "absolute" else os.path.relpath(other, run)
    (run / "latest.json").write_text(json.dumps({"checkpoint": ref, "step": 2}))
    _refused_both(run, "inside itself")


def test_checkpoint_symlinked_outside_is_refused(run, tmp_path):
    other = _elsewhere(run, tmp_path)
    shutil.rmtree(run / STEP)
    (run / STEP).symlink_to(other, target_is_directory=True)
    _refused_both(run, "outside")
    with pytest.raises(ckpt.CheckpointError, match="outside"):  # named directly, it is still the run's
        load_trained(run / STEP)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_checkpoint_file_symlinked_outside_is_refused(run, tmp_path, name):
    other = _elsewhere(run, tmp_path)
    (run / STEP / name).unlink()
    (run / STEP / name).symlink_to(other / name)
    _refused_both(run, "outside")
    with pytest.raises(ckpt.CheckpointError, match="outside"):
        load_trained(run / STEP)


@pytest.mark.parametrize("name", ["latest.json", "run.json", "log.json", "samples", "checkpoints"])
def test_run_entry_symlinked_outside_is_refused_on_resume(run, tmp_path, name):
    moved = tmp_path / "moved" / name
    moved.parent.mkdir()
    shutil.move(run / name, moved)
    (run / name).symlink_to(moved)
    with pytest.raises(ckpt.CheckpointError, match="outside"):
        _resume(run)


def test_sample_command_refuses_in_one_line(run, tmp_path, capsys):
    from genkern.cli import main

    (run / "latest.json").write_text(json.dumps({"checkpoint": "../elsewhere", "step": 2}))
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CheckpointError" in err and "inside itself" in err
    assert not (tmp_path / "s.png").exists()


def test_symlink_inside_the_run_is_accepted(run):
    alias = run / "checkpoints" / "step-0000009"
    alias.symlink_to("step-0000002", target_is_directory=True)
    (run / "latest.json").write_text(json.dumps({"checkpoint": "checkpoints/step-0000009", "step": 2}))
    assert load_trained(run)[2]["step"] == 2


def test_refused_before_anything_is_opened(run, tmp_path, monkeypatch):
    other = _elsewhere(run, tmp_path)
    (run / "latest.json").write_text(json.dumps({"checkpoint": str(other), "step": 2}))
    import safetensors

    opened = []
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: opened.append(a) or pytest.fail("opened"))
    with pytest.raises(ckpt.CheckpointError):
        load_trained(run)
    assert opened == []


# --- dtypes: refused, never cast -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_weights_of_another_dtype_are_refused(run, dtype):
    path = run / STEP / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros_like(tensors[name], dtype=dtype)
    save_file(tensors, str(path))
    code = {torch.float64: "F64", torch.int32: "I32"}[dtype]
    _refused_both(run, rf"dtype mismatch: {name} \(checkpoint {code}, model F32\)")


@pytest.mark.parametrize(("field", "dtype", "code"), [("exp_avg", torch.float64, "F64"), ("step", torch.int32, "I32")])
def test_optimizer_state_of_another_dtype_is_refused(run, field, dtype, code):
    path = run / STEP / "optimizer.safetensors"
    tensors = load_file(str(path))
    tensors[f"model/0/{field}"] = tensors[f"model/0/{field}"].to(dtype)
    save_file(tensors, str(path))
    with pytest.raises(ckpt.CheckpointError, match=rf"dtype mismatch: model/0/{field} \(checkpoint {code}"):
        _resume(run)


def test_optimizer_state_of_another_shape_or_missing_is_refused(run):
    path = run / STEP / "optimizer.safetensors"
    tensors = load_file(str(path))
    tensors["model/0/exp_avg"] = tensors["model/0/exp_avg"][:1]
    del tensors["model/1/exp_avg_sq"]
    save_file(tensors, str(path))
    with pytest.raises(ckpt.CheckpointError, match=r"missing: model/1/exp_avg_sq; .*shape mismatch: model/0/exp_avg"):
        _resume(run)


# --- config.json: step, keys, sizes ------------------------------------------------------------------


@pytest.mark.parametrize("step", [-1, 2.5, "2", True, None])
def test_step_must_be_a_non_negative_int(run, step):
    _edit_meta(run, lambda m: m.update(step=step))
    _refused_both(run, "step must be an integer >= 0")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m.update(extra=1), "unknown key 'extra'"),
        (lambda m: m["config"].update(extra=1), "unknown config key 'extra'"),
        (lambda m: m["config"]["model"].update(extra=1), "unknown VAEConfig keys \\['extra'\\]"),
    ],
)
def test_unknown_keys_are_refused(run, edit, key):
    _edit_meta(run, edit)
    with pytest.raises(ckpt.CheckpointError, match=key):
        load_trained(run)


def _no_real_build(monkeypatch) -> list:
    """The devices models are built on: a test asserts that only the meta device was used."""
    devices = []

    def spy(fam, config, seed, impl, device):
        devices.append(torch.device(device).type)
        return build_model(fam, config, seed, impl, device)

    monkeypatch.setattr(trainer, "build_model", spy)
    return devices


def test_config_not_fitting_the_weights_is_refused_before_building(run, monkeypatch):
    _edit_meta(run, lambda m: m["config"]["model"].update(hidden=20000))  # a 3.4 GB model once built
    devices = _no_real_build(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatch: decoder.0.bias \(checkpoint \(16,\), model"):
        load_trained(run)
    assert set(devices) == {"meta"}


def test_run_json_not_fitting_the_weights_is_refused_before_building_on_resume(run, monkeypatch):
    stored = json.loads((run / "run.json").read_text())
    stored["model"]["hidden"] = 20000
    (run / "run.json").write_text(json.dumps(stored))
    devices = _no_real_build(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match="shape mismatch"):
        _resume(run)
    assert set(devices) == {"meta"}


def test_absurd_size_is_refused_with_a_clear_message(run, monkeypatch):
    _edit_meta(run, lambda m: m["config"]["model"].update(latent_dim=10**12))
    devices = _no_real_build(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match=r"would hold .* GiB of parameters and buffers, more than"):
        load_trained(run)
    assert set(devices) == {"meta"}


# --- a state-dict mismatch names its tensors --------------------------------------------------------


def test_state_dict_mismatch_names_the_tensors(run):
    path = run / STEP / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["encoder.0.bias"]
    tensors["encoder.9.weight"] = torch.zeros(2)
    tensors["decoder.0.weight"] = torch.zeros(3, 4)
    save_file(tensors, str(path))
    with pytest.raises(ckpt.CheckpointError) as err:
        load_trained(run)
    msg = str(err.value)
    assert "\n" not in msg  # the command line shows one line
    assert "missing: encoder.0.bias" in msg and "unexpected: encoder.9.weight" in msg
    assert "shape mismatch: decoder.0.weight (checkpoint (3, 4), model (16, 4))" in msg


# --- the meta-device model is the real one, for every family ---------------------------------------

CONFIGS = [
    ("vae", {"data_shape": [1, 8, 8], "arch": "conv", "hidden": 16, "latent_dim": 3}),
    ("gan", {"data_shape": [1, 8, 8], "hidden": 16, "spectral_norm": True, "ema_decay": 0.9}),
    ("gan", {"data_shape": [1, 8, 8], "arch": "dcgan", "hidden": 16, "depth": 2}),
    ("transformer", {"vocab_size": 32, "dim": 16, "n_layers": 1, "n_heads": 2, "max_seq_len": 8}),
    ("transformer", {"vocab_size": 32, "dim": 16, "n_layers": 1, "n_heads": 2, "positions": "learned"}),
    ("rnn", {"vocab_size": 32, "dim": 16, "hidden": 16, "kind": "lstm", "tie_weights": True}),
]


@pytest.mark.parametrize(("family", "config"), CONFIGS)
def test_meta_model_matches_the_saved_weights(tmp_path, family, config):
    fam = get_family(family)
    save_model(build_model(fam, config, 0, None, "cpu"), str(tmp_path / "model.safetensors"))
    ckpt.check_model(tmp_path, ckpt.meta_model(build_model, fam, config, 0, None))


def test_known_config_keys_are_what_checkpoints_record():
    from genkern.train.config import FIXED

    assert ckpt.CONFIG_KEYS == FIXED
