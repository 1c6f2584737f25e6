"""Rotary position embeddings (RoFormer): queries and keys rotated by angles that grow with position."""

from __future__ import annotations

import torch


def rotary_tables(head_dim: int, max_seq_len: int, base: float = 10000.0):
    """cos, sin: (max_seq_len, head_dim / 2) float32 tables of the rotary angles.

    Position p turns pair i by p * base ** (-i / (head_dim / 2)); the angles are taken in
    float64 so that long contexts do not lose the slow pairs to rounding.
    """
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (S, D/2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotates pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by angles cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
