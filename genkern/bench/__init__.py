"""Benchmark cases, one module per hot path, shared by `genkern bench` and bench/.

A case module (e.g. `genkern.bench.reparam_kl`) defines `CASES`, a list of
`Case` objects, and optionally `make_case(label)` to build a case of any size
("8x16") for `--sizes`, `GPU_CASES` (CUDA-only sizes kept apart from the
sweep every device lists) and `DEFAULT` ({device type: case names}: what a
default run times, one case per direction; without it, the first listed case
with a target on that device). Registering a new op = writing its module and
adding its name to `CASE_MODULES`. Importing this package imports no case module.

Which cases a run times: by default the representative ones (`DEFAULT`: the
targets' sizes, minutes on a CPU), `--full` every listed case, `--quick` the
smallest ones, `--sizes` the named ones.

Every case is timed for "torch" (the plain-PyTorch baseline of genkern.bench.baselines:
what a competent PyTorch user writes for speed; not the spec in genkern.reference), the
fast impl, COMPILE (torch.compile of that baseline), and the extra baselines the case names
(`Case.baselines`, e.g. SDPA). A case reports GB/s from `bytes_moved`, and TFLOP/s when it
defines `flops`.

Noise decides nothing: a target passes only when it holds at the conservative end of the
measured spread (the baseline's lower quartile against the impl's upper quartile) from at
least MIN_ROUNDS rounds; when only the medians meet it, its verdict is "within noise".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

# The registry: one module per op (add a new op's module here).
CASE_MODULES = (
    "genkern.bench.reparam_kl",
    "genkern.bench.gan_loss",
    "genkern.bench.attention",
    "genkern.bench.kv_decode",
    "genkern.bench.training",
    "genkern.bench.masks",
)
# "step": one whole optimizer step of a model built on the ops (end to end, not one op).
DIRECTIONS = ("fwd", "bwd", "fwd+bwd", "step")
FAST = "fast"  # stands for the op's fast impl on the device: cpp on CPU, triton on CUDA
COMPILE = "torch.compile"  # torch.compile of the baseline function (genkern.bench.baselines)
SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention, for the attention cases
# Timed rounds per impl before a time budget may stop them: enough for quartiles to mean something.
MIN_ROUNDS = 10
# Target verdicts. NOISE: the medians meet the target, the conservative end does not (or too few rounds).
PASS, FAIL, NOISE, NOT_APPLICABLE = "PASS", "FAIL", "within noise", "n/a"


@dataclass(frozen=True)
class Target:
    """A goal the fast impl should meet, shown as pass/fail in the report.

    metric "speedup": time of `vs` ("torch", COMPILE, SDPA) / time of `impl` >= minimum.
    metric "copy_bw": achieved GB/s / the device's measured copy GB/s >= minimum.
    metric "read_bw": achieved GB/s / the device's measured read GB/s >= minimum (read-bound ops).
    """

    device: str  # "cpu" | "cuda"
    direction: str
    metric: str
    minimum: float
    vs: str = "torch"
    impl: str = FAST

    def label(self) -> str:
        if self.metric in ("copy_bw", "read_bw"):
            return f">={self.minimum:.0%} {self.metric.replace('_', ' ')}"
        return f">={self.minimum:g}x vs {self.vs}"

    def evaluate(self, impls: dict, fast: str) -> dict:
        """{"target", "impl", "value", "conservative", "verdict", "passed"} from an entry's impl results.

        value: the median ratio (speedup) or bandwidth share; conservative: the same from the
        baseline's q1 over the impl's q3 (bandwidth: the impl's q3 time). verdict: FAIL when the
        impl did not run or the median misses; PASS when the conservative value meets the target
        from MIN_ROUNDS rounds or more; NOISE otherwise; NOT_APPLICABLE when the baseline did not
        run. passed: True (PASS), False (FAIL) or None (the others).
        """
        impl = fast if self.impl == FAST else self.impl
        got, base = impls.get(impl, {}), impls.get(self.vs, {})
        out, rounds = {"target": self.label(), "impl": impl, "value": None, "conservative": None}, 0
        if got.get("status") != "ok":
            return {**out, "verdict": FAIL, "passed": False}
        if self.metric in ("copy_bw", "read_bw"):
            out["value"] = value = got.get(f"frac_{self.metric}")
            if value is not None and got.get("q3_ms"):
                out["conservative"] = value * got["median_ms"] / got["q3_ms"]  # at the impl's q3 time
            rounds = got.get("n", 0)
        elif base.get("status") == "ok":
            out["value"] = base["median_ms"] / got["median_ms"]  # the speedup over `vs`
            if base.get("q1_ms") and got.get("q3_ms"):
                out["conservative"] = base["q1_ms"] / got["q3_ms"]
            rounds = min(got.get("n", 0), base.get("n", 0))
        verdict = judge(out["value"], out["conservative"], self.minimum, rounds)
        return {**out, "verdict": verdict, "passed": {PASS: True, FAIL: False}.get(verdict)}


def judge(value, conservative, minimum: float, rounds: int) -> str:
    """The verdict of a target: `value` at the medians, `conservative` at the quartiles' far ends."""
    if value is None:
        return NOT_APPLICABLE
    if value < minimum:
        return FAIL
    if conservative is not None and conservative >= minimum and rounds >= MIN_ROUNDS:
        return PASS
    return NOISE


class Case:
    """One benchmark shape of one op. Subclasses fill in the op-specific parts."""

    op = ""
    grad_inputs: tuple = ()  # names of the inputs that receive gradients
    baselines: tuple = ()  # impls timed besides torch, the fast impl and COMPILE (e.g. SDPA)
    directions: tuple = ("fwd", "bwd", "fwd+bwd")  # what it has: ("fwd",) for an op without a backward
    compiles: bool = True  # whether torch.compile of the baseline is timed too
    bound: str | None = "copy"  # the machine limit it is read against: "copy" | "read" bandwidth, "matmul" rate

    def __init__(self, sizes: dict, dtype=torch.float32, targets=(), quick=False, devices=("cpu", "cuda")):
        self.sizes = dict(sizes)
        self.dtype = dtype
        self.targets = tuple(targets)
        self.quick = quick  # part of `--quick`
        self.devices = tuple(devices)  # device types it is listed for (make_case builds for any)

    def runs_on(self, device_type: str) -> bool:
        return device_type in self.devices

    @property
    def name(self) -> str:
        return "x".join(str(v) for v in self.sizes.values())

    def key(self, direction: str) -> str:
        return f"{self.name}/{str(self.dtype).replace('torch.', '')}/{direction}"

    def make_inputs(self, device) -> dict:
        """Fresh input tensors (without requires_grad), by name."""
        raise NotImplementedError

    def impl_fn(self, impl: str):
        """A callable inputs-dict -> tuple of output tensors, for impl "torch" (the op's
        genkern.bench.baselines function) | "cpp" | "triton" | COMPILE | one of `baselines`."""
        raise NotImplementedError

    def bytes_moved(self, direction: str) -> int:
        """The minimal bytes a fused kernel must read and write."""
        raise NotImplementedError

    def flops(self, direction: str) -> int | None:
        """Floating-point operations of one call, for TFLOP/s; None: not a compute-bound op."""
        return None

    def memory_needed(self, impl: str, direction: str) -> int | None:
        """Estimated bytes `impl` allocates beyond the inputs while `direction` is
        benchmarked (with its retained graph), for the memory guard; None: small."""
        return None

    def targets_for(self, device_type: str, direction: str):
        return [t for t in self.targets if t.device == device_type and t.direction == direction]


def case_directions(cases) -> list:
    """(case, direction) for every direction each case has (`Case.directions`): what the bench/
    suite times, so that no op records a direction it lacks (e.g. a "step" that is a forward)."""
    return [(case, direction) for case in cases for direction in case.directions]


def param_id(value) -> str:
    """A pytest id for a case (its name) or a direction."""
    return getattr(value, "name", value)


def case_modules(op: str | None = None):
    mods = [importlib.import_module(name) for name in CASE_MODULES]
    return [m for m in mods if op is None or m.OP == op]


def listed_cases(mod) -> list:
    """Every case a module lists: its CASES, then its GPU_CASES (if any)."""
    return list(mod.CASES) + list(getattr(mod, "GPU_CASES", ()))


def representative_cases(mod, device_type: str) -> list:
    """The cases of a default run on `device_type`: the module's DEFAULT names, else the first listed
    case with a target there, else the first listed case (none when it lists none for that device)."""
    listed = [c for c in listed_cases(mod) if c.runs_on(device_type)]
    names = getattr(mod, "DEFAULT", {}).get(device_type)
    if names:
        return [c for c in listed if c.name in names]
    targeted = [c for c in listed if any(t.device == device_type for t in c.targets)]
    return (targeted or listed)[:1]


def select_cases(op: str | None = None, sizes=None, quick=False, device_type: str | None = None, full=True) -> list:
    """Cases of `op` (all ops if None) listed for `device_type` (any if None).
    `sizes`: labels like "256x64"; a label that is no listed case is built by
    the module's make_case (with no --op, a module whose make_case rejects the
    label is left out). full=False (and no sizes, not quick): only the
    representative cases (`representative_cases`; needs device_type)."""
    cases = []
    for mod in case_modules(op):
        listed = [c for c in listed_cases(mod) if device_type is None or c.runs_on(device_type)]
        if not sizes:
            if not (full or quick) and device_type is not None:
                cases += representative_cases(mod, device_type)
            else:
                cases += [c for c in listed if c.quick or not quick]
            continue
        known = {c.name: c for c in listed}
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
