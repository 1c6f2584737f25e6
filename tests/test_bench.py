"""Smoke tests of the benchmark runner (genkern.bench): quick runs on a tiny size."""
import argparse
import json
import os

import pytest
import torch

from genkern.bench import COMPILE, Target, runner, select_cases
from genkern.bench.reparam_kl import ReparamKLCase

TINY = ["--quick", "--sizes", "8x16", "--no-compile", "--budget", "0.01", "--repeats", "3"]


def _run(*args):
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return runner.run(parser.parse_args(list(args)))


def _results(out_dir, device="cpu"):
    with open(os.path.join(out_dir, runner.device_slug(device) + ".json")) as f:
        return json.load(f)


def test_quick_run_writes_json_with_the_fields(tmp_path, capsys):
    assert _run(*TINY, "--device", "cpu", "--out", str(tmp_path)) == 0
    assert "ratio = torch time / impl time" in capsys.readouterr().out
    data = _results(tmp_path)
    assert data["device"]["type"] == "cpu" and data["device"]["slug"].startswith("cpu-")
    assert {"genkern", "torch", "triton"} <= set(data["versions"])
    assert data["copy_gbps"] > 0 and data["matmul_tflops"]["float32"] > 0 and data["threads"] >= 1
    entries = data["results"]["reparameterize_kl"]
    assert set(entries) == {"8x16/float32/fwd", "8x16/float32/bwd", "8x16/float32/fwd+bwd"}
    for e in entries.values():
        assert e["sizes"] == {"B": 8, "D": 16} and e["bytes"] > 0
        assert e["impls"]["torch"]["status"] == "ok" and e["impls"]["torch"]["ratio"] == 1.0
        assert e["impls"]["cpp"]["status"] in ("ok", "unavailable")
        for r in e["impls"].values():
            if r["status"] == "ok":
                assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["gbps"] > 0
                assert r["ratio"] == pytest.approx(e["impls"]["torch"]["median_ms"] / r["median_ms"])
    assert "retain" in entries["8x16/float32/bwd"]["method"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_results_merge_by_op_and_case(tmp_path):
    path = tmp_path / (runner.device_slug("cpu") + ".json")
    old = {"results": {"gan_loss": {"64/float32/fwd": {"kept": 1}},
                       "reparameterize_kl": {"1x1/float32/fwd": {"kept": 2}, "8x16/float32/fwd": {"stale": 3}}}}
    path.write_text(json.dumps(old))
    assert _run(*TINY, "--device", "cpu", "--direction", "fwd", "--out", str(tmp_path)) == 0
    results = _results(tmp_path)["results"]
    assert results["gan_loss"] == {"64/float32/fwd": {"kept": 1}}
    assert results["reparameterize_kl"]["1x1/float32/fwd"] == {"kept": 2}
    assert "stale" not in results["reparameterize_kl"]["8x16/float32/fwd"]
    assert "8x16/float32/bwd" not in results["reparameterize_kl"]


def test_ratio_and_bandwidth_arithmetic():
    assert runner.speedup(6.0, 1.5) == 4.0
    r = runner.summarize([0.003, 0.001, 0.002], nbytes=10**6, ref_ms=4.0, copy_gbps=1.0)
    assert r["median_ms"] == pytest.approx(2.0) and r["ratio"] == pytest.approx(2.0)
    assert r["gbps"] == pytest.approx(0.5) and r["frac_copy_bw"] == pytest.approx(0.5)
    assert r["q1_ms"] == pytest.approx(1.5) and r["iqr_ms"] == pytest.approx(1.0)


def test_targets_pass_fail_and_not_applicable():
    impls = {"torch": {"status": "ok", "median_ms": 10.0}, "cpp": {"status": "ok", "median_ms": 2.0},
             "triton": {"status": "unavailable", "error": "x"}}
    assert Target("cpu", "fwd+bwd", "speedup", 4.0).evaluate(impls, "cpp")["passed"] is True
    assert Target("cpu", "fwd+bwd", "speedup", 6.0).evaluate(impls, "cpp")["value"] == 5.0
    assert Target("cpu", "fwd+bwd", "speedup", 1.0, vs=COMPILE).evaluate(impls, "cpp")["passed"] is None
    assert Target("cuda", "fwd+bwd", "speedup", 1.0).evaluate(impls, "triton")["passed"] is False
    fast = {"triton": {"status": "ok", "median_ms": 1.0, "frac_copy_bw": 0.85}}
    assert Target("cuda", "fwd+bwd", "copy_bw", 0.8).evaluate(fast, "triton")["passed"] is True


class _BrokenCase(ReparamKLCase):
    def impl_fn(self, impl):
        if impl == "cpp":
            raise NotImplementedError("reparam_kl_cpp_fwd is a placeholder")
        if impl == "triton":
            raise ValueError("kernel exploded")
        return super().impl_fn(impl)


def test_unavailable_and_failed_impls_are_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(runner, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    entry = runner.bench_case(_BrokenCase(4, 8), "fwd+bwd", torch.device("cpu"),
                              ["torch", "cpp", "triton", COMPILE], budget_s=0.0, max_rounds=3)
    impls = entry["impls"]
    assert impls["torch"]["status"] == "ok" and impls["torch"]["n"] == 3
    assert impls["cpp"] == {"status": "unavailable",
                            "error": "NotImplementedError: reparam_kl_cpp_fwd is a placeholder"}
    assert impls["triton"]["status"] == "failed" and "kernel exploded" in impls["triton"]["error"]
    assert impls[COMPILE]["status"] == "failed" and "no compiler" in impls[COMPILE]["error"]


def test_measure_interleaves_and_records_a_failing_call():
    calls = {"ok": lambda: None, "bad": lambda: 1 / 0}
    samples, errors = runner.measure(calls, torch.device("cpu"), budget_s=0.0, max_rounds=5)
    assert list(samples) == ["ok"] and len(samples["ok"]) == runner.MIN_ROUNDS
    assert errors == {"bad": "ZeroDivisionError: division by zero"}


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert _run("--sizes", "8-by-16", "--out", str(tmp_path)) == 2
    assert _run("--op", "reparameterize_kl", "--sizes", "8-by-16", "--out", str(tmp_path)) == 2
    assert _run("--op", "no_such_op", "--out", str(tmp_path)) == 2
    assert _run("--quick", "--threads", "0", "--out", str(tmp_path)) == 2
    assert "BxD" in capsys.readouterr().err


def test_case_selection_and_bytes():
    assert [c.name for c in select_cases("reparameterize_kl", quick=True)] == ["256x64"]
    assert {c.name for c in select_cases("reparameterize_kl")} >= {"256x64", "4096x1024", "65536x512"}
    case = ReparamKLCase(2, 3)  # fwd: 3*6 + 2 elements; bwd: 5*6 + 2; float32
    assert (case.bytes_moved("fwd"), case.bytes_moved("bwd"), case.bytes_moved("fwd+bwd")) == (80, 128, 208)


@pytest.mark.gpu
def test_quick_run_on_cuda(tmp_path):
    assert _run(*TINY, "--device", "cuda", "--out", str(tmp_path)) == 0
    data = _results(tmp_path, "cuda")
    assert data["matmul_tflops"]["bfloat16"] > 0
    fwd = data["results"]["reparameterize_kl"]["8x16/float32/fwd"]
    assert fwd["impls"]["torch"]["peak_mem_bytes"] is not None
