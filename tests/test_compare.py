"""genkern.compare and `genkern compare`: one quick comparison, run once through the CLI, checked."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from genkern.compare import FAMILIES, PRESETS, compare, format_table, settings_for

LOG2_17 = math.log2(17)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`genkern compare --quick` in this process: (report from compare.json, printed text, out dir)."""
    from genkern.cli import main

    out = tmp_path_factory.mktemp("compare") / "results"
    threads = torch.get_num_threads()
    text, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(err):
        rc = main(["compare", "--quick", "--out", str(out), "--device", "cpu"])
    assert rc == 0, err.getvalue()
    assert torch.get_num_threads() == threads  # compare restores the thread count
    return json.loads((out / "compare.json").read_text()), text.getvalue(), out


def test_report_records_settings_environment_and_the_shared_budget(run):
    report, _, _ = run
    assert report["format"] == "genkern-compare"
    assert report["date"] and report["environment"]["torch"] == torch.__version__
    assert report["environment"]["device"] == "cpu"
    s = report["settings"]
    quick = PRESETS["quick"]
    assert (s["steps"], s["batch_size"], s["seeds"]) == (quick.steps, quick.batch_size, quick.seeds)
    assert f"{s['steps']} steps on batches of {s['batch_size']}" in s["budget"]
    assert set(report["families"]) == set(FAMILIES)
    for fam, r in report["families"].items():
        assert [run["seed"] for run in r["runs"]] == quick.seeds, fam
        assert all(not run["diverged"] for run in r["runs"]), fam
        assert r["stability"]["runs"] == len(quick.seeds) and r["stability"]["diverged"] == 0


def test_likelihoods_by_family(run):
    fams = run[0]["families"]
    vae = fams["vae"]["likelihood"]
    assert vae["kind"] == "bound" and vae["num_samples"] == PRESETS["quick"].num_samples
    for r in fams["vae"]["runs"]:
        lik = r["likelihood"]
        assert lik["iw_bits_per_dim"] <= lik["elbo_bits_per_dim"]
        assert lik["bits_per_dim"] == lik["iw_bits_per_dim"]
        assert lik["nats"] == pytest.approx(lik["bits_per_dim"] * 64 * math.log(2))
    assert vae["iw_bits_per_dim"]["mean"] <= vae["elbo_bits_per_dim"]["mean"] < LOG2_17 - 1
    tr = fams["transformer"]["likelihood"]
    assert tr["kind"] == "exact" and 0 < tr["bits_per_dim"]["max"] < LOG2_17 - 1
    gan = fams["gan"]["likelihood"]
    assert gan["kind"] is None and gan["bits_per_dim"] is None and "implicit" in gan["note"]
    assert all(r["likelihood"]["bits_per_dim"] is None for r in fams["gan"]["runs"])


def test_sample_quality_and_stability(run):
    report = run[0]
    ref = report["reference"]["frechet"]
    assert 0 <= ref < 10  # held-out digits against the training digits
    for fam, r in report["families"].items():
        for one in r["runs"]:
            assert math.isfinite(one["frechet"]) and one["frechet"] > ref, fam
            assert 0 <= one["classes_covered"] <= 10 and sum(one["class_counts"]) == 1000
            assert 0 < one["confidence"] <= 1
            assert math.isfinite(one["final_loss"])
        for key in ("frechet", "classes_covered", "confidence"):
            st = r[key]
            assert st["n"] == 2 and st["min"] <= st["mean"] <= st["max"] and st["std"] >= 0
        st = r["stability"]
        assert st["frechet"] == r["frechet"]
        values = [one["final_loss"] for one in r["runs"]]
        assert st["final_loss"]["min"] == min(values) and st["final_loss"]["max"] == max(values)
        assert st["final_loss"]["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))


def test_speeds(run):
    fams = run[0]["families"]
    for fam, r in fams.items():
        for key in ("train_s", "wall_s", "steps_per_s", "samples_per_s"):
            assert r[key]["min"] > 0, (fam, key)
        assert r["train_s"]["max"] <= r["wall_s"]["max"]
    # One decoder pass per batch against one pass per pixel: the gap is orders of magnitude.
    assert fams["transformer"]["samples_per_s"]["max"] < fams["vae"]["samples_per_s"]["min"]
    assert fams["transformer"]["samples_per_s"]["max"] < fams["gan"]["samples_per_s"]["min"]


def test_outputs_and_table(run):
    report, text, out = run
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for fam in FAMILIES:
        assert any(line.startswith(fam) for line in text.splitlines()), fam
    assert "data (test)" in text and "implicit" in text and "compare.json" in text
    assert format_table(report) in text  # the table renders from the JSON alone


def test_a_diverged_run_is_counted_not_fatal(run):
    from genkern.compare_report import aggregate

    report = run[0]
    ok = report["families"]["vae"]["runs"][0]
    bad = {"seed": 7, "diverged": True, "error": "training diverged at step 3"}
    agg = aggregate("vae", [ok, bad])
    assert agg["stability"]["diverged"] == 1 and agg["stability"]["runs"] == 2
    assert agg["frechet"]["n"] == 1 and agg["frechet"]["mean"] == ok["frechet"] and agg["frechet"]["std"] == 0
    none = aggregate("vae", [bad])
    assert none["frechet"] is None and none["likelihood"]["bits_per_dim"] is None
    table = format_table({**report, "families": {**report["families"], "vae": none}})
    assert "1/1" in table.splitlines()[3]  # the vae row: one of one runs diverged


def test_settings_presets_and_overrides():
    assert settings_for(quick=True).seeds == [0, 1]
    assert len(settings_for().seeds) == 3
    assert settings_for(device=torch.device("cuda")).preset == "large"
    assert settings_for(quick=True, device=torch.device("cuda")).preset == "quick"
    s = settings_for(seeds=4, steps=7)
    assert (s.seeds, s.steps) == ([0, 1, 2, 3], 7)
    assert settings_for(seeds=[5, 9]).seeds == [5, 9]
    assert PRESETS["default"].models["vae"]["hidden"] == 256  # presets are not modified by overrides
    for kwargs, match in (
        ({"seeds": 0}, "seeds"),
        ({"seeds": [1, 1]}, "seeds"),
        ({"steps": 0}, "steps"),
        ({"quick": True, "large": True}, "exclude"),
    ):
        with pytest.raises(ValueError, match=match):
            settings_for(**kwargs)
    with pytest.raises(ValueError, match="threads"):
        compare(quick=True, out=None, threads=0, progress=False)


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "genkern", "compare", "--quick", "--seeds", "0", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "seeds" in out.stderr
    assert not (tmp_path / "x").exists()  # nothing written before the settings are checked
