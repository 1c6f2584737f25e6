"""Argument checks shared by the public ops: clear errors that name the argument."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(t, name, *, like=None, like_name=None):
    """t must be a floating tensor; with `like`, of like's dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if like is not None:
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; pass one dtype")
        check_same_device(t, name, like, like_name)


def check_same_device(t, name, like, like_name):
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; pass one device")


def call_kernel_op(ops: dict, eager, backend: str, *args):
    """Runs the differentiable op of kernel family `backend` ("cpp" or "triton").

    Under torch.compile: torch.ops.genkern.<op>_<family>, which dynamo traces. In eager
    mode: `eager(*args, triton)`, the extension's typed entry point to the same op, which
    skips torch.ops' per-call argument parsing.
    """
    if torch.compiler.is_compiling():
        return ops[backend](*args)
    return eager(*args, backend == "triton")
