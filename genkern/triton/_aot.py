"""Ahead-of-time compile checks for the Triton kernels: no GPU needed.

A kernel module lists what its launchers can launch in `aot_cases()`: dicts with

    kernel      the @triton.jit function
    constexprs  {name: value} for every tl.constexpr argument (one config)
    num_warps   (and optionally num_stages)
    types       optional {arg: Triton type} overrides, e.g. {"seed_ptr": "*i64"}
    divisible   optional int arguments the launch usually sees divisible by 16

`compile_report(module)` compiles every case for each input dtype and each
target (sm_80 Ampere, sm_90 Hopper) with triton.compile(ASTSource, target=
GPUTarget("cuda", arch, 32)) and returns one row per compile: shared memory
(the compiler's metadata) and registers, stack and local memory (cuobjdump
on the cubin, when Triton's bundled cuobjdump is there), or the error.

Arguments named `*_ptr` are pointers to the input dtype unless overridden,
and 16-byte aligned (as torch allocations are, so the code is the one a real
launch compiles); other non-constexpr arguments are i32.

Run it without TRITON_INTERPRET (kernels created under the interpreter do not
compile): `python -m genkern.triton._aot genkern.triton.reparam_kl`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")


def _cases(module: str):
    return list(importlib.import_module(module).aot_cases())


def signature(case: dict, dtype: str):
    """(signature, constexprs, attrs) of one case for triton.compiler.ASTSource."""
    kernel, consts = case["kernel"], case["constexprs"]
    types, divisible = case.get("types", {}), set(case.get("divisible", ()))
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = types.get(name, f"*{dtype}" if name.endswith("_ptr") else "i32")
        if sig[name].startswith("*") or name in divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(consts) - set(kernel.arg_names)
    if missing:
        raise ValueError(f"{kernel.__name__}: constexprs {sorted(missing)} are not arguments")
    return sig, consts, attrs


def _resources(cubin: bytes) -> dict:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not found:
        return {}
    regs, stack, _, local = map(int, found.groups())
    return {"registers": regs, "stack": stack, "local": local}


def compile_case(module: str, index: int, dtype: str, arch: int) -> dict:
    """Compiles case `index` of `module` for one dtype and target; returns its report row."""
    import triton
    from triton.backends.compiler import GPUTarget

    case = _cases(module)[index]
    row = {
        "kernel": case["kernel"].__name__,
        "config": dict(case["constexprs"], num_warps=case["num_warps"]),
        "dtype": dtype,
        "arch": f"sm_{arch}",
    }
    try:
        sig, consts, attrs = signature(case, dtype)
        options = {"num_warps": case["num_warps"]}
        if "num_stages" in case:
            options["num_stages"] = case["num_stages"]
        src = triton.compiler.ASTSource(fn=case["kernel"], signature=sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # report every failure, not just the first
        return dict(row, ok=False, error=f"{type(exc).__name__}: {str(exc)[-2000:]}")
    return dict(row, ok=True, shared=compiled.metadata.shared, **_resources(compiled.asm["cubin"]))


def compile_report(module: str, archs=ARCHS, dtypes=DTYPES, workers: int | None = None) -> list:
    """Report rows for every case of `module` x dtype x arch, compiled in parallel processes."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    jobs = [(module, i, d, a) for i in range(len(_cases(module))) for d in dtypes for a in archs]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(compile_case, *zip(*jobs)))


def format_report(rows: list) -> str:
    lines = []
    for r in rows:
        cfg = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["config"].items())
        res = (
            f"shared={r['shared']:>6} regs={r.get('registers', '?'):>3} stack={r.get('stack', '?')} "
            f"local={r.get('local', '?')}"
            if r["ok"]
            else "FAILED " + r["error"].splitlines()[-1]
        )
        lines.append(f"{r['kernel']:<24} {r['arch']} {r['dtype']:<4} {cfg:<72} {res}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="kernel modules, e.g. genkern.triton.reparam_kl")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = [row for m in args.modules for row in compile_report(m)]
    print(format_report(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} compiled", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
