"""Ahead-of-time compile test: every Triton kernel x config compiles for sm_80 and sm_90.

No GPU needed: genkern.triton._aot runs triton.compile(..., target=GPUTarget("cuda",
80|90, 32)) in a subprocess without TRITON_INTERPRET (interpreted kernels do not
compile), for each input dtype. This catches what the interpreter forgives (types,
layouts, register and shared-memory limits). The report (shared memory, registers
per config) is printed (`pytest -s`) and recorded as the test's `aot_report` property.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["genkern.triton.reparam_kl", "genkern.triton.gan_loss", "genkern.triton.attention"]
MAX_STACK = 16  # bytes per thread
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # opt-in shared memory per block


def _kernels(module):
    # JITFunction, or InterpretedFunction under TRITON_INTERPRET: both are KernelInterface.
    import triton

    return {
        name
        for name, obj in vars(module).items()
        if isinstance(obj, triton.runtime.KernelInterface) and name.endswith("_kernel")
    }


def _reparam_kl_coverage(module, rows):
    for kernel in _kernels(module):
        seen = {
            (r["config"]["BLOCK_D"], r["config"]["ROWS"], r["config"]["num_warps"])
            for r in rows
            if r["kernel"] == kernel
        }
        assert seen == {(b, rows_, w) for b, (rows_, w) in module.CONFIGS.items()}, kernel


def _gan_loss_coverage(module, rows):
    # Every launchable specialisation: kind x reduction x (D, G) (the relativistic generator
    # loss runs as the discriminator one, roles swapped), on the one-program kernel at every
    # BLOCK it can pick and on the grid kernel; both statistics stages.
    specs = {
        (k, r, g) for k in range(6) for r in range(3) for g in (False, True) if not (k == module.RELATIVISTIC and g)
    }

    def seen(kernel, *keys):
        return {tuple(r["config"][k] for k in keys) for r in rows if r["kernel"] == kernel}

    for kernel in ("_gan_loss_small_kernel", "_gan_loss_fwd_kernel"):
        assert seen(kernel, "KIND", "REDUCTION", "GENERATOR") == specs, kernel
    assert seen("_gan_loss_small_kernel", "BLOCK", "num_warps") == set(module.SMALL_CONFIGS.items())
    assert seen("_gan_loss_fwd_kernel", "BLOCK", "num_warps") == {(module.LARGE_BLOCK, module.LARGE_WARPS)}
    assert seen("_gan_loss_stats_kernel", "STAGE") == {(0,), (1,)}


def _attention_coverage(module, rows):
    # Every autotune config of each kernel at every BLOCK_D the launchers can pick, causal (the
    # masked diagonal path) and non-causal at least once; the delta kernel at every BLOCK_D with
    # and without grad_lse. Shared memory per config is in the printed report.
    def seen(kernel, *keys, **where):
        return {
            tuple(r["config"][k] for k in keys)
            for r in rows
            if r["kernel"] == kernel and all(r["config"][k] == v for k, v in where.items())
        }

    for name, per_d in module.CONFIGS.items():
        assert set(per_d) == set(module.BLOCK_DS), name
        want = {(d, *c) for d, configs in per_d.items() for c in configs}
        assert seen(name, "BLOCK_D", "BLOCK_M", "BLOCK_N", "num_warps", "STAGES", CAUSAL=True) == want, name
        assert seen(name, "CAUSAL") == {(True,), (False,)}, name
    assert seen("_attention_bwd_pre_kernel", "BLOCK_D", "BLOCK_M", "HAS_GRAD_LSE") == {
        (d, rows_, g) for d, rows_ in module.PRE_ROWS.items() for g in (False, True)
    }


# What each module's cases must cover, beyond "every kernel".
COVERAGE = {
    "genkern.triton.reparam_kl": _reparam_kl_coverage,
    "genkern.triton.gan_loss": _gan_loss_coverage,
    "genkern.triton.attention": _attention_coverage,
}


@pytest.mark.slow
@pytest.mark.parametrize("module_name", MODULES)
def test_every_kernel_and_config_compiles(module_name, tmp_path, record_property):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "genkern.triton._aot", module_name, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(proc.stdout)
    assert out.exists(), proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    record_property("aot_report", proc.stdout)

    failed = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed[:5])
    assert proc.returncode == 0, proc.stderr[-4000:]

    module = importlib.import_module(module_name)  # interpreted here: only names and configs are read
    assert {r["kernel"] for r in rows} == _kernels(module), "aot_cases() must list every kernel"
    COVERAGE[module_name](module, rows)
    assert {(r["arch"], r["dtype"]) for r in rows} == {
        (a, d) for a in ("sm_80", "sm_90") for d in ("fp32", "fp16", "bf16")
    }
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], where
        # ptxas may spill a word or two at odd configs; more than that is a register-pressure bug.
        assert r.get("local", 0) == 0 and r.get("stack", 0) <= MAX_STACK, f"{where} spills to local memory"
