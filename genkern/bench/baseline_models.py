"""The model-level plain-PyTorch baseline: a Transformer's attention as a PyTorch user writes it for speed.

genkern's ops are compared op by op against plain-PyTorch baselines; a whole model (`genkern profile`,
the Transformer's train_step bench case) is compared against the same model with its attention step
replaced by `PlainSDPAAttention`:

    no cache      torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), grouped-query
                  heads through enable_gqa (no repeated K/V)
    decoding      the new keys/values stored in the preallocated genkern.KVCache, then SDPA over the
                  filled part of the cache (views, no copies): by slice copy and no mask when every
                  row holds the same length (a `PlainKVCache` knows that on the host), by scatter and a
                  boolean attn_mask for ragged rows

The rest of the model (embeddings, norms, MLPs, projections) is the same code either way, so a speed
ratio between the two is the attention's. genkern.reference stays the spec the tests check against;
this module is what the speed is measured against.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from genkern.functional import _TORCH_SDPA as sdpa  # torch's own, even under genkern.patch()
from genkern.kvcache import KVCache
from genkern.nn.attention import CausalAttention


class PlainKVCache(KVCache):
    """A genkern.KVCache that also knows, on the host, whether every row holds the same length.

    `uniform` is what lets the plain loop store new keys by slice copy and attend without a mask,
    as a decoding loop over equal-length prompts does. It is updated by `advance` (a tensor of
    per-row lengths costs one device-to-host read, as KVCache.advance's own) and `reset`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.uniform = True

    @classmethod
    def for_model(cls, model, batch_size: int, max_seq_len: int | None = None) -> PlainKVCache:
        """The cache `model.new_cache(batch_size, max_seq_len)` of a TransformerLM would be, as a PlainKVCache."""
        a, p = model.args, model.tok_emb.weight
        smax = max_seq_len or a.max_seq_len
        return cls(a.n_layers, batch_size, a.n_kv_heads, smax, a.head_dim, dtype=p.dtype, device=p.device)

    def advance(self, n):
        super().advance(n)
        if isinstance(n, torch.Tensor):
            self.uniform = bool((self.seqlens == self.max_len).all())

    def reset(self):
        super().reset()
        self.uniform = True


class PlainSDPAAttention(CausalAttention):
    """CausalAttention on torch's SDPA and a plain cached loop (see the module docstring); same forward.

    Fair: it is the eager PyTorch a competent user writes (torch's fused attention kernel, grouped-query
    heads without copies, the cache written in place and read as views), not genkern's float64-safe spec.
    `impl` is accepted and ignored. Stale cache positions are masked out, not zeroed: a model's cache
    holds finite values there.
    """

    def forward(self, q, k, v, cache=None, layer: int = 0, impl: str = "auto"):
        gqa = q.shape[1] != k.shape[1]
        if cache is None:
            return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        k_cache, v_cache = cache.layer(layer)  # (B, Hkv, Smax, hd) each
        start, t = cache.max_len, q.shape[2]
        end = start + t
        if end > cache.max_seq_len:
            raise ValueError(f"the KV cache is full: {start} cached plus {t} new tokens exceed {cache.max_seq_len}")
        if start == 0:  # prefill of an empty cache: attention over the chunk, then its K/V stored
            k_cache[:, :, :t] = k
            v_cache[:, :, :t] = v
            return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
        if getattr(cache, "uniform", False):
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            mask = None if t == 1 else _bottom_right_causal(t, end, q.device)
        else:
            cache.write(layer, k, v)
            mask = _ragged_mask(cache.seqlens, t, end)
        return sdpa(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask, enable_gqa=gqa)


def _bottom_right_causal(t: int, n: int, device) -> torch.Tensor:
    """(T, n) bool: query i sees positions j <= i + n - T (the T queries are the last T tokens)."""
    return torch.ones(t, n, dtype=torch.bool, device=device).tril(n - t)


def _ragged_mask(seqlens, t: int, n: int) -> torch.Tensor:
    """(B, 1, T, n) bool: row b's query i sees j < L_b + T with j <= i + L_b (L_b cached before the step)."""
    i = torch.arange(t, device=seqlens.device).view(1, t, 1)
    j = torch.arange(n, device=seqlens.device).view(1, 1, n)
    filled = seqlens.long().view(-1, 1, 1)  # (B, 1, 1)
    return (j <= i + filled).unsqueeze(1)  # j < L_b + T follows from j <= i + L_b, i < T


def _swap(model, make) -> list:
    """Replaces every CausalAttention submodule by make(old); returns (parent, name, old) for each."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CausalAttention):
                setattr(parent, name, make(child))
                swapped.append((parent, name, child))
    return swapped


def use_plain_sdpa(model: torch.nn.Module) -> torch.nn.Module:
    """Puts PlainSDPAAttention in place of every CausalAttention of `model` (in place) and returns it.

    CausalAttention holds no parameters or buffers: the state dict is unchanged.
    """
    _swap(model, lambda old: PlainSDPAAttention())
    return model


@contextmanager
def plain_sdpa(model: torch.nn.Module):
    """`use_plain_sdpa(model)` for the duration of a with block; the original modules come back after."""
    swapped = _swap(model, lambda old: PlainSDPAAttention())
    try:
        yield model
    finally:
        for parent, name, old in swapped:
            setattr(parent, name, old)
