"""genkern.profile_generation / `genkern profile`, and the decode-attention benchmark cases."""

import json
import os

import pytest
import torch

from genkern import cli
from genkern._ext import available as cpp_available
from genkern.bench import kv_decode as kv_cases
from genkern.models import ModelArgs, TransformerLM
from genkern.nn.attention import CausalAttention
from genkern.profiling import load_model, profile_generation

MODES = ("genkern", "torch", "no_cache") if cpp_available() else ("torch", "no_cache")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    rep = profile_generation(
        "tiny", batch_sizes=(1, 2), context_lengths=(8, 24), new_tokens=3, modes=MODES, out=out, progress=False
    )
    return rep, out


def test_report_rows(report):
    rep, _ = report
    assert {(r["mode"], r["batch"], r["context"]) for r in rep["rows"]} == {
        (m, b, c) for m in MODES for b in (1, 2) for c in (8, 24)
    }
    for r in rep["rows"]:
        assert 0 < r["decode_ms_median"] <= r["decode_ms_p90"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["decode_ms_median"] / 1e3))
        assert 0 <= r["attention_share"] <= 1
        if r["mode"] == "no_cache":
            assert r["kv_cache_bytes"] == 0
        else:
            # 2 layers x (k, v) x batch x heads x positions (context + 3 new + 2 spare) x head dim x 4 bytes.
            args = ModelArgs(**{k: v for k, v in rep["model"].items() if k != "impl"})
            positions = r["context"] + 3 + 2
            expect = 2 * args.n_layers * r["batch"] * args.n_kv_heads * positions * args.head_dim * 4
            assert r["kv_cache_bytes"] == expect + 4 * r["batch"]  # + the int32 lengths


def test_speedups_and_files(report):
    rep, out = report
    if "genkern" in MODES:
        assert {(s["batch"], s["context"]) for s in rep["speedups"]} == {(b, c) for b in (1, 2) for c in (8, 24)}
        assert all(s["vs_torch"] > 0 and s["vs_no_cache"] > 0 for s in rep["speedups"])
    saved = json.loads((out / "profile.json").read_text())
    assert saved["rows"] == rep["rows"]
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out)) == ["profile.json", "profile.png"]  # no temporary files left


def test_attention_share_hooks_the_attention_modules():
    # The share is timed by forward hooks on the model's attention modules, removed afterwards.
    from genkern.nn.attention import CausalAttention
    from genkern.profiling import _attention_share

    net = TransformerLM(ModelArgs(vocab_size=32, dim=32, n_layers=2, n_heads=2, max_seq_len=64, impl="torch"))
    attn = [m for m in net.modules() if isinstance(m, CausalAttention)]
    assert len(attn) == 2
    idx = torch.randint(0, 32, (1, 16))
    with torch.no_grad():
        share = _attention_share(net, lambda: net(idx), "cpu")
    assert 0 < share < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in attn)
    with torch.no_grad():
        assert _attention_share(torch.nn.Linear(2, 2), lambda: net(idx), "cpu") == 0.0  # nothing hooked


@pytest.mark.parametrize("mode", ["torch", "no_cache"])
def test_baseline_modes_run_on_sdpa(mode, monkeypatch):
    # "torch" and "no_cache" attend with torch's SDPA (the plain cached loop on a PlainKVCache, or
    # the whole context): genkern's attention ops never run, and the model gets its modules back.
    import genkern.kvcache
    import genkern.nn.attention
    from genkern.bench import baseline_models
    from genkern.profiling import profile_one

    calls = []
    real_sdpa = baseline_models.sdpa
    monkeypatch.setattr(
        baseline_models,
        "sdpa",
        lambda q, k, v, **kw: calls.append((q.shape[2], k.shape[2], kw.get("attn_mask"))) or real_sdpa(q, k, v, **kw),
    )
    for where, name in ((genkern.nn.attention, "flash_attention"), (genkern.kvcache, "attention_with_kvcache")):
        monkeypatch.setattr(where, name, lambda *a, name=name, **kw: pytest.fail(f"{name} ran in mode {mode}"))
    net = TransformerLM(ModelArgs(vocab_size=32, dim=32, n_layers=2, n_heads=2, max_seq_len=64))
    before = [m for m in net.modules() if isinstance(m, CausalAttention)]
    row = profile_one(net, mode, 1, 6, 3, "cpu")
    assert row["mode"] == mode and row["decode_ms_median"] > 0
    assert [m for m in net.modules() if isinstance(m, CausalAttention)] == before
    # (queries, keys, mask) per call and layer of the timed run: the 6-token prompt, 3 new tokens, one
    # more step for the attention share; one query against the filled part of the cache (equal rows:
    # no mask), or every position (is_causal).
    lengths = (6, 7, 8, 9, 10)
    want = [(6, 6, None)] + [(1 if mode == "torch" else n, n, None) for n in lengths[1:]]
    assert calls[-10:] == [c for c in want for _ in range(2)], calls


