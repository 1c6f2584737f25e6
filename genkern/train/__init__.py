"""The trainer shared by every model family, its checkpoints and distributed training.

The names below load their modules on first use: `import genkern` does not pay for the
trainer (its families, loop, checkpoints) until something trains or loads a run.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "genkern.train.checkpoint",
    "RunConfig": "genkern.train.config",
    "TrainResult": "genkern.train.loop",
    "load_trained": "genkern.train.trainer",
    "train": "genkern.train.trainer",
}

__all__ = ["CheckpointError", "RunConfig", "TrainResult", "load_trained", "train"]


def __getattr__(name: str):
    """An exported name, or a submodule (genkern.train.trainer, ...), imported now."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
