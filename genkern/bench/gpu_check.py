"""`genkern gpu-check --out DIR` (`make gpu-check`): everything a GPU run needs, in one command and one folder.

GPU time is scarce, so the run is prepared here and only executed there. Stages, in order, each a
subprocess with its own timeout (a hang costs that stage, not the run) and its own log under DIR:

  info       `genkern info --json`; stops the run when the Triton impl cannot run on the device
             (minutes of GPU time are not spent benchmarking plain PyTorch)
  build      `make setup` (with --build), then the C++ extension must load
  tests      `pytest -m gpu` and every Triton test, on the GPU (no interpreter there)
  bench-*    the GPU benchmark suite (gpu_suite.py): attention, decode, the elementwise ops
  profile    `genkern profile` on the device
  train-*    a short training run of each model family on the device

The run stops starting stages once `deadline_s` is spent (8 minutes on an H100: the stages'
estimates add up to about 7). Triton's kernel cache and Inductor's cache live in DIR/../cache
(GENKERN_CHECK_CACHE), so a second run skips the compiles. DIR/summary.md is the one page to read.

`tiny=True` is the CPU dry run (tests/test_gpu_check.py): the same stages at tiny sizes on CPU
tensors with TRITON_INTERPRET=1, so that none of them rots before a GPU is at hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from genkern.bench.gpu_suite import bench_stages, profile_args, test_args, train_runs

DEADLINE_S = 480
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the source tree


@dataclass
class Stage:
    name: str
    commands: list  # argv lists, run in order; the stage fails at the first that fails
    timeout_s: float
    what: str = ""
    env: dict = field(default_factory=dict)


def _genkern(*args) -> list:
    return [sys.executable, "-m", "genkern", *args]


def plan(out: str, device: str, tiny: bool, build: bool) -> list:
    """The stages of a check writing into `out` on `device` ("cuda" or, for the dry run, "cpu")."""
    load = [sys.executable, "-c", "import genkern._ext as e; m, why = e.load(); assert m, why; print(m.__file__)"]
    stages = [
        Stage("info", [_genkern("info", "--json")], 60, "versions, devices, impls"),
        Stage("build", ([["make", "-C", ROOT, "setup"]] if build else []) + [load], 300, "the C++ extension"),
        Stage("tests", [[sys.executable, "-m", "pytest", *test_args(tiny)]], 150, "GPU and Triton tests"),
    ]
    for name, args, timeout in bench_stages(device, tiny):
        stages.append(Stage(name, [_genkern("bench", *args, "--out", os.path.join(out, "results"))], timeout, name))
    profile = profile_args(device, tiny) + ["--out", os.path.join(out, "profile")]
    stages.append(Stage("profile", [_genkern("profile", *profile)], 120, "generation latency"))
    for family, args in train_runs(device, tiny):
        run = _genkern("train", family, *args, "--out", os.path.join(out, "train", family))
        stages.append(Stage(f"train-{family}", [run], 90, f"a short {family} run"))
    return stages


def run_stage(stage: Stage, out: str, env: dict, time_left: float) -> dict:
    """Runs a stage's commands into <out>/logs/<name>.log; {"stage", "status", "seconds", "log", ...}."""
    log = os.path.join(out, "logs", f"{stage.name}.log")
    timeout = min(stage.timeout_s, time_left)
    start, status, rc = time.monotonic(), "ok", 0
    with open(log, "w") as f:
        for argv in stage.commands:
            f.write(f"$ {' '.join(argv)}\n")
            f.flush()
            left = timeout - (time.monotonic() - start)
            rc = _call(argv, f, {**env, **stage.env}, left) if left > 0 else None
            if rc != 0:
                status = "timeout" if rc is None else "failed"
                f.write(f"\n[{status}: rc {rc}, limit {timeout:.0f} s]\n")
                break
    seconds = time.monotonic() - start
    return {"stage": stage.name, "status": status, "rc": rc, "seconds": round(seconds, 1), "log": log}


def _call(argv, log, env, timeout) -> int | None:
    # Its own process group: a timeout kills the command and every process it started (compile workers).
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def triton_problem(info_log: str, device: str) -> str | None:
    """Why the Triton impl cannot run on `device`, from the info stage's JSON, or None."""
    try:
        with open(info_log) as f:
            data = json.loads(f.read().split("--json\n", 1)[1])
    except (OSError, IndexError, ValueError) as exc:
        return f"genkern info --json gave no readable JSON ({exc})"
    triton = data.get("impls", {}).get("triton", {})
    if not triton.get("available"):
        return f"the Triton impl is not available: {triton.get('reason') or 'unknown reason'}"
    if device == "cuda" and not any(d.get("type") == "cuda" for d in data.get("devices", [])):
        return "torch sees no CUDA device"
    return None


def check_env(out: str, tiny: bool) -> dict:
    """The stages' environment: the caches beside `out` (kept between runs), the interpreter for a dry run."""
    cache = os.environ.get("GENKERN_CHECK_CACHE") or os.path.join(os.path.dirname(os.path.abspath(out)), "cache")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")  # triton >= 3.4 keeps autotune picks in its cache
    env.setdefault("TRITON_PRINT_AUTOTUNING", "1")  # the picks go into the logs
    if tiny:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_check(out: str, tiny: bool = False, build: bool = False, deadline_s: float = DEADLINE_S) -> int:
    """Runs every stage into `out`, writes <out>/summary.md and check.json; 0 when every stage passed."""
    from genkern.bench.gpu_report import write_summary

    device = "cpu" if tiny else "cuda"
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    env, start, results = check_env(out, tiny), time.monotonic(), []
    stop = None
    for stage in plan(out, device, tiny, build):
        left = deadline_s - (time.monotonic() - start)
        if stop or left <= 0:
            results.append({"stage": stage.name, "status": "not run", "why": stop or "the deadline was spent"})
            continue
        print(f"gpu-check: {stage.name} ({stage.what}; limit {min(stage.timeout_s, left):.0f} s) ...", flush=True)
        result = run_stage(stage, out, env, left)
        print(f"gpu-check: {stage.name} {result['status']} in {result['seconds']} s", flush=True)
        results.append(result)
        if stage.name == "info":
            stop = "info failed" if result["status"] != "ok" else triton_problem(result["log"], device)
            if stop:
                print(f"gpu-check: stopping: {stop}", file=sys.stderr)
    path = write_summary(out, results, device, time.monotonic() - start)
    print(f"gpu-check: wrote {path}")
    return 0 if all(r["status"] == "ok" for r in results) else 1
