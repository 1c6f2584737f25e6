"""Ahead-of-time compile test: every Triton kernel x config compiles for sm_80 and sm_90.

No GPU needed: genkern.triton._aot runs triton.compile(..., target=GPUTarget("cuda",
80|90, 32)) in a subprocess without TRITON_INTERPRET (interpreted kernels do not
compile), for each input dtype. This catches what the interpreter forgives (types,
layouts, register and shared-memory limits). The report (shared memory, registers
per config) is printed (`pytest -s`) and recorded as the test's `aot_report` property.

The modules compiled are every module of genkern.triton with `aot_cases()`, found, not
listed: a new kernel module is compiled here without an edit, and fails until COVERAGE
says what its cases must cover; a kernel that no module's cases launch fails at once.
"""

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
import genkern.triton  # noqa: E402  (after the skip)

ROOT = Path(__file__).resolve().parents[1]
# Interpreted here (conftest sets TRITON_INTERPRET): importing reads only names and configs.
SUBMODULES = [
    importlib.import_module(f"genkern.triton.{m.name}") for m in pkgutil.iter_modules(genkern.triton.__path__)
]
MODULES = sorted(m.__name__ for m in SUBMODULES if hasattr(m, "aot_cases"))
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
        # the span/packed variant at every config it can pick
        spans = {(d, *c) for d in per_d for c in module.configs_for(name, d, True)}
        assert seen(name, "BLOCK_D", "BLOCK_M", "BLOCK_N", "num_warps", "STAGES", SPANS=True) == spans, name
    assert seen("_attention_bwd_pre_kernel", "BLOCK_D", "BLOCK_M", "HAS_GRAD_LSE") == {
        (d, rows_, g) for d, rows_ in module.PRE_ROWS.items() for g in (False, True)
    }


def _kv_decode_coverage(module, rows):
    # The split kernel at every BLOCK_D x autotune config (num_stages included) and with an oddly
    # strided cache (SU = 1) at STRIDED_CONFIG; the append kernel (SU = 8, 1) and the combine kernel
    # at every BLOCK_D. Rows come case by case (dtype, then arch, inside): the cases carry
    # num_stages, the rows do not, so the cases are matched to the rows first.
    cases = list(module.aot_cases())
    combos = {(a, d) for a in ("sm_80", "sm_90") for d in ("fp32", "fp16", "bf16")}
    assert len(rows) == len(cases) * len(combos)
    for i, case in enumerate(cases):
        mine = rows[i * len(combos) : (i + 1) * len(combos)]
        assert {(r["arch"], r["dtype"]) for r in mine} == combos
        assert all(r["config"] == dict(case["constexprs"], num_warps=case["num_warps"]) for r in mine)

    def seen(kernel, *keys):
        return {tuple(c["constexprs"].get(k, c.get(k)) for k in keys) for c in cases if c["kernel"].__name__ == kernel}

    assert seen("_kv_decode_split_kernel", "SU", "BLOCK_D", "BLOCK_N", "num_warps", "num_stages") == {
        (8, bd, *c) for bd, configs in module.CONFIGS.items() for c in configs
    } | {(1, bd, *module.STRIDED_CONFIG) for bd in module.BLOCK_DS}
    assert all(module.CONFIGS[bd] for bd in module.BLOCK_DS), "every head dim keeps a config"
    assert seen("_kv_decode_split_kernel", "BLOCK_M") == {(module.BLOCK_M,)}
    assert seen("_kv_decode_append_kernel", "BLOCK_D", "SU") == {(bd, su) for bd in module.BLOCK_DS for su in (1, 8)}
    assert seen("_kv_decode_combine_kernel", "BLOCK_D", "BLOCK_S") == {
        (bd, module.MAX_SPLITS) for bd in module.BLOCK_DS
    }


# What each module's cases must cover, beyond "every kernel".
COVERAGE = {
    "genkern.triton.reparam_kl": _reparam_kl_coverage,
    "genkern.triton.gan_loss": _gan_loss_coverage,
    "genkern.triton.attention": _attention_coverage,
    "genkern.triton.kv_decode": _kv_decode_coverage,
}


def test_every_kernel_module_is_compiled():
    # Every module with AOT cases has its coverage check, and every kernel of genkern.triton is
    # launched by some module's cases (a module that lost its aot_cases() would leave it out).
    assert {"genkern.triton.attention", "genkern.triton.kv_decode"} <= set(MODULES)
    assert set(COVERAGE) == set(MODULES)
    kernels = set().union(*(_kernels(m) for m in SUBMODULES))
    cased = {c["kernel"].__name__ for name in MODULES for c in importlib.import_module(name).aot_cases()}
    assert kernels == cased


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
