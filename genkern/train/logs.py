"""The logged metrics: losses averaged over a window of steps, written as log.csv and log.json."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from genkern._io import write_atomic
from genkern.train.distributed import Dist


class LossWindow:
    """Sums the losses of the steps since the last logged row and times them.

    Evaluation and checkpoints are not training time: the clock restarts after them.
    """

    def __init__(self):
        self.steps, self.sums, self.t0 = 0, {}, time.perf_counter()

    def add(self, losses: dict) -> None:
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def row(self, done: int, dist: Dist, device: torch.device) -> dict:
        """The logged row of step `done` (means over the window and the global batch); starts a new window."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sums = self.sums
        if dist.world > 1:  # log the whole global batch's losses, not this shard's
            sums = dist.mean(sums, device)
        now = time.perf_counter()
        row = {
            "step": done,
            **{k: float(v) / self.steps for k, v in sums.items()},
            "step_ms": 1e3 * (now - self.t0) / self.steps,
        }
        if not all(math.isfinite(v) for k, v in row.items() if k != "step"):
            raise FloatingPointError(f"training diverged at step {done}: {row}")
        self.steps, self.sums, self.t0 = 0, {}, time.perf_counter()
        return row

    def restart_clock(self) -> None:
        """Starts the window's clock again if no step has run in it yet."""
        if self.steps == 0:
            self.t0 = time.perf_counter()


def write_logs(out: Path, history: list) -> None:
    keys = []
    for row in history:
        keys += [k for k in row if k not in keys]
    lines = [",".join(keys)] + [",".join(_csv(row.get(k)) for k in keys) for row in history]
    write_atomic(out / "log.csv", "\n".join(lines) + "\n")
    write_atomic(out / "log.json", json.dumps(history, indent=1) + "\n")


def _csv(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_history(out: Path, upto: int) -> list:
    """The logged rows of a run directory up to step `upto` (a resumed run continues them)."""
    try:
        rows = json.loads((out / "log.json").read_text())
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and r.get("step", upto + 1) <= upto]
