"""Smoke tests of the benchmark runner (genkern.bench): quick runs on a tiny size, the attention cases."""

import argparse
import json
import os

import pytest
import torch

from genkern.bench import (
    COMPILE,
    FAIL,
    MIN_ROUNDS,
    NOISE,
    NOT_APPLICABLE,
    PASS,
    SDPA,
    Target,
    baselines,
    case_directions,
    memory,
    report,
    runner,
    select_cases,
    timing,
)
from genkern.bench import attention as attn_bench
from genkern.bench import gan_loss as gan_bench
from genkern.bench import kv_decode as kv_bench
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
    old = {
        "results": {
            "gan_loss": {"64/float32/fwd": {"kept": 1}},
            "reparameterize_kl": {"1x1/float32/fwd": {"kept": 2}, "8x16/float32/fwd": {"stale": 3}},
        }
    }
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
    assert "tflops" not in r
    r = runner.summarize([0.002], nbytes=1, flops=2 * 10**9, matmul_tflops=4.0)
    assert r["tflops"] == pytest.approx(1.0) and r["frac_matmul"] == pytest.approx(0.25)


def _timed(median_ms, q1_ms=None, q3_ms=None, n=MIN_ROUNDS, **extra):
    q1_ms, q3_ms = median_ms if q1_ms is None else q1_ms, median_ms if q3_ms is None else q3_ms
    return {"status": "ok", "median_ms": median_ms, "q1_ms": q1_ms, "q3_ms": q3_ms, "n": n, **extra}


def test_targets_pass_fail_and_not_applicable():
    impls = {
        "torch": _timed(10.0, 9.9, 10.1),
        "cpp": _timed(2.0, 1.95, 2.05),
        "triton": {"status": "unavailable", "error": "x"},
    }
    assert Target("cpu", "fwd+bwd", "speedup", 4.0).evaluate(impls, "cpp")["passed"] is True
    assert Target("cpu", "fwd+bwd", "speedup", 6.0).evaluate(impls, "cpp")["value"] == 5.0
    assert Target("cpu", "fwd+bwd", "speedup", 1.0, vs=COMPILE).evaluate(impls, "cpp")["passed"] is None
    assert Target("cuda", "fwd+bwd", "speedup", 1.0).evaluate(impls, "triton")["passed"] is False
    fast = {"triton": _timed(1.0, 0.99, 1.01, frac_copy_bw=0.85)}
    assert Target("cuda", "fwd+bwd", "copy_bw", 0.8).evaluate(fast, "triton")["passed"] is True


class _BrokenCase(ReparamKLCase):
    def impl_fn(self, impl):
        if impl == "cpp":
            raise NotImplementedError("reparam_kl_cpp_fwd is a placeholder")
        if impl == "triton":
            raise ValueError("kernel exploded")
        return super().impl_fn(impl)


