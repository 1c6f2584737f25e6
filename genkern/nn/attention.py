"""Causal self-attention over genkern.flash_attention, and over a genkern.KVCache when decoding."""

from __future__ import annotations

import torch
from torch import nn

from genkern.nn.rotary import apply_rotary
from genkern.ops.attention import flash_attention


class CausalAttention(nn.Module):
    """The attention step of CausalSelfAttention alone: heads in, heads out, no parameters.

    forward(q, k, v, cache=None, layer=0, impl="auto"): q (B, H, T, hd), k and v
    (B, Hkv, T, hd) -> (B, H, T, hd). Without a cache, genkern.flash_attention (causal).
    With a genkern.KVCache, the T tokens follow each row's cached ones: their keys and
    values are stored in the cache's layer `layer` and attended to with the cached ones
    (an empty cache is filled by flash-attention over the chunk and `cache.write`).

    It is a module of its own so that the attention can be measured apart from the
    projections around it: genkern.profile_generation times it with forward hooks.
    """

    def forward(self, q, k, v, cache=None, layer: int = 0, impl: str = "auto"):
        if cache is None:
            return flash_attention(q, k, v, causal=True, impl=impl)
        if cache.max_len == 0:
            # Prefill of an empty cache: flash-attention over the chunk, and its K/V stored.
            y = flash_attention(q, k, v, causal=True, impl=impl)
            cache.write(layer, k, v)
            return y
        return cache.attend(layer, q, k.contiguous(), v.contiguous(), impl=impl)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads, rotary positions and a KV cache.

    Args:
        dim: model width; dim % n_heads == 0 and the head dim is dim // n_heads.
        n_heads: query heads H.
        n_kv_heads: key/value heads Hkv (H % Hkv == 0); None: H (multi-head), 1: multi-query.
        bias: biases on the projections.
        impl: passed to genkern.flash_attention and genkern.attention_with_kvcache.

    forward(x, rope=None, cache=None, layer=0, impl=None): x (B, T, dim) -> (B, T, dim),
    token t attending to tokens 0..t.
        rope: (cos, sin), each broadcastable to (B, 1, T, head_dim / 2): the rotary angles
            of x's positions (genkern.nn.rotary), applied to queries and keys; None: none.
        cache, layer: a genkern.KVCache and this module's layer in it; the tokens then
            follow each row's cached ones, and their keys and values are stored (the
            caller advances the cache once per step, after every layer).
        impl: this call's impl instead of self.impl.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        *,
        bias: bool = False,
        impl: str = "auto",
        device=None,
        dtype=None,
    ):
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
        self.attend = CausalAttention()
        self.proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias, **kw)

    def forward(self, x: torch.Tensor, rope=None, cache=None, layer: int = 0, impl: str | None = None):
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, T, dim={self.dim}), got shape {tuple(x.shape)}")
        b, t, _ = x.shape
        hd, h, hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([h * hd, hkv * hd, hkv * hd], dim=-1)
        # (B, T, H*hd) -> (B, H, T, hd): strided views, which the kernels take as they are.
        # view/transpose rather than einops: this runs once per layer per decoded token, where
        # einops' per-call cost measured ~9% of a small model's decode step on a CPU.
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, hkv, hd).transpose(1, 2)
        v = v.view(b, t, hkv, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        y = self.attend(q, k, v, cache, layer, self.impl if impl is None else impl)  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(b, t, h * hd))  # (B, T, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, impl={self.impl!r}"
