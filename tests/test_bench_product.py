"""The bench as a product: the default selection, the per-op summary, the pictures, --compare, the read probe."""

import argparse
import json
import os
from collections import Counter

import torch

from genkern.bench import FAIL, PASS, case_modules, listed_cases, representative_cases, runner, select_cases
from genkern.bench import gan_loss as gan_bench
from genkern.bench import masks as masks_bench
from genkern.bench.compare_results import common_cases, run_compare
from genkern.bench.machine import READ_PROBES, matmul_ceiling, matmul_rate, read_probes
from genkern.bench.plots import write_pictures
from genkern.bench.summary import summary_lines

TINY = ["--sizes", "8x16", "--op", "reparameterize_kl", "--no-compile", "--budget", "0", "--repeats", "2"]


def _run(*args):
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return runner.run(parser.parse_args(list(args)))


def test_default_run_is_one_representative_case_per_op_full_is_the_sweep():
    for device in ("cpu", "cuda"):
        default = select_cases(device_type=device, full=False)
        ops = Counter(c.op for c in default)
        assert set(ops) == {m.OP for m in case_modules()}  # every op
        # one case per op; the masks module's targets are three problems (window, packed batch, model), and
        # attention is timed in float32 and bfloat16 on the CPU
        several = {masks_bench.OP, "attention"} if device == "cpu" else {masks_bench.OP}
        assert all(n == 1 for op, n in ops.items() if op not in several), ops
        full = select_cases(device_type=device)
        assert {c.name for c in default} <= {c.name for c in full} and len(full) > 3 * len(default)
        for case in default:  # at the targets' sizes
            assert any(t.device == device for t in case.targets), (device, case.op, case.name)
    assert [c.name for c in select_cases("reparameterize_kl", quick=True, device_type="cpu", full=False)] == ["256x64"]


def test_a_module_without_default_gets_its_first_targeted_case():
    class Module:
        CASES = [gan_bench.make_case("d-hinge-8x1"), *gan_bench.CASES[:3]]

    assert representative_cases(Module, "cpu")[0].name == next(
        c.name for c in Module.CASES if any(t.device == "cpu" for t in c.targets)
    )
    assert {c.name for c in gan_bench.GPU_CASES} <= {c.name for c in listed_cases(gan_bench)}


def _entry(op, key, fast_ms, torch_ms, verdict=PASS):
    case, dtype, direction = key.split("/")
    ok = {"status": "ok", "q1_ms": 1.0, "q3_ms": 1.0, "n": 10}
    return {
        "op": op,
        "case": case,
        "dtype": dtype,
        "direction": direction,
        "fast_impl": "cpp",
        "bytes": 10**6,
        "bound": "copy",
        "impls": {
            "torch": {**ok, "median_ms": torch_ms, "gbps": 1.0, "ratio": 1.0},
            "cpp": {**ok, "median_ms": fast_ms, "gbps": 2.0, "frac_copy_bw": 0.5, "ratio": torch_ms / fast_ms},
        },
        "targets": [{"target": ">=2x vs torch", "impl": "cpp", "value": torch_ms / fast_ms, "verdict": verdict}],
    }


def test_summary_gives_worst_and_best_speedups_shares_and_names_the_failures():
    entries = [_entry("op_a", "8x16/float32/fwd", 1.0, 4.0), _entry("op_a", "8x16/float32/bwd", 2.0, 3.0, FAIL)]
    text = "\n".join(summary_lines(entries))
    assert "1.50 .. 4.00x" in text and "50% copy bw" in text and "1 PASS, 1 FAIL" in text
    assert "worst 1.50x (8x16/float32/bwd), best 4.00x (8x16/float32/fwd)" in text
    assert "FAIL 8x16/float32/bwd: >=2x vs torch (cpp: 1.50)" in text


def test_a_run_prints_the_summary_and_writes_the_pictures_atomically(tmp_path, capsys):
    assert _run(*TINY, "--device", "cpu", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "summary: the fast impl's speed-up" in out and "reparameterize_kl" in out
    slug = runner.device_slug("cpu")
    names = set(os.listdir(tmp_path))
    assert {f"{slug}.json", f"{slug}-speedup.png", f"{slug}-roofline.png"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert (tmp_path / f"{slug}-speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pictures_of_an_empty_file_are_none(tmp_path):
    assert write_pictures(str(tmp_path / "x.json"), {"results": {}}) == []


def test_compare_two_files_side_by_side(tmp_path, capsys):
    a = {
        "device": {"slug": "dev-a"},
        "copy_gbps": 10.0,
        "results": {"op_a": {"k": _entry("op_a", "8x16/float32/fwd", 1, 2)}},
    }
    b = {
        "device": {"slug": "dev-b"},
        "copy_gbps": 20.0,
        "results": {"op_a": {"k": _entry("op_a", "8x16/float32/fwd", 2, 2)}},
    }
    paths = []
    for name, data in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    assert common_cases([a, b]) == [("op_a", "8x16/float32/fwd")]
    assert run_compare(paths, str(tmp_path / "cmp")) == 0
    out = capsys.readouterr().out
    assert "dev-a" in out and "dev-b" in out and "8x16/float32/fwd" in out and "2.00x" in out
    assert os.listdir(tmp_path / "cmp") == ["compare-dev-a-vs-dev-b.png"]


def test_compare_refuses_one_file_or_a_bad_one_with_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("[]")
    assert _run("--compare", str(tmp_path / "bad.json")) == 2
    assert _run("--compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("genkern bench: --compare") for line in err)


def test_compare_the_committed_results_file_with_a_new_one(tmp_path, capsys):
    committed = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "cpu-intel-xeon-processor.json")
    assert _run(*TINY, "--device", "cpu", "--out", str(tmp_path), "--no-plots") == 0
    new = str(tmp_path / (runner.device_slug("cpu") + ".json"))
    assert _run("--compare", committed, new, "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "measured limits" in out
    matmul = next(line for line in out.splitlines() if line.startswith("measured matmul TFLOP/s"))
    assert matmul.count("fp32 ") == 2  # each file's float32 rate, named in full within its column


def test_read_probes_name_what_they_ran_and_the_header_says_which():
    probes = read_probes(torch.device("cpu"), quick=True)
    assert set(probes) == set(READ_PROBES) and all(v > 0 for v in probes.values())


def test_matmul_ceiling_of_a_16_bit_case_is_at_least_the_float32_rate():
    # A CPU without bfloat16 matrix instructions multiplies bfloat16 at a tiny fraction of the
    # float32 rate; a bfloat16 case is held against float32's rate there, and its own elsewhere.
    avx2 = {"float32": 0.13, "bfloat16": 0.0003}
    amx = {"float32": 0.37, "bfloat16": 1.39}
    assert matmul_ceiling(avx2, "bfloat16") == 0.13
    assert matmul_ceiling(amx, "bfloat16") == 1.39
    assert matmul_ceiling(avx2, "float16") == 0.13  # no float16 rate measured
    assert matmul_ceiling(avx2, "float32") == 0.13
    assert matmul_ceiling({}, "bfloat16") is None
    assert matmul_ceiling(None, "float64") is None


def test_matmul_rate_is_a_plausible_rate_in_every_probed_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        rate = matmul_rate(torch.device("cpu"), dtype, quick=True)
        assert 1e-6 < rate < 1e3  # TFLOP/s
