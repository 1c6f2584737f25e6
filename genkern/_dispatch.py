"""Impl selection: "auto" | "torch" | "cpp" | "triton".

"auto" picks Triton for CUDA tensors and C++ for CPU tensors, and falls back to
plain PyTorch (the reference) with a one-time warning saying why. An explicitly
requested impl that cannot run raises ImplUnavailableError; nothing else is run
in its place. GENKERN_IMPL sets the default for every op.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

import torch

from genkern import _ext

IMPLS = ("auto", "torch", "cpp", "triton")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ImplUnavailableError(RuntimeError):
    """The requested impl cannot run here (not built, no device, unsupported input)."""


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_TRITON_REASON = None  # computed once per process


def _triton_reason() -> str:
    global _TRITON_REASON
    if _TRITON_REASON is None:
        _TRITON_REASON = _find_triton_reason()
    return _TRITON_REASON


def _find_triton_reason() -> str:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or triton_interpret()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"
    return ""


def impl_state() -> dict:
    """{impl: reason it is off, or "" when it can run}."""
    return {"torch": "", "cpp": _ext.reason(), "triton": _triton_reason()}


def check_impl(impl, name: str = "impl") -> str:
    """Returns `impl` ("auto" for None) if it names an impl, else raises ValueError naming `name`.

    The one place impl names are validated: the ops, the CLI, the models and their configs call it.
    """
    impl = "auto" if impl is None else impl
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{name} must be one of {', '.join(IMPLS)}, got {impl!r}")
    return impl


def default_impl() -> str:
    return check_impl(os.environ.get("GENKERN_IMPL", "auto") or "auto", "GENKERN_IMPL")


_warned: set = set()


def _unsupported(impl: str, device: torch.device, dtype: torch.dtype, dtypes) -> str:
    state = impl_state()[impl]
    if state:
        return state
    if impl == "cpp" and device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, got {device.type} tensors"
    if impl == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpret()):
            return f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got {device}"
        dtypes = TRITON_DTYPES if dtypes is None else dtypes
    if dtypes is not None and dtype not in dtypes:
        return f"{impl} does not support dtype {dtype}"
    return ""


_resolved: dict = {}  # successful answers of resolve(), keyed by everything they depend on


def resolve(impl, device: torch.device, dtype: torch.dtype, op: str, triton_dtypes=None, cpp_dtypes=None) -> str:
    """Returns the impl that runs `op` on tensors of `device` and `dtype`.

    triton_dtypes / cpp_dtypes: the dtypes those kernels take when they are not
    the defaults (TRITON_DTYPES; every floating dtype for C++).
    """
    # GENKERN_IMPL is read on every call; availability is fixed per process, so the rest
    # of the answer is memoised (this runs on every op call).
    key = (impl, os.environ.get("GENKERN_IMPL"), device.type, dtype, op, triton_dtypes, cpp_dtypes)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _resolve(impl, device, dtype, op, {"triton": triton_dtypes, "cpp": cpp_dtypes})
    return backend


def _resolve(impl, device: torch.device, dtype: torch.dtype, op: str, dtypes: dict) -> str:
    impl = check_impl(impl)
    if impl == "auto":
        impl = default_impl()
    if impl == "torch":
        return impl
    if impl != "auto":
        why = _unsupported(impl, device, dtype, dtypes[impl])
        if why:
            raise ImplUnavailableError(f"{op}: impl={impl!r} is unavailable: {why}")
        return impl
    want = "triton" if device.type == "cuda" else "cpp"
    why = _unsupported(want, device, dtype, dtypes[want])
    if not why:
        return want
    fall_back(op, want, why)
    return "torch"


def explicit(impl) -> bool:
    """Whether `impl` (an op's argument) or GENKERN_IMPL names one impl rather than "auto"."""
    return (impl or "auto") != "auto" or default_impl() != "auto"


def fall_back(op: str, want: str, why: str) -> None:
    """Says once per (op, impl, reason) that "auto" runs the plain-PyTorch impl instead of `want`.

    The warning points at the first frame outside genkern: the user's call.
    """
    key = (op, want, why)
    # Warn from eager code only: a warning cannot be traced by torch.compile.
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(
            f"genkern.{op}: using the plain-PyTorch impl because {want} is unavailable: {why}",
            RuntimeWarning,
            stacklevel=_caller_stacklevel(),
        )


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_stacklevel() -> int:
    """The stacklevel, for a warnings.warn in this module's caller, of the first frame outside genkern."""
    frame, level = sys._getframe(1), 1  # level 1: the function that calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