def test_model_impl_restored(tmp_path):
    net = TransformerLM(ModelArgs(vocab_size=32, dim=32, n_layers=1, n_heads=2, max_seq_len=64))
    profile_generation(net, context_lengths=(4,), new_tokens=2, modes=("torch", "no_cache"), progress=False)
    assert net.args.impl == "auto"


def test_checkpoint_directory(tmp_path):
    from safetensors.torch import save_file

    args = ModelArgs(vocab_size=32, dim=32, n_layers=1, n_heads=2, max_seq_len=64, tie_embeddings=False)
    net = TransformerLM(args)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"args": net.config()}))
    loaded = load_model(str(tmp_path))
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable TransformerLM checkpoint"):
        load_model(str(tmp_path))


def test_training_run_directory(tmp_path):
    from genkern.train import train

    res = train(
        "transformer",
        data="digits",
        steps=2,
        batch_size=8,
        out=tmp_path / "run",
        progress=False,
        model={"dim": 32, "n_layers": 1, "n_heads": 2},
    )
    for where in (tmp_path / "run", next((tmp_path / "run" / "checkpoints").iterdir())):
        loaded = load_model(str(where))
        for (k, a), (_, b) in zip(res.model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k
    train("vae", data="digits", steps=2, batch_size=8, out=tmp_path / "vae", progress=False, model={"hidden": 8})
    with pytest.raises(ValueError, match="holds a vae model, not a TransformerLM"):
        load_model(str(tmp_path / "vae"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"modes": ("fast",)}, "modes must be among"),
        ({"batch_sizes": (0,)}, "batch_sizes must be positive"),
        ({"context_lengths": ()}, "context_lengths must be positive"),
        ({"new_tokens": 1}, "new_tokens must be an int >= 2"),
        ({"context_lengths": (5000,)}, "exceeds the model's max_seq_len"),
        ({"model": "no-such-preset"}, "model must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"model": "tiny", "progress": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        profile_generation(**kwargs)


def test_cli_profile(tmp_path, capsys):
    rc = cli.main(
        [
            "profile",
            "--model",
            "tiny",
            "--context",
            "8",
            "--new-tokens",
            "2",
            "--modes",
            "torch,no_cache",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert "tokens/s" in capsys.readouterr().out
    assert (tmp_path / "profile.json").exists() and (tmp_path / "profile.png").exists()
    assert cli.main(["profile", "--model", "tiny", "--modes", "nope", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "modes must be among" in err[0]


def test_kv_decode_case_labels():
    case = kv_cases.make_case("8x32x4096x64-kv8")
    assert case.name == "8x32x4096x64-kv8" and case.directions == ("fwd",)
    # K and V over 4096 positions dominate: 2 * 8 * 8 * 4096 * 64 floats.
    assert case.bytes_moved("fwd") == 4 * (2 * 8 * 8 * 4096 * 64 + 2 * 8 * 32 * 64 + 4 * 8 * 8 * 64)
    assert kv_cases.make_case("1x8x512x64-bf16").dtype == torch.bfloat16
    for bad in ("8x32x4096", "8x6x4096x64-kv4", "0x8x512x64"):
        with pytest.raises(ValueError, match="kv_decode sizes"):
            kv_cases.make_case(bad)


def test_kv_decode_case_runs():
    case = kv_cases.make_case("2x4x40x16-kv2")
    x = case.make_inputs("cpu")
    ref = case.impl_fn("torch")({k: v.clone() for k, v in x.items()})[0]
    sdpa = case.impl_fn(kv_cases.SDPA)({k: v.clone() for k, v in x.items()})[0]
    torch.testing.assert_close(sdpa, ref, rtol=1e-5, atol=1e-5)
