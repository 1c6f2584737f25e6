"""Argument checks of packed (variable-length) attention and of sliding windows.

They run before any kernel does, so that a bad cu_seqlens or max_seqlen is a clear
Python exception naming the argument, never an out-of-bounds read in a kernel that
trusts them. Reading cu_seqlens' values costs one copy to the host (B + 1 integers).
"""

from __future__ import annotations

import torch

from genkern.ops._common import check_float_tensor, check_same_device


def check_window(window_size) -> tuple[int, int]:
    """(left, right) as ints: window_size must be a pair of integers >= -1 (-1: unbounded)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"window_size's {side} entry must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"window_size's {side} entry must be >= -1 (-1: unbounded), got {w}")
    return int(window_size[0]), int(window_size[1])


def _check_packed(q, k, v):
    """q (total_q, H, D), k and v (total_k, Hkv, D), one float dtype and device, H % Hkv == 0."""
    check_float_tensor(q, "q")
    check_float_tensor(k, "k", like=q, like_name="q")
    check_float_tensor(v, "v", like=q, like_name="q")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            want = "total_q, H, D" if name == "q" else "total_k, Hkv, D"
            raise ValueError(f"{name} must be 3-d ({want}), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape (total_k, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    (_, h, d), (_, hkv, dk) = q.shape, k.shape
    if dk != d:
        raise ValueError(f"k's head dim D={dk} must match q's D={d}")
    if d == 0:
        raise ValueError(f"q and k need D >= 1, got q {tuple(q.shape)}")
    if hkv == 0 or h % hkv:
        raise ValueError(f"q's heads H={h} must be a multiple of k's heads Hkv={hkv}")


def _cu_lengths(cu, name, total, total_name, like) -> list[int]:
    """The B sequence lengths cu[b + 1] - cu[b] of an int32 (B + 1,) tensor starting at 0,
    non-decreasing and ending at `total` (the packed tensor's first dim)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must have shape (B + 1,) with B >= 1, got {tuple(cu.shape)}")
    check_same_device(cu, name, like, "q")
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}")
    drops = [b for b in range(len(bounds) - 1) if bounds[b + 1] < bounds[b]]
    if drops:
        b = drops[0]
        raise ValueError(f"{name} must be non-decreasing, got {bounds[b]} then {bounds[b + 1]} at index {b}")
    if bounds[-1] != total:
        raise ValueError(
            f"{name} ends at {bounds[-1]} but {total_name} holds {total} tokens (its first dim); they must match"
        )
    return [b1 - b0 for b0, b1 in zip(bounds[:-1], bounds[1:])]


def _check_max(max_seqlen, name, lengths, cu_name):
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"{name} must be an int, got {type(max_seqlen).__name__}")
    longest = max(lengths)
    if max_seqlen < longest:
        raise ValueError(f"{name}={max_seqlen} is smaller than the longest sequence of {cu_name} ({longest})")


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size):
    """Raises TypeError/ValueError naming the argument for any input packed attention
    cannot take (see genkern.reference.attention_varlen for the shapes)."""
    _check_packed(q, k, v)
    lengths_q = _cu_lengths(cu_seqlens_q, "cu_seqlens_q", q.shape[0], "q", q)
    lengths_k = _cu_lengths(cu_seqlens_k, "cu_seqlens_k", k.shape[0], "k", q)
    if len(lengths_q) != len(lengths_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe one batch: {len(lengths_q)} sequences "
            f"against {len(lengths_k)}"
        )
    _check_max(max_seqlen_q, "max_seqlen_q", lengths_q, "cu_seqlens_q")
    _check_max(max_seqlen_k, "max_seqlen_k", lengths_k, "cu_seqlens_k")
    check_window(window_size)