def test_unavailable_and_failed_impls_are_recorded_not_raised(monkeypatch):
    monkeypatch.setattr(timing, "_compiled", {})
    monkeypatch.setattr(torch, "compile", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no compiler")))
    entry = runner.bench_case(
        _BrokenCase(4, 8),
        "fwd+bwd",
        torch.device("cpu"),
        ["torch", "cpp", "triton", COMPILE],
        budget_s=0.0,
        max_rounds=3,
    )
    impls = entry["impls"]
    assert impls["torch"]["status"] == "ok" and impls["torch"]["n"] == 3
    assert impls["cpp"] == {
        "status": "unavailable",
        "error": "NotImplementedError: reparam_kl_cpp_fwd is a placeholder",
    }
    assert impls["triton"]["status"] == "failed" and "kernel exploded" in impls["triton"]["error"]
    assert impls[COMPILE]["status"] == "failed" and "no compiler" in impls[COMPILE]["error"]


def test_measure_interleaves_and_records_a_failing_call():
    calls = {"ok": lambda: None, "bad": lambda: 1 / 0}
    samples, errors = runner.measure(calls, torch.device("cpu"), budget_s=0.0, max_rounds=runner.MIN_ROUNDS + 5)
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


# --- attention: cases, labels, flops, memory, a quick run ------------------------------


def test_attention_cases_build_with_their_targets():
    names = [c.name for c in attn_bench.CASES]
    assert len(set(names)) == len(names)
    assert {"1x8x2048x64-causal", "1x8x8192x64-causal", "1x16x16384x128-causal-bf16"} <= set(names)
    for case in attn_bench.CASES:
        assert attn_bench.make_case(case.name).name == case.name and case.baselines == (SDPA,)
    quick = select_cases("attention", quick=True, device_type="cpu")
    assert quick and all(c.quick and c.sizes["T"] <= 256 for c in quick)
    # CPU: float32, and one bfloat16 case (the matrix instructions) held to SDPA's bfloat16
    cpu = select_cases("attention", device_type="cpu")
    assert [c.name for c in cpu if c.dtype != torch.float32] == ["1x8x2048x64-causal-bf16"]
    cpu_bf16 = next(c for c in cpu if c.dtype == torch.bfloat16)
    assert {(t.direction, t.vs, t.minimum) for t in cpu_bf16.targets} == {("fwd", SDPA, 1.5), ("fwd+bwd", SDPA, 1.5)}
    gpu = [c for c in select_cases("attention", device_type="cuda") if not c.quick]
    assert {c.sizes["T"] for c in gpu} == {1024, 2048, 4096, 8192, 16384}
    # The GPU suite: bf16 and fp16, D 64 and 128 (H * D = 2048), causal and full, 16k tokens per batch.
    assert {(c.dtype, c.sizes["D"], c.causal, c.sizes["T"]) for c in gpu} == {
        (dt, d, causal, t)
        for dt in (torch.bfloat16, torch.float16)
        for d in (64, 128)
        for causal in (True, False)
        for t in (1024, 2048, 4096, 8192, 16384)
    }
    assert len(gpu) == 40 and not any(c.runs_on("cpu") for c in gpu)
    assert all(c.sizes["B"] * c.sizes["T"] == 16384 and c.sizes["H"] * c.sizes["D"] == 2048 for c in gpu)
    cpu_2k = select_cases("attention", ["1x8x2048x64-causal"], device_type="cpu")[0]
    assert {(t.device, t.direction, t.vs, t.minimum) for t in cpu_2k.targets} == {
        ("cpu", "fwd+bwd", "torch", 4.0),
        ("cpu", "fwd+bwd", SDPA, 1.0),
        ("cpu", "fwd", SDPA, 1.0),
    }
    # On CUDA the same label is no listed case: make_case builds it, without targets.
    assert select_cases("attention", ["1x8x2048x64-causal"], device_type="cuda")[0].targets == ()


def test_attention_labels_parse_and_bad_ones_raise():
    case = attn_bench.make_case("1x8x2048x64-causal")
    assert case.sizes == {"B": 1, "H": 8, "Hkv": 8, "T": 2048, "D": 64}
    assert case.causal and case.dtype == torch.float32
    case = attn_bench.make_case("2x8x512x128-full-kv2-bf16")
    assert case.sizes["Hkv"] == 2 and not case.causal and case.dtype == torch.bfloat16
    assert case.name == "2x8x512x128-full-kv2-bf16"
    for bad in (
        "1x8x2048x64",
        "1x8x2048-causal",
        "1x8x2048x64-sideways",
        "1x8x2048x64-causal-kv3",
        "0x8x64x64-full",
        "1x8x64x64-full-int8",
        "axbxcxd-causal",
        "1x8x64x64-causal-kv0",
    ):
        with pytest.raises(ValueError, match="BxHxTxD"):
            attn_bench.make_case(bad)
    with pytest.raises(ValueError, match="BxHxTxD"):
        select_cases("attention", ["1x8x2048x64"])


def test_attention_flops_count_half_for_causal():
    full, causal = attn_bench.make_case("2x3x64x16-full"), attn_bench.make_case("2x3x64x16-causal-kv1")
    fwd = 4 * 2 * 3 * 64 * 64 * 16  # two matmuls of 2*B*H*T*S*D
    assert [full.flops(d) for d in ("fwd", "bwd", "fwd+bwd")] == [fwd, 2.5 * fwd, 3.5 * fwd]
    assert [causal.flops(d) for d in ("fwd", "bwd", "fwd+bwd")] == [fwd // 2, 1.25 * fwd, 1.75 * fwd]
    assert full.bytes_moved("fwd") == (4 * 2 * 3 * 64 * 16) * 4 + 2 * 3 * 64 * 4  # q, k, v, out; lse
    assert causal.bytes_moved("fwd+bwd") < full.bytes_moved("fwd+bwd")  # one KV head, not three


def test_attention_impls_agree_on_a_tiny_case():
    for label in ("2x4x16x8-causal-kv2", "1x2x16x8-full"):
        case = attn_bench.make_case(label)
        x = case.make_inputs("cpu")
        assert x["q"].shape == (case.sizes["B"], case.sizes["H"], 16, 8) and x["k"].shape[1] == case.sizes["Hkv"]
        (plain,), (sdpa,) = case.impl_fn("torch")(x), case.impl_fn(SDPA)(x)
        torch.testing.assert_close(plain, sdpa, rtol=1e-4, atol=1e-5)


def test_memory_measure_plain_needs_the_scores_fused_does_not():
    case = attn_bench.make_case("1x4x1024x64-causal")
    x = case.make_inputs("cpu")
    scores = 4 * 4 * 1024 * 1024  # one float32 (B, H, T, S) score matrix: 16 MiB
    out = 4 * 4 * 1024 * 64
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # sdpa's CPU kernel takes scratch blocks per thread
    try:
        peaks = {
            (impl, direction): memory.peak_memory(runner.prepare(case, impl, direction, "cpu", x), "cpu")
            for impl in ("torch", SDPA)
            for direction in ("fwd", "fwd+bwd")
        }
    finally:
        torch.set_num_threads(threads)
    for direction in ("fwd", "fwd+bwd"):
        plain, fused = peaks["torch", direction], peaks[SDPA, direction]
        assert 1.5 * scores <= plain <= 5 * scores, (direction, plain)
        assert out <= fused <= 16 * out, (direction, fused)  # O(T * D): the output, grads, small blocks
        assert plain > 5 * fused
        assert plain <= case.memory_needed("torch", direction) <= 2 * plain  # the guard's estimate
    assert case.memory_needed(SDPA, "fwd") is None and case.memory_needed("cpp", "fwd+bwd") is None


def test_memory_guard_skips_an_impl_over_the_limit():
    assert memory.memory_limit("cpu", 0) is None and memory.memory_limit("cpu", 2) == 2 * memory.GIB
    assert memory.memory_limit("cpu") > 0
    case = attn_bench.make_case("1x2x64x16-causal")
    entry = runner.bench_case(case, "fwd", torch.device("cpu"), ["torch"], budget_s=0.0, max_rounds=3, mem_limit=1000)
    torch_r, sdpa_r = entry["impls"]["torch"], entry["impls"][SDPA]
    assert torch_r["status"] == "skipped" and torch_r["error"].startswith("needs ~")
    assert torch_r["needs_bytes"] == case.memory_needed("torch", "fwd") > 1000
    assert sdpa_r["status"] == "ok" and sdpa_r["ratio"] is None and sdpa_r["tflops"] > 0
    assert runner.case_impls(case, ["torch", "cpp", COMPILE]) == ["torch", "cpp", SDPA, COMPILE]
    assert runner.case_impls(ReparamKLCase(2, 3), ["torch", "cpp"]) == ["torch", "cpp"]


def test_quick_attention_run_records_every_impl(tmp_path, capsys):
    args = ("--op", "attention", "--quick", "--no-compile", "--budget", "0.01", "--repeats", "3")
    assert _run(*args, "--device", "cpu", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "TFLOP/s" in out and "sdpa" in out
    data = _results(tmp_path)
    assert data["settings"]["mem_limit_gib"] > 0
    entries = data["results"]["attention"]
    assert {k.rsplit("/", 2)[0] for k in entries} == {c.name for c in select_cases("attention", quick=True)}
    for e in entries.values():
        case = attn_bench.make_case(e["case"])
        assert e["flops"] == case.flops(e["direction"]) and list(e["impls"]) == ["torch", "cpp", SDPA]
        assert e["impls"]["torch"]["status"] == "ok" and e["impls"][SDPA]["status"] == "ok"
        # The C++ kernel may be unbuilt (or broken) here: recorded as a status, the run goes on.
        assert e["impls"]["cpp"]["status"] in ("ok", "unavailable", "failed")
        for r in e["impls"].values():
            if r["status"] != "ok":
                assert r["error"]
                continue
            assert r["tflops"] == pytest.approx(e["flops"] / (r["median_ms"] / 1e3) / 1e12)
            assert r["peak_mem_bytes"] is not None and r["peak_mem_bytes"] >= 0


@pytest.mark.gpu
def test_quick_attention_run_on_cuda(tmp_path):
    args = ("--op", "attention", "--quick", "--no-compile", "--budget", "0.01", "--repeats", "3")
    assert _run(*args, "--device", "cuda", "--out", str(tmp_path)) == 0
    for e in _results(tmp_path, "cuda")["results"]["attention"].values():
        assert list(e["impls"]) == ["torch", "triton", SDPA]
        for name in ("torch", SDPA):
            r = e["impls"][name]
            assert r["status"] == "ok" and r["tflops"] > 0 and r["peak_mem_bytes"] is not None


# --- verdicts: noise decides nothing -----------------------------------------------------


def _entry(torch_ms, cpp_ms, minimum=4.0, **kw):
    impls = {"torch": runner.summarize([t / 1e3 for t in torch_ms], 1)}
    ref_q = (impls["torch"]["q1_ms"], impls["torch"]["q3_ms"])
    impls["cpp"] = runner.summarize([t / 1e3 for t in cpp_ms], 1, impls["torch"]["median_ms"], ref_q=ref_q, **kw)
    return impls


def test_verdicts_pass_fail_and_within_noise_from_synthetic_samples():
    n = MIN_ROUNDS
    target = Target("cpu", "fwd+bwd", "speedup", 4.0)
    tight = _entry([10.0 + 0.01 * i for i in range(n)], [2.0 + 0.01 * i for i in range(n)])
    noisy = _entry([6.0, 7.0] * 2 + [10.0] * (n - 4), [2.0] * (n - 4) + [3.0, 4.0] * 2)  # medians 10 and 2
    slow = _entry([10.0] * n, [3.0] * n)
    few = _entry([10.0] * 3, [2.0] * 3)
    assert noisy["cpp"]["ratio"] == pytest.approx(5.0) and noisy["cpp"]["ratio_low"] < 4.0
    results = {name: target.evaluate(impls, "cpp") for name, impls in [("tight", tight), ("noisy", noisy)]}
    results.update(slow=target.evaluate(slow, "cpp"), few=target.evaluate(few, "cpp"))
    assert {k: r["verdict"] for k, r in results.items()} == {
        "tight": PASS,
        "noisy": NOISE,  # the medians pass (5x), the conservative end (torch q1 / cpp q3) does not
        "slow": FAIL,
        "few": NOISE,  # 3 rounds: the quartiles mean nothing yet
    }
    assert [results[k]["passed"] for k in ("tight", "noisy", "slow", "few")] == [True, None, False, None]
    r = results["noisy"]
    assert r["value"] == pytest.approx(5.0)
    assert r["conservative"] == pytest.approx(noisy["torch"]["q1_ms"] / noisy["cpp"]["q3_ms"])
    entries = [{"targets": [results[k]], "impls": {}} for k in ("tight", "noisy", "few")]
    assert runner.all_good(entries) and not runner.all_good(entries + [{"targets": [results["slow"]], "impls": {}}])
    assert report.verdict_counts(entries) == {PASS: 1, NOISE: 2, FAIL: 0, NOT_APPLICABLE: 0}


def test_bandwidth_verdicts_use_the_impls_upper_quartile():
    target = Target("cpu", "fwd", "read_bw", 0.8)
    steady = {"cpp": _timed(1.0, 0.99, 1.01, frac_read_bw=0.85)}
    jumpy = {"cpp": _timed(1.0, 0.9, 1.25, frac_read_bw=0.85)}  # at q3 time: 0.85 / 1.25 = 0.68
    assert target.evaluate(steady, "cpp")["verdict"] == PASS
    r = target.evaluate(jumpy, "cpp")
    assert r["verdict"] == NOISE and r["conservative"] == pytest.approx(0.68) and r["value"] == 0.85
    assert target.evaluate({"cpp": _timed(1.0, frac_read_bw=0.7)}, "cpp")["verdict"] == FAIL
    assert target.evaluate({"cpp": _timed(1.0, frac_read_bw=None)}, "cpp")["verdict"] == NOT_APPLICABLE


def test_ratio_spread_is_kept_from_both_sides_quartiles():
    r = runner.summarize([0.001, 0.002, 0.003], nbytes=1, ref_ms=4.0, ref_q=(3.0, 5.0))
    assert r["q1_ms"] == pytest.approx(1.5) and r["q3_ms"] == pytest.approx(2.5)
    assert r["ratio_low"] == pytest.approx(3.0 / 2.5) and r["ratio_high"] == pytest.approx(5.0 / 1.5)
    assert runner.summarize([0.001], nbytes=1)["ratio_low"] is None


def test_targets_with_too_few_rounds_cannot_pass_and_the_report_says_so(tmp_path, capsys):
    args = ("--op", "reparameterize_kl", "--sizes", "256x64", "--direction", "fwd+bwd", "--no-compile")
    assert _run(*args, "--budget", "0", "--repeats", "3", "--device", "cpu", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "ratio IQR" in out and "genkern.bench.baselines" in out and f"< {MIN_ROUNDS} rounds" in out
    assert "targets: 0 PASS" in out
    entry = _results(tmp_path)["results"]["reparameterize_kl"]["256x64/float32/fwd+bwd"]
    cpp = entry["impls"]["cpp"]
    if cpp["status"] == "ok":
        assert cpp["ratio_low"] <= cpp["ratio"] <= cpp["ratio_high"]
    for t in entry["targets"]:
        assert t["verdict"] in (NOISE, FAIL, NOT_APPLICABLE) and {"value", "conservative", "passed"} <= set(t)


# --- baselines: what every ratio is against, checked against the spec ----------------------


def _f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_reparam_kl_baseline_matches_the_reference():
    from genkern.reference.reparam_kl import reparameterize_kl as spec

    mu, logvar = _f64(5, 7).requires_grad_(), (0.5 * _f64(5, 7)).requires_grad_()
    both = {"prior_mu": _f64(5, 7), "prior_logvar": _f64(7)}
    priors = [{}, {"prior_mu": _f64(7)}, {"prior_logvar": _f64(1, 7)}, both]
    for prior in priors:
        torch.manual_seed(3)
        z, kl = baselines.reparameterize_kl(mu, logvar, **prior)
        torch.manual_seed(3)
        want_z, want_kl = spec(mu, logvar, torch.randn_like(mu), **prior)
        torch.testing.assert_close((z, kl), (want_z, want_kl))
        got = torch.autograd.grad(z.sum() + kl.sum(), (mu, logvar))
        torch.testing.assert_close(got, torch.autograd.grad(want_z.sum() + want_kl.sum(), (mu, logvar)))


def test_gan_loss_baselines_match_the_reference():
    from genkern.reference import gan_loss as spec

    real, fake = (3 * _f64(6, 1)).requires_grad_(), (3 * _f64(4, 1, 2)).requires_grad_()  # shapes may differ
    for kind in spec.KINDS:
        cases = [(baselines.discriminator_loss(real, fake, kind), spec.discriminator_loss(real, fake, kind))]
        real_used = real if kind == "relativistic" else None
        want = spec.generator_loss(fake, kind, real_logits=real)
        cases.append((baselines.generator_loss(fake, kind, real_used), want))
        if kind in spec.LABEL_KINDS:
            label = spec.discriminator_loss(real, fake, kind, real_label=0.9)
            cases.append((baselines.discriminator_loss(real, fake, kind, real_label=0.9), label))
        for got, want in cases:
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(
                torch.autograd.grad(got, (real, fake), allow_unused=True, materialize_grads=True),
                torch.autograd.grad(want, (real, fake), allow_unused=True, materialize_grads=True),
            )


@pytest.mark.parametrize("shape", [(2, 4, 2, 5, 7, 8), (1, 6, 1, 6, 6, 4), (2, 3, 3, 3, 3, 8)])  # B H Hkv T S D
@pytest.mark.parametrize("causal", [True, False])
def test_attention_baseline_matches_the_reference_with_its_gradients(shape, causal):
    from genkern.reference.attention import attention as spec

    b, h, hkv, t, s, d = shape
    q, k, v = (_f64(b, h, t, d).requires_grad_(), _f64(b, hkv, s, d).requires_grad_(), _f64(b, hkv, s, d))
    v.requires_grad_()
    got, want = baselines.attention(q, k, v, causal), spec(q, k, v, causal)
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout))


def test_attention_baseline_refuses_more_queries_than_keys_when_causal():
    with pytest.raises(ValueError, match="T <= S"):
        baselines.attention(_f64(1, 2, 5, 4), _f64(1, 2, 3, 4), _f64(1, 2, 3, 4), causal=True)


@pytest.mark.parametrize("tnew", [1, 3])
def test_kv_decode_baseline_matches_the_reference_on_ragged_rows(tnew):
    from genkern.reference.kv_decode import attention_with_kvcache as spec

    b, h, hkv, smax, d = 3, 8, 2, 11, 4
    q, k_new, v_new = _f64(b, h, tnew, d), _f64(b, hkv, tnew, d), _f64(b, hkv, tnew, d)
    caches = [_f64(b, hkv, smax, d), _f64(b, hkv, smax, d)]  # stale values beyond each row: finite noise
    lens = torch.tensor([0, 4, smax - tnew], dtype=torch.int32)
    mine, theirs = [c.clone() for c in caches], [c.clone() for c in caches]
    got = baselines.attention_with_kvcache(q, *mine, lens, k_new, v_new)
    torch.testing.assert_close(got, spec(q, *theirs, lens, k_new, v_new))
    torch.testing.assert_close(mine, theirs)  # the same positions written
    assert not torch.equal(mine[0], caches[0])


def test_kv_decode_baseline_makes_no_kv_sized_temporary():
    case = kv_bench.make_case("2x8x4096x64-kv2")
    x = case.make_inputs("cpu")
    kv_bytes = x["k_cache"].numel() * x["k_cache"].element_size()  # 4 MiB
    peak = memory.peak_memory(runner.prepare(case, "torch", "fwd", "cpu", x), "cpu")
    assert peak is not None and peak <= kv_bytes / 4  # scores and probabilities only: (B, H, 1, S)


def test_bench_torch_impls_run_the_baselines(monkeypatch):
    calls = []
    for name in ("reparameterize_kl", "discriminator_loss", "generator_loss", "attention", "attention_with_kvcache"):
        fn = getattr(baselines, name)
        monkeypatch.setattr(baselines, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    cases = [ReparamKLCase(2, 3), attn_bench.make_case("1x2x8x4-causal"), kv_bench.make_case("1x2x8x4")]
    cases += [gan_bench.make_case("d-hinge-4x1"), gan_bench.make_case("g-relativistic-4x1")]
    for case in cases:
        case.impl_fn("torch")(case.make_inputs("cpu"))
    assert calls == ["reparameterize_kl", "attention", "attention_with_kvcache", "discriminator_loss", "generator_loss"]


# --- GAN bytes, suite directions -------------------------------------------------------------


def test_gan_bytes_count_only_per_element_gradients():
    from genkern.ops.gan_loss import _KIND_CODE, const_grads

    n, f32 = 1000, 4
    want = {  # (fwd, bwd, fwd+bwd) elements: reads, 2 x per-element gradients, reads + gradients
        "d-wasserstein": (2 * n, 0, 2 * n),
        "d-hinge": (2 * n, 4 * n, 4 * n),
        "g-wasserstein": (n, 0, n),
        "g-hinge": (n, 0, n),
        "g-nonsaturating": (n, 2 * n, 2 * n),
        "g-relativistic": (2 * n, 4 * n, 4 * n),
    }
    for label, elems in want.items():
        case = gan_bench.make_case(f"{label}-{n}x1")
        assert tuple(case.bytes_moved(d) for d in ("fwd", "bwd", "fwd+bwd")) == tuple(f32 * e for e in elems), label
    for loss in ("d", "g"):
        for kind, code in _KIND_CODE.items():
            case = gan_bench.make_case(f"{loss}-{kind}-8x1")
            assert case.const_grads()[1] == const_grads(code, loss == "g")[1], (loss, kind)
            assert not case.uses_real or case.const_grads()[0] == const_grads(code, loss == "g")[0]
    assert runner.summarize([0.001], nbytes=0)["gbps"] is None  # a backward that moves nothing per element


def test_suites_time_only_the_directions_a_case_has():
    import bench.test_attention
    import bench.test_gan_loss
    import bench.test_kv_decode
    import bench.test_reparam_kl
    import bench.test_train_step

    for mod in (bench.test_attention, bench.test_gan_loss, bench.test_kv_decode, bench.test_reparam_kl):
        test = next(getattr(mod, name) for name in dir(mod) if name.startswith("test_"))
        pairs = next(m.args[1] for m in test.pytestmark if m.args[0] == ("case", "direction"))
        assert pairs == case_directions(mod.CASES) and pairs
        assert all(d in c.directions and d != "step" for c, d in pairs)
    assert {d for _, d in case_directions(kv_bench.CASES)} == {"fwd"}
    assert {d for _, d in case_directions(bench.test_train_step.CASES)} == {"step"}
    for case, direction in [(ReparamKLCase(2, 3), "step"), (kv_bench.make_case("1x2x8x4"), "bwd")]:
        with pytest.raises(ValueError, match="has no"):
            runner.prepare(case, "torch", direction, "cpu")


def test_attention_baseline_mask_made_in_inference_mode_serves_training():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8)
    with torch.inference_mode():
        baselines.attention(q, k, k)  # caches the (T, S) mask
    q.requires_grad_()
    baselines.attention(q, k, k).sum().backward()  # autograd saves that mask
    assert q.grad is not None


# --- input checks and per-entry run headers --------------------------------------------------------

BAD_OPTIONS = [
    (("--sizes", "0x0"), "--sizes"),
    (("--sizes=-1x16",), "--sizes"),  # a label starting with "-" needs the "=" form
    (("--op", "reparameterize_kl", "--sizes", "8x0"), "--sizes"),
    (("--op", "gan_loss", "--sizes", "d-hinge-0x1"), "--sizes"),
    (("--op", "gan_loss", "--sizes", "d-hinge--1x1"), "--sizes"),
    (("--op", "attention", "--sizes", "0x8x64x16-causal"), "--sizes"),
    (("--op", "attention", "--sizes", "1x8x64x16-causal-kv0"), "--sizes"),
    (("--op", "kv_decode", "--sizes", "1x2x0x4"), "--sizes"),
    (("--op", "kv_decode", "--sizes", "1x2x8x4-kv0-bf16"), "--sizes"),
    (("--sizes", ","), "--sizes"),
    (("--budget", "-1"), "--budget"),
    (("--budget", "nan"), "--budget"),
    (("--budget", "inf"), "--budget"),
    (("--repeats", "0"), "--repeats"),
    (("--repeats", "-3"), "--repeats"),
    (("--threads", "0"), "--threads"),
    (("--threads", "-1"), "--threads"),
    (("--mem-limit", "-1"), "--mem-limit"),
    (("--mem-limit", "nan"), "--mem-limit"),
    (("--mem-limit", "inf"), "--mem-limit"),
]


@pytest.mark.parametrize("options, flag", BAD_OPTIONS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else v)
def test_bad_options_are_refused_by_name_before_timing(options, flag, tmp_path, capsys, monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("timing started")

    monkeypatch.setattr(runner, "machine_header", no_timing)
    monkeypatch.setattr(runner, "bench_case", no_timing)
    from genkern import cli

    out = str(tmp_path / "out")
    assert cli.main(["bench", "--quick", "--device", "cpu", *options, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genkern bench: ") and flag in err[0], err
    assert not os.path.exists(out)


def test_valid_size_labels_pass_the_check():
    labels = "8x16, d-hinge-256x1,g-relativistic-8x1x30x30,1x8x64x16-causal-kv2-bf16,8x8x4096x64-fp16"
    assert runner.size_labels(labels) == [
        "8x16",
        "d-hinge-256x1",
        "g-relativistic-8x1x30x30",
        "1x8x64x16-causal-kv2-bf16",
        "8x8x4096x64-fp16",
    ]
    assert runner.size_labels(None) is None
    from genkern.bench.arguments import check_cases

    check_cases(select_cases(quick=True))  # every listed case has positive sizes
    with pytest.raises(ValueError, match="--sizes"):
        check_cases([ReparamKLCase(0, 16)])  # what make_case("0x16") builds


def _result_entry(case, run_date=None):
    entry = {"op": "op", "case": case, "dtype": "float32", "direction": "fwd", "impls": {}, "targets": []}
    return entry if run_date is None else {**entry, "run": {"date": run_date}}


def _header(date, threads):
    device = {"slug": "cpu-runs", "type": "cpu", "name": "cpu"}
    return {"device": device, "date": date, "threads": threads, "copy_gbps": 1.0, "settings": {"repeats": 3}}


def test_each_entry_keeps_its_own_run_header(tmp_path):
    out = str(tmp_path)
    report.write_results(out, _header("2024-01-01", 1), [_result_entry("a"), _result_entry("b")])
    report.write_results(out, _header("2024-02-02", 2), [_result_entry("b"), _result_entry("c", run_date="2023-12-31")])
    data = json.loads((tmp_path / "cpu-runs.json").read_text())
    runs = {key.split("/")[0]: e["run"] for key, e in data["results"]["op"].items()}
    assert runs["a"] == {"date": "2024-01-01", "threads": 1, "copy_gbps": 1.0, "settings": {"repeats": 3}}
    assert runs["b"] == {"date": "2024-02-02", "threads": 2, "copy_gbps": 1.0, "settings": {"repeats": 3}}
    assert runs["c"] == {"date": "2023-12-31"}  # an entry that brings its own run header keeps it
    assert data["date"] == "2024-02-02" and data["threads"] == 2  # the top-level header: the latest run's
    assert "device" not in runs["a"]  # the device is the file's, not a run's


def test_a_bench_run_stores_its_header_in_every_entry(tmp_path):
    assert _run(*TINY, "--direction", "fwd", "--device", "cpu", "--out", str(tmp_path)) == 0
    data = _results(tmp_path)
    entry = data["results"]["reparameterize_kl"]["8x16/float32/fwd"]
    fields = ("date", "versions", "threads", "load_avg", "copy_gbps", "read_gbps", "read_probe", "matmul_tflops")
    assert set(entry["run"]) == set(fields + ("settings",))
    assert all(entry["run"][k] == data[k] for k in fields)
