"""Causal self-attention over genkern.flash_attention."""
from __future__ import annotations

import torch
from torch import nn

from genkern.ops.attention import flash_attention


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads.

    Args:
        dim: model width; dim % n_heads == 0 and the head dim is dim // n_heads.
        n_heads: query heads H.
        n_kv_heads: key/value heads Hkv (H % Hkv == 0); None: H (multi-head), 1: multi-query.
        bias: biases on the projections.
        impl: passed to genkern.flash_attention.

    forward(x): x (B, T, dim) -> (B, T, dim), token t attending to tokens 0..t.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, *, bias: bool = False,
                 impl: str = "auto", device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if dim < 1 or n_heads < 1 or dim % n_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of n_heads={n_heads}")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        self.dim, self.n_heads, self.n_kv_heads, self.impl = dim, n_heads, n_kv_heads, impl
        self.head_dim = dim // n_heads
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias, **kw)
        self.proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, dim={self.dim}), got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        hd, h, hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        # (B, T, H*hd) -> (B, H, T, hd): strided views, which the kernels take as they are.
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, hkv, hd).transpose(1, 2)
        v = v.view(b, t, hkv, hd).transpose(1, 2)
        y = flash_attention(q, k, v, causal=True, impl=self.impl)     # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, t, h * hd))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, impl={self.impl!r}"
