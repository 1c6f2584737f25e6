"""Triton kernels and their launchers, one file per hot path.

Importing genkern does not import triton: each op's Triton kernels are bound
to its `<stem>_triton_*` ops here, and the kernel module is imported on the
first call.
"""
from __future__ import annotations

import importlib

import torch


def _lazy(module: str, launcher: str):
    def run(*args):
        return getattr(importlib.import_module(f"genkern.triton.{module}"), launcher)(*args)
    run.__name__ = launcher
    return run


def _bind(op: str, module: str, launcher: str):
    # CUDA tensors on a GPU; CPU tensors under TRITON_INTERPRET=1 (the dispatcher
    # in genkern._dispatch refuses CPU tensors otherwise).
    torch.library.impl(f"genkern::{op}", ("cpu", "cuda"), func=_lazy(module, launcher))


def register_reparam_kl():
    _bind("reparam_kl_triton_fwd", "reparam_kl", "reparam_kl_forward")
    _bind("reparam_kl_triton_bwd", "reparam_kl", "reparam_kl_backward")


def register_gan_loss():
    _bind("gan_loss_triton_fwd", "gan_loss", "gan_loss_forward")


def register_attention():
    _bind("attention_triton_fwd", "attention", "attention_forward")
    _bind("attention_triton_bwd", "attention", "attention_backward")


def register_kv_decode():
    _bind("kv_decode_triton", "kv_decode", "kv_decode")
