"""The autoregressive families in the trainer: Transformer and RNN language models on text and digits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from genkern.data.digits import BOS, digits, pixels_to_tokens, tokens_to_pixels
from genkern.data.text import VOCAB, text
from genkern.models.transformer import ModelArgs, TransformerLM
from genkern.ops import attention as attention_op
from genkern.train import checkpoint as ckpt
from genkern.train.families import get_family
from genkern.train.trainer import build_model, train
from utils import ROOT, KernelCalls, one_thread, require_impl  # noqa: F401  (one_thread: an autouse fixture)

# Head dim 16: a size the C++ attention kernel takes, so the default impl runs it.
TINY = {"transformer": {"dim": 32, "n_layers": 2, "n_heads": 2}, "rnn": {"dim": 32, "hidden": 64}}
QUIET = {"progress": False, "log_every": 2}
# Every run of this file trains 8 steps, evaluating and saving at steps 4 and 8.
RUN = {"steps": 8, "eval_every": 4, "ckpt_every": 4, "lr": 3e-3, **QUIET}
# The RNN text runs use dropout, so a resumed run must repeat the uninterrupted run's masks.
SETTINGS = {
    ("transformer", "digits"): {"batch_size": 32, "model": TINY["transformer"]},
    ("transformer", "text"): {"batch_size": 16, "model": {**TINY["transformer"], "seq_len": 32}},
    ("rnn", "digits"): {"batch_size": 32, "model": TINY["rnn"]},
    ("rnn", "text"): {"batch_size": 16, "model": {**TINY["rnn"], "seq_len": 32, "dropout": 0.2}},
}
METRIC = {"digits": "test_bpd", "text": "valid_bpc"}


def _train(family, data, out, **kw):
    return train(family, data=data, out=out, **{**RUN, **SETTINGS[family, data], **kw})


def _weights(run_dir: Path, name: str = "model") -> dict:
    return load_file(str(ckpt.resolve_checkpoint(run_dir) / f"{name}.safetensors"))


def _cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GENKERN_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "genkern", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 8-step run per (family, data), trained on first use: {(family, data): (TrainResult, run dir)}."""
    root = tmp_path_factory.mktemp("lm-runs")
    done = {}

    def get(family, data):
        if (family, data) not in done:
            out = root / f"{family}-{data}"
            done[family, data] = (_train(family, data, out), out)
        return done[family, data]

    return get


def _untrained(family, data, run_dir: Path):
    """The run's model at step 0 (built from the run's own config and seed) and the family."""
    stored = json.loads((run_dir / "run.json").read_text())
    fam = get_family(family)
    return build_model(fam, stored["model"], stored["seed"], None, "cpu"), fam


# --- tokens -----------------------------------------------------------------------------------------


def test_pixels_and_tokens_round_trip():
    x = digits("test").x[:50]
    tokens = pixels_to_tokens(x)
    assert tokens.shape == (50, 65) and tokens.dtype == torch.int64
    assert (tokens[:, 0] == BOS).all() and tokens[:, 1:].min() >= 0 and tokens[:, 1:].max() <= 16
    # Raster order: token 1 + 8 r + c is pixel (r, c).
    assert torch.equal(tokens[:, 1 + 8 * 3 + 5], (x[:, 0, 3, 5] * 16).round().long())
    assert torch.equal(tokens_to_pixels(tokens), x)
    assert torch.equal(tokens_to_pixels(tokens[:, 1:]), x)  # without the start token too
    levels = torch.randint(0, 17, (7, 64))
    assert torch.equal(pixels_to_tokens(tokens_to_pixels(levels))[:, 1:], levels)


