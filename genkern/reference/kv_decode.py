"""Attention against a preallocated KV cache, in plain PyTorch: the spec and the fallback.

Shapes: q (B, H, Tnew, D); k_cache, v_cache (B, Hkv, Smax, D) with H % Hkv == 0;
cache_seqlens (B,) int32, L_b = how many positions of row b are filled; k_new,
v_new (B, Hkv, Tnew, D) or None.

1. With k_new/v_new, they are written in place at positions L_b .. L_b + Tnew - 1
   of row b, and the row's length for step 2 is n_b = L_b + Tnew. Without them,
   n_b = L_b (the cache already holds the new tokens' keys).
2. Query i of row b attends to positions j < n_b with j <= i + n_b - Tnew: the
   causal mask aligned to the bottom-right corner of that row's filled part, so
   the Tnew queries are the last Tnew tokens of the row. Positions >= n_b (stale
   or never written) are never read into the result. A row that sees nothing
   (n_b = 0) gives zeros.
3. window_size = (left, right) limits query i to positions j >= i + n_b - Tnew - left
   (FlashAttention's sliding window with S = n_b, the row's own length; left = -1: no
   limit). The attention is causal, so right is 0 whatever is passed, as FlashAttention
   sets it under causal.

cache_seqlens is not modified: advancing it is the caller's job (genkern.KVCache).

This version is written to be read and to be exact, not to be fast. Stale values
(NaN/inf past a row's end) and causally masked ones cannot reach the result
(genkern.reference.attention.masked_values): that is part of the spec's exactness.
The speed baseline of the benchmarks, which masks without copying the cache, is
genkern.bench.baselines.
"""

from __future__ import annotations

import math

import torch

from genkern.ops.varlen_checks import check_window
from genkern.reference.attention import masked_values


def may_overlap(a, b) -> bool:
    """Whether tensors a and b may share elements: one storage and intersecting address
    ranges (strides are never negative). Conservative: interleaved views count."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def separate_new(k_cache, v_cache, k_new, v_new):
    """(k_new, v_new), each copied if it shares memory with a cache (e.g. k_new =
    k_cache[:, :, L - 1 : L - 1 + Tnew]): every new row must be read before any is
    overwritten, whatever order (or parallelism) the write has. Under torch.compile the
    tensors have no addresses; its functionalised graph orders the reads itself."""
    if torch.compiler.is_compiling():
        return k_new, v_new
    caches = (k_cache, v_cache)
    k_new = k_new.clone() if any(may_overlap(k_new, c) for c in caches) else k_new
    v_new = v_new.clone() if any(may_overlap(v_new, c) for c in caches) else v_new
    return k_new, v_new


def write_new(k_cache, v_cache, cache_seqlens, k_new, v_new):
    """Writes k_new/v_new into the caches at each row's positions L_b .. L_b + Tnew - 1."""
    k_new, v_new = separate_new(k_cache, v_cache, k_new, v_new)
    b, hkv, tnew, d = k_new.shape
    pos = cache_seqlens.long().view(b, 1, 1, 1) + torch.arange(tnew, device=k_new.device).view(1, 1, tnew, 1)
    pos = pos.expand(b, hkv, tnew, d)  # (B, Hkv, Tnew, D)
    k_cache.scatter_(2, pos, k_new.to(k_cache.dtype))
    v_cache.scatter_(2, pos, v_new.to(v_cache.dtype))


def attention_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, scale=None, *, window_size=(-1, -1), key_lo=None
):
    """The attention output (B, H, Tnew, D) in q's dtype (see the module docstring). key_lo, (B,)
    int when given, hides positions j < key_lo[b] of row b (a left-padded row's padding)."""
    left, _ = check_window(window_size)
    b, h, tnew, d = q.shape
    hkv, smax = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    n = cache_seqlens.long()
    if k_new is not None:
        write_new(k_cache, v_cache, cache_seqlens, k_new, v_new)
        n = n + tnew
    # Visibility of cache position j to query i of row b.
    i = torch.arange(tnew, device=q.device).view(1, tnew, 1)
    j = torch.arange(smax, device=q.device).view(1, 1, smax)
    nb = n.view(b, 1, 1)
    visible = (j < nb) & (j <= i + nb - tnew)  # (B, Tnew, Smax)
    if left >= 0:
        visible = visible & (j >= i + nb - tnew - left)
    if key_lo is not None:
        visible = visible & (j >= key_lo.long().view(b, 1, 1))
    # Grouped-query attention: the G query heads of KV head c (c * G .. c * G + G - 1)
    # fold into the rows of one matmul against that head, row r being query r % Tnew
    # of query head c * G + r // Tnew. The cache is read where it is.
    g = h // hkv
    visible = visible.repeat(1, g, 1).view(b, 1, g * tnew, smax)  # (B, 1, G*Tnew, Smax)
    qf = q.reshape(b, hkv, g * tnew, d)  # (B, Hkv, G*Tnew, D)
    scores = torch.matmul(qf, k_cache.transpose(-1, -2)) * scale  # (B, Hkv, G*Tnew, Smax)
    scores = scores.masked_fill(~visible, float("-inf"))  # no backward: k needs no masked_scores
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=acc)
    # Rows that see nothing are all -inf (NaN after softmax): zero exactly those.
    probs = probs.masked_fill(~visible.any(dim=-1, keepdim=True), 0.0)
    # Zero weights times stale (unfilled) or causally masked values that are inf/NaN
    # would still be NaN: masked_values takes the finite values only (the spec's
    # exactness, at the price of reading V more than once).
    out = masked_values(probs.to(v_cache.dtype), v_cache, visible)  # (B, Hkv, G*Tnew, D)
    return out.reshape(b, h, tnew, d).to(q.dtype)
