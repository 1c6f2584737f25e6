"""genkern.info(): versions, devices and the state of each impl."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

import genkern
from genkern import _dispatch, _ext


def package_version(dist: str) -> str | None:
    """The installed version of distribution `dist` (e.g. "triton"), or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _default_impl() -> str:
    try:
        return _dispatch.default_impl()
    except ValueError as exc:  # info() is for diagnosis: report it, do not fail
        return f"invalid: {exc}"


def info() -> dict:
    """Returns versions, devices and, per impl, whether it can run and why not."""
    cpp, _ = _ext.load()
    devices = [{"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "type": "cuda",
                    "index": i,
                    "name": p.name,
                    "capability": f"sm_{p.major}{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    impls = {name: {"available": not why, "reason": why} for name, why in _dispatch.impl_state().items()}
    if cpp is not None:
        impls["cpp"]["build"] = cpp.build_info()
    impls["triton"]["interpreter"] = _dispatch.triton_interpret()
    return {
        "genkern": genkern.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "cuda": torch.version.cuda,
        "devices": devices,
        "default_impl": _default_impl(),
        "impls": impls,
    }