# --- runs, files and metrics --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["transformer", "rnn"])
@pytest.mark.parametrize("data", ["text", "digits"])
def test_run_writes_checkpoints_logs_samples_and_improves(runs, family, data):
    res, out = runs(family, data)
    assert res.step == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert json.loads((out / "latest.json").read_text())["step"] == 8
    rows = (out / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 6, 8]
    stored = json.loads((out / "run.json").read_text())
    assert stored["data"] == {"name": data} and stored["model"]["seq_len"] == (64 if data == "digits" else 32)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    if data == "digits":
        assert samples == ["step-0000004.png", "step-0000008.png"]
        assert all((out / "samples" / s).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for s in samples)
    else:
        assert samples == ["step-0000004.txt", "step-0000008.txt"]
        body = (out / "samples" / "step-0000008.txt").read_text()
        assert body.startswith(f"# {family}, step 8\n")
        assert body.count("\n----------\n") == 63  # the trainer's 64 samples
        assert set(body) <= set(VOCAB)
    # The metric at both evaluations, and below the untrained model's (same data, same unit).
    metric = METRIC[data]
    by_step = {r["step"]: r for r in res.history}
    assert metric in by_step[4] and metric in by_step[8]
    model, fam = _untrained(family, data, out)
    test = digits("test") if data == "digits" else text("valid")
    before = fam.evaluate(model, test, final=data == "text", seed=0)[metric]
    after = by_step[8][metric]
    # Near uniform at first (the tied embeddings favour repeating the last token a little).
    vocab = 18 if data == "digits" else len(VOCAB)
    assert abs(before - math.log2(vocab)) < 0.5, before
    assert 0 < after < before - 0.5, (before, after)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    if data == "digits":
        assert {"classes_covered", "confidence", "frechet"} <= by_step[8].keys()


@pytest.mark.parametrize("family", ["transformer", "rnn"])
def test_digits_bpd_is_the_exact_test_likelihood(runs, family):
    """test_bpd against an independent float64 computation of -log p(test images) / (64 ln 2)."""
    res, out = runs(family, "digits")
    x = digits("test").x  # (N, 1, 8, 8)
    levels = (x.flatten(1) * 16).round().long()  # (N, 64)
    tokens = torch.cat([torch.full((len(x), 1), 17), levels], dim=1)  # (N, 65)
    model = res.model
    if family == "transformer":
        # A float64 copy over the plain-PyTorch attention, not the kernels the run evaluated with.
        ref = TransformerLM(ModelArgs(**{**vars(model.args), "impl": "torch"}))
        ref.load_state_dict(model.state_dict())
        ref = ref.double().eval()
        logits = ref(tokens[:, :-1])  # (N, 64, 18)
    else:
        ref = type(model)(model.args)
        ref.load_state_dict(model.state_dict())
        logits = ref.double().eval()(tokens[:, :-1])[0]  # (N, 64, 18)
    assert logits.dtype == torch.float64
    logp = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (N, 64)
    bpd = -logp.sum().item() / (len(x) * 64 * math.log(2))
    assert res.history[-1]["test_bpd"] == pytest.approx(bpd, rel=1e-6)


# --- resume ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,data", [("transformer", "digits"), ("rnn", "text")])
def test_resumed_run_equals_the_uninterrupted_one(runs, tmp_path, family, data):
    _, full = runs(family, data)
    part = tmp_path / "part"
    assert _train(family, data, part, steps=4).step == 4
    resumed = train(family, steps=8, resume=part, eval_every=4, ckpt_every=4, **QUIET)
    assert resumed.step == 8
    for name in ("model", "optimizer"):
        a, b = _weights(full, name), _weights(part, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    rows_full = json.loads((full / "log.json").read_text())
    rows_part = json.loads((part / "log.json").read_text())
    assert [(r["step"], r["loss"]) for r in rows_part] == [(r["step"], r["loss"]) for r in rows_full]
    # The final evaluation too (the interrupted run's step 4 was a final one, the full run's not).
    strip = lambda row: {k: v for k, v in row.items() if k != "step_ms"}  # noqa: E731
    assert strip(rows_part[-1]) == strip(rows_full[-1])
    assert (part / "samples" / "step-0000008.png").is_file() == (data == "digits")


# --- impls ------------------------------------------------------------------------------------------------


def test_default_impl_matches_the_torch_reference(monkeypatch):
    """The default runs genkern's C++ flash attention on the CPU; impl="torch" the reference."""
    require_impl("cpp")
    spy = KernelCalls(monkeypatch, attention_op.ATTENTION, "cpp")
    kw = dict(
        data="text",
        out=None,
        steps=6,
        batch_size=8,
        model={**TINY["transformer"], "seq_len": 32},
        progress=False,
        log_every=1,
        eval_every=100,
    )
    ours = train("transformer", **kw)
    used = spy.calls
    ref = train("transformer", impl="torch", **kw)
    assert used > 0 and spy.calls == used  # the default called the kernel, impl="torch" never did
    a = [r["loss"] for r in ours.history if "loss" in r]
    b = [r["loss"] for r in ref.history if "loss" in r]
    assert len(a) == 6 and a[-1] < a[0] - 0.1
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=0)
    assert ours.history[-1]["valid_bpc"] == pytest.approx(ref.history[-1]["valid_bpc"], rel=1e-5)


