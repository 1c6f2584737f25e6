"""Loads the C++ extension genkern._C once and remembers why it is unavailable."""

from __future__ import annotations

import os

_BUILD_ERROR = os.path.join(os.path.dirname(__file__), "_build_error.txt")


_STATE = None  # (module or None, reason), set once: a failed build is not retried per call


def load():
    """Returns (module or None, reason it is unavailable or "")."""
    global _STATE
    if _STATE is None:
        _STATE = _load()
    return _STATE


def _load():
    if os.environ.get("GENKERN_DISABLE_CPP", "") not in ("", "0"):
        return None, "disabled by GENKERN_DISABLE_CPP"
    try:
        from genkern import _C  # registers the C++ kernels and autograd against the ops (genkern/ops/_library.py)
    except ImportError as exc:
        reason = f"genkern._C is not built ({exc})"
        if os.path.exists(_BUILD_ERROR):
            with open(_BUILD_ERROR) as f:
                first = f.read().strip().splitlines()
            reason = first[0] if first else reason
        return None, reason + "; build it with `make build` (needs a C++ compiler)"
    return _C, ""


def available() -> bool:
    return load()[0] is not None


def reason() -> str:
    return load()[1]
