"""`genkern gpu-check`: the CPU dry run of every stage (tiny sizes, TRITON_INTERPRET=1), so none rots."""

import json
import os
import subprocess
import sys

from genkern.bench.gpu_check import plan, triton_problem
from genkern.bench.gpu_suite import bench_stages


def test_the_dry_run_passes_every_stage_into_one_folder(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, GENKERN_CHECK_CACHE=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-m", "genkern", "gpu-check", "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((out / "check.json").read_text())
    stages = {s["stage"]: s["status"] for s in check["stages"]}
    assert set(stages) == {stage.name for stage in plan(str(out), "cpu", True, False)}
    assert set(stages.values()) == {"ok"}
    summary = (out / "summary.md").read_text()
    assert "every stage passed" in summary and "## Benchmarks" in summary and "summary: the fast impl" in summary
    results = os.listdir(out / "results")
    assert any(n.endswith("-roofline.png") for n in results) and any(n.endswith("-speedup.png") for n in results)
    data = json.loads((out / "results" / next(n for n in results if n.endswith(".json"))).read_text())
    assert set(data["results"]) == {"attention", "kv_decode", "reparameterize_kl", "gan_loss"}
    assert all(e["impls"]["triton"]["status"] == "ok" for op in data["results"].values() for e in op.values())
    assert (out / "profile" / "profile.json").exists() and len(os.listdir(out / "train")) == 4


def test_the_run_stops_after_info_when_triton_cannot_run(tmp_path):
    log = tmp_path / "info.log"
    info = {"impls": {"triton": {"available": False, "reason": "no CUDA device"}}, "devices": []}
    log.write_text("$ genkern info --json\n" + json.dumps(info))
    assert "no CUDA device" in triton_problem(str(log), "cuda")
    info["impls"]["triton"] = {"available": True}
    log.write_text("$ genkern info --json\n" + json.dumps(info))
    assert triton_problem(str(log), "cuda") == "torch sees no CUDA device"
    assert triton_problem(str(log), "cpu") is None


def test_the_gpu_suite_is_what_the_issue_lists():
    stages = {name: args for name, args, _ in bench_stages("cuda", tiny=False)}
    attention = stages["bench-attention"][stages["bench-attention"].index("--sizes") + 1].split(",")
    assert (
        len(attention) == 40
        and any(a.endswith("-fp16") for a in attention)
        and "--no-compile" in stages["bench-attention"]
    )
    decode = stages["bench-decode"][stages["bench-decode"].index("--sizes") + 1].split(",")
    assert "64x32x65536x128-kv8-bf16" in decode and "1x32x1024x128-kv8-bf16" in decode
    gan = stages["bench-gan"][stages["bench-gan"].index("--sizes") + 1]
    assert f"{1 << 20}x1" in gan and f"{1 << 26}x1" in gan and "--no-compile" not in stages["bench-gan"]
