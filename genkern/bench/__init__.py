"""Benchmark cases, one module per hot path, shared by `genkern bench` and bench/.

A case module (e.g. `genkern.bench.reparam_kl`) defines `CASES`, a list of
`Case` objects, and optionally `make_case(label)` to build a case of any size
("8x16") for `--sizes`. Registering a new op = writing its module and adding
its name to `CASE_MODULES`. Importing this package imports no case module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

CASE_MODULES = ("genkern.bench.reparam_kl", "genkern.bench.gan_loss")
DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
FAST = "fast"  # stands for the op's fast impl on the device: cpp on CPU, triton on CUDA
COMPILE = "torch.compile"  # torch.compile of the reference function


@dataclass(frozen=True)
class Target:
    """A goal the fast impl should meet, shown as pass/fail in the report.

    metric "speedup": time of `vs` / time of `impl` >= minimum.
    metric "copy_bw": achieved GB/s / the device's measured copy GB/s >= minimum.
    """
    device: str  # "cpu" | "cuda"
    direction: str
    metric: str
    minimum: float
    vs: str = "torch"
    impl: str = FAST

    def label(self) -> str:
        if self.metric == "copy_bw":
            return f">={self.minimum:.0%} copy bw"
        return f">={self.minimum:g}x vs {self.vs}"

    def evaluate(self, impls: dict, fast: str) -> dict:
        """{"target", "impl", "value", "passed"} from an entry's impl results.

        passed is False when the impl did not run, None when its baseline did not.
        """
        impl = fast if self.impl == FAST else self.impl
        got, base = impls.get(impl, {}), impls.get(self.vs, {})
        out = {"target": self.label(), "impl": impl, "value": None, "passed": False}
        if got.get("status") != "ok":
            return out
        if self.metric == "copy_bw":
            out["value"] = got.get("frac_copy_bw")
        elif base.get("status") == "ok":
            out["value"] = base["median_ms"] / got["median_ms"]  # the speedup over `vs`
        out["passed"] = None if out["value"] is None else out["value"] >= self.minimum
        return out


class Case:
    """One benchmark shape of one op. Subclasses fill in the op-specific parts."""

    op = ""
    grad_inputs: tuple = ()  # names of the inputs that receive gradients

    def __init__(self, sizes: dict, dtype=torch.float32, targets=(), quick=False):
        self.sizes = dict(sizes)
        self.dtype = dtype
        self.targets = tuple(targets)
        self.quick = quick  # part of `--quick`

    @property
    def name(self) -> str:
        return "x".join(str(v) for v in self.sizes.values())

    def key(self, direction: str) -> str:
        return f"{self.name}/{str(self.dtype).replace('torch.', '')}/{direction}"

    def make_inputs(self, device) -> dict:
        """Fresh input tensors (without requires_grad), by name."""
        raise NotImplementedError

    def impl_fn(self, impl: str):
        """A callable inputs-dict -> tuple of output tensors, for impl
        "torch" | "cpp" | "triton" | COMPILE."""
        raise NotImplementedError

    def bytes_moved(self, direction: str) -> int:
        """The minimal bytes a fused kernel must read and write."""
        raise NotImplementedError

    def targets_for(self, device_type: str, direction: str):
        return [t for t in self.targets if t.device == device_type and t.direction == direction]


def case_modules(op: str | None = None):
    mods = [importlib.import_module(name) for name in CASE_MODULES]
    return [m for m in mods if op is None or m.OP == op]


def select_cases(op: str | None = None, sizes=None, quick=False) -> list:
    """Cases of `op` (all ops if None). `sizes`: labels like "256x64"; a label
    that is no listed case is built by the module's make_case (with no --op,
    a module whose make_case rejects the label is left out)."""
    cases = []
    for mod in case_modules(op):
        if not sizes:
            cases += [c for c in mod.CASES if c.quick or not quick]
            continue
        known = {c.name: c for c in mod.CASES}
        for label in sizes:
            if label in known:
                cases.append(known[label])
            elif hasattr(mod, "make_case"):
                try:
                    cases.append(mod.make_case(label))
                except ValueError:
                    if op is not None:
                        raise
    return cases