# --- the command line --------------------------------------------------------------------------------------


def test_cli_sample_digits_transformer(runs, tmp_path):
    _, out = runs("transformer", "digits")
    png = tmp_path / "grid.png"
    r = _cli("sample", "--checkpoint", str(out), "-n", "9", "--out", str(png))
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = _cli("sample", "--checkpoint", str(out), "--out", str(tmp_path / "grid.txt"))
    assert r.returncode == 1 and ".png" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "grid.txt").exists()


def test_cli_sample_text_rnn_writes_text(runs, tmp_path):
    _, out = runs("rnn", "text")
    # A text model writes text: beside a .png name with .txt, or to a .txt name as it is.
    r = _cli("sample", "--checkpoint", str(out), "-n", "3", "--out", str(tmp_path / "a.png"))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "a.png").exists()
    body = (tmp_path / "a.txt").read_text()
    assert body.startswith("# rnn, step 8\n") and body.count("\n----------\n") == 2
    assert set(body) <= set(VOCAB)
    assert "a.txt" in r.stdout
    r = _cli("sample", "--checkpoint", str(out), "-n", "2", "--out", str(tmp_path / "b.txt"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b.txt").read_text().count("\n----------\n") == 1


# --- bad input -----------------------------------------------------------------------------------------------


def test_bad_data_and_model_settings(tmp_path):
    out = tmp_path / "run"
    cases = [
        ("transformer", "digits", {"seq_len": 32}, "seq_len must be 64"),
        ("rnn", "digits", {"seq_len": 65}, "seq_len must be 64"),
        ("transformer", "digits", {"width": 8}, r"unknown transformer model config keys \['width'\]"),
        ("rnn", "text", {"layers": 2}, r"unknown rnn model config keys \['layers'\]"),
        ("transformer", "text", {"vocab_size": 50}, "vocab_size 50 is smaller than the text's 97"),
        ("rnn", "text", {"vocab_size": 96}, "vocab_size 96 is smaller than the text's 97"),
        ("transformer", "digits", {"vocab_size": 40}, "vocab_size must be 18 for digits"),
        ("transformer", "text", {"seq_len": 300}, "seq_len 300 exceeds max_seq_len 256"),
        ("transformer", "digits", {"max_seq_len": 64}, "max_seq_len must be at least 65"),
        ("rnn", "text", {"seq_len": 0}, "seq_len must be a positive integer"),
    ]
    for family, data, model, message in cases:
        with pytest.raises(ValueError, match=message):
            train(family, data=data, steps=2, out=out, model=model, progress=False)
    for family in ("transformer", "rnn"):
        with pytest.raises(ValueError, match="'text' or 'digits' for the " + family):
            train(family, data="ring", steps=2, out=out, progress=False)
        with pytest.raises(ValueError, match="'text' or 'digits'"):
            train(family, data=torch.rand(100, 1, 8, 8), steps=2, out=out, progress=False)
    with pytest.raises(ValueError, match="impl must be one of"):
        train("rnn", data="digits", steps=2, out=out, impl="fast", progress=False)
    assert not out.exists()  # every check runs before anything is written


def test_rnn_accepts_the_impl_every_family_is_given():
    res = train("rnn", data="digits", steps=1, batch_size=8, model=TINY["rnn"], impl="torch", progress=False)
    assert res.step == 1 and "test_bpd" in res.history[-1]


# --- distributed --------------------------------------------------------------------------------------------


def test_two_processes_match_one_on_the_same_global_batch(runs, tmp_path):
    _, one = runs("transformer", "digits")
    sets = [a for k, v in TINY["transformer"].items() for a in ("--set", f"{k}={v}")]
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
            "transformer",
            "--data",
            "digits",
            "--steps",
            "8",
            "--batch-size",
            "32",
            "--lr",
            str(RUN["lr"]),
            *sets,
            "--eval-every",
            "4",
            "--ckpt-every",
            "4",
            "--quiet",
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
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a, b = _weights(one), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
    # ... and training moved the weights well beyond that tolerance.
    init, _ = _untrained("transformer", "digits", one)
    init = init.state_dict()
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3
