"""Timing: one call, a prepared (case, impl, direction), and impls measured in interleaved rounds.

On CUDA each call is timed with CUDA events on the current stream. `bwd` times
torch.autograd.grad over a graph built once and retained (no forward inside).
"""

from __future__ import annotations

import sys
import time

import torch

from genkern.bench import COMPILE, MIN_ROUNDS

BWD_METHOD = "torch.autograd.grad over one retained forward graph (retain_graph=True)"


class ImplError(Exception):
    """An impl could not be benchmarked; status is "unavailable" or "failed"."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def time_once(call, device) -> float:
    """Seconds one call takes; on CUDA between two events on the current stream."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


_compiled: dict = {}


def _impl_fn(case, impl):
    # One torch.compile per case: dynamo is reset when the case changes, so its
    # recompile limit is never hit (it would silently fall back to eager).
    if impl != COMPILE:
        return case.impl_fn(impl)
    key = (case.op, case.name, case.dtype)
    if key not in _compiled:
        if "torch._dynamo" in sys.modules:  # nothing to reset (and no slow import) otherwise
            torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = case.impl_fn(COMPILE)
    return _compiled[key]


def prepare(case, impl, direction, device, inputs=None):
    """A zero-argument callable running one `direction` of `impl` on `case`.

    Runs the forward once (the compile, for torch.compile). Raises ImplError
    when the impl is unavailable (not built, placeholder) or fails, and ValueError
    for a direction the case does not have (e.g. "step" of an op, "bwd" of kv_decode):
    it would time something else under that name.
    """
    if direction not in case.directions:
        raise ValueError(f"{case.op} has no {direction!r} direction (it has {', '.join(case.directions)})")
    inputs = case.make_inputs(device) if inputs is None else inputs
    try:
        return _prepare(_impl_fn(case, impl), case, direction, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, the run goes on
        raise ImplError(_status(exc, impl), _message(exc)) from exc


def _prepare(fn, case, direction, inputs):
    if direction == "step":  # fn runs a whole training step itself
        fn(inputs)
        return lambda: fn(inputs)
    if direction == "fwd":

        def fwd():
            with torch.no_grad():
                return fn(inputs)

        fwd()
        return fwd
    leaves = [inputs[name].requires_grad_(True) for name in case.grad_inputs]
    outs = fn(inputs)
    grads = [torch.randn_like(o) for o in outs]
    if direction == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    return lambda: torch.autograd.grad(fn(inputs), leaves, grads)


def _status(exc, impl) -> str:
    from genkern import ImplUnavailableError

    unavailable = isinstance(exc, (ImplUnavailableError, NotImplementedError))
    return "unavailable" if unavailable and impl != COMPILE else "failed"


def _message(exc) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def measure(calls: dict, device, budget_s: float, max_rounds: int):
    """({impl: [seconds, ...]}, {impl: error}): one warm-up each, then interleaved rounds: at least
    MIN_ROUNDS (unless max_rounds is smaller), then more until the budget or max_rounds."""
    samples, errors = {name: [] for name in calls}, {}
    live = dict(calls)
    start, rounds = None, 0
    while live and rounds < max_rounds and (rounds < MIN_ROUNDS or time.perf_counter() - start < budget_s):
        for name, call in list(live.items()):
            try:
                samples[name].append(time_once(call, device))
            except Exception as exc:  # noqa: BLE001 - recorded; the other impls go on
                errors[name] = _message(exc)
                del live[name], samples[name]
        if start is None:  # that was the warm-up round
            start = time.perf_counter()
            samples = {name: [] for name in samples}
        else:
            rounds += 1
    return samples, errors
