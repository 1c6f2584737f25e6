"""Triton kernels and their launchers, one file per hot path.

Importing genkern does not import triton: `bind` registers each op's launchers as the
kernels of its `<stem>_triton_*` ops, and the kernel module is imported on the first call.
"""

from __future__ import annotations

import importlib

import torch

# stem -> {op name: launcher in genkern/triton/<stem>.py}
LAUNCHERS = {
    "reparam_kl": {"reparam_kl_triton_fwd": "reparam_kl_forward", "reparam_kl_triton_bwd": "reparam_kl_backward"},
    "gan_loss": {"gan_loss_triton_fwd": "gan_loss_forward"},
    "attention": {"attention_triton_fwd": "attention_forward", "attention_triton_bwd": "attention_backward"},
    "attention_varlen": {
        "attention_varlen_triton_fwd": "attention_varlen_forward",
        "attention_varlen_triton_bwd": "attention_varlen_backward",
    },
    "kv_decode": {"kv_decode_triton": "kv_decode"},
}


def _lazy(module: str, launcher: str):
    def run(*args):
        return getattr(importlib.import_module(f"genkern.triton.{module}"), launcher)(*args)

    run.__name__ = launcher
    return run


def bind(stem: str) -> None:
    """Registers the launchers of `stem` for CUDA tensors on a GPU and CPU tensors under
    TRITON_INTERPRET=1 (genkern._dispatch refuses CPU tensors otherwise)."""
    for op, launcher in LAUNCHERS[stem].items():
        torch.library.impl(f"genkern::{op}", ("cpu", "cuda"), func=_lazy(stem, launcher))
