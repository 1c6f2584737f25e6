"""Scaled dot-product attention in plain PyTorch: the spec and the fallback.

    out_i = sum_j softmax_j(scale * q_i . k_j) v_j      over the keys j query i sees

Shapes: q (B, H, T, D); k, v (B, Hkv, S, D) with H % Hkv == 0. Query head h reads KV
head h // (H // Hkv): grouped-query attention (Hkv < H) and multi-query attention
(Hkv = 1).

The causal mask is aligned to the bottom-right corner, so that T new queries placed
after S - T cached keys see the whole cache and themselves:

    T = 3, S = 5     keys j = 0 1 2 3 4
    query i = 0           x x x . .     i sees j <= i + S - T
    query i = 1           x x x x .
    query i = 2           x x x x x

With T > S the first T - S queries see no key: their output is 0 and their
log-sum-exp is -inf (not NaN).

A sliding window, window_size = (left, right) as FlashAttention defines it, limits each
query to the keys around its diagonal i + S - T (-1: no limit on that side):

    i + S - T - left <= j <= i + S - T + right

    T = 3, S = 5, window (1, 0)    keys j = 0 1 2 3 4
    query i = 0                         . x x . .     causal means right = 0
    query i = 1                         . . x x .
    query i = 2                         . . . x x

A row the window leaves without a key gives 0 and -inf, as above.

A key a query does not see never reaches it, whatever it holds: NaN or inf in k or v
at a masked key changes neither that query's output nor the gradients (0 * NaN is
NaN, so the products below take the finite values only; see masked_scores and
masked_values). A non-finite value a query does see makes its output non-finite.

This version materialises the (G * T, S) score matrix of each KV head: it is O(T * S)
in memory, which is what the fused kernels avoid. It is written to be read and to be
exact, not to be fast: the speed baseline of the benchmarks is genkern.bench.baselines.
"""

from __future__ import annotations

import math

import torch

from genkern.ops.varlen_checks import check_window


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may see key j (bottom-right aligned)."""
    i = torch.arange(t, device=device).unsqueeze(1)
    j = torch.arange(s, device=device).unsqueeze(0)
    return j <= i + (s - t)


def window_mask(t: int, s: int, causal: bool, window_size=(-1, -1), device=None):
    """(T, S) bool, True where query i may see key j under causal and window_size (see the
    module docstring); None where every query sees every key. Causal sets right = 0, as
    FlashAttention does, so causal with the default window is causal_mask exactly."""
    left, right = check_window(window_size)
    right = 0 if causal else right
    if left < 0 and right < 0:
        return None
    i = torch.arange(t, device=device).unsqueeze(1)
    j = torch.arange(s, device=device).unsqueeze(0)
    diag = i + (s - t)  # (T, 1): the key aligned with query i
    visible = torch.ones(t, s, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible & (j <= diag + right)
    if left >= 0:
        visible = visible & (j >= diag - left)
    return visible


def _finite(x):
    return torch.where(torch.isfinite(x), x, 0)


def _put_back(x, exact, where):
    """exact's values where `where`, x's elsewhere; the gradient is x's everywhere (none
    flows through exact, whose masked products may be NaN)."""
    return x + torch.where(where, (exact - x).detach(), 0)


def masked_scores(qf, k, visible, scale):
    """scale * qf k^T, -inf where ~visible. qf (B, Hkv, R, D), k (B, Hkv, S, D), visible
    broadcasting to (B, Hkv, R, S).

    The masked scores are replaced, but their gradient is dS @ k with dS = 0 there: a
    non-finite key would still make it NaN. So the product takes k's finite values, and
    a key holding inf/NaN gets its exact score back where it is seen."""
    scores = torch.matmul(qf, _finite(k).transpose(-1, -2)) * scale  # (B, Hkv, R, S)
    bad = ~torch.isfinite(k).all(dim=-1).unsqueeze(-2)  # (B, Hkv, 1, S): keys holding inf/NaN
    scores = _put_back(scores, torch.matmul(qf, k.transpose(-1, -2)) * scale, visible & bad)
    return scores.masked_fill(~visible, float("-inf"))


def masked_values(probs, v, visible):
    """probs @ v with probs (B, Hkv, R, S) zero where ~visible, v (B, Hkv, S, D).

    0 * inf and 0 * NaN are NaN: the product takes v's finite values, and an inf/NaN
    value comes back (the exact product) only into the rows and columns that see it.
    The gradient of an inf/NaN entry of v itself is 0."""
    finite = torch.isfinite(v)
    out = torch.matmul(probs, _finite(v))  # (B, Hkv, R, D)
    seen = torch.matmul(visible.to(probs.dtype), (~finite).to(probs.dtype)) > 0  # (B, Hkv, R, D)
    return _put_back(out, torch.matmul(probs, v), seen)


def span_mask(key_lo, key_hi, s: int):
    """(B, T, S) bool, True where key_lo[b, i] <= j < key_hi[b, i]: each row's span of keys."""
    j = torch.arange(s, device=key_lo.device)
    return (j >= key_lo.unsqueeze(-1).long()) & (j < key_hi.unsqueeze(-1).long())


def attention(q, k, v, causal=True, scale=None, return_lse=False, *, window_size=(-1, -1), key_spans=None):
    """softmax(scale * q k^T, masked) v in q's dtype; with return_lse also the
    (B, H, T) float32 log-sum-exp of each row's scaled, masked scores. window_size =
    (left, right) limits the keys of each query (module docstring); (-1, -1): none.
    key_spans = (key_lo, key_hi), int (B, T) each, limits query i of batch b further to
    the keys key_lo[b, i] <= j < key_hi[b, i] (all heads alike): the padding pattern of
    a mask, e.g. (0, len_b) for a right-padded row."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    # Grouped-query attention: the G query heads that read KV head c (heads c * G ..
    # c * G + G - 1) are consecutive, so they fold into the rows of one matmul against
    # that head: row r is query i = r % T of query head c * G + r // T. K and V are
    # read where they are, never repeated per query head.
    qf = q.reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D)
    mask = window_mask(t, s, causal, window_size, q.device)  # (T, S) or None
    if key_spans is not None:
        spans = span_mask(*key_spans, s)  # (B, T, S)
        mask = spans if mask is None else spans & mask
        mask = mask.unsqueeze(1)  # (B, 1, T, S)
    if mask is not None:
        mask = mask.repeat(*(1,) * (mask.dim() - 2), g, 1)  # (..., G*T, S): row r is query r % T
        scores = masked_scores(qf, k, mask, scale)  # (B, Hkv, G*T, S)
    else:
        scores = torch.matmul(qf, k.transpose(-1, -2)) * scale  # (B, Hkv, G*T, S)
    # Softmax accumulates in float32 for float16/bfloat16 (as torch's fused softmax
    # does); float64 stays float64.
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    probs = torch.softmax(scores, dim=-1, dtype=acc)
    if mask is not None and (t > s or tuple(window_size) != (-1, -1) or key_spans is not None):
        # A row with no visible key is all -inf, which softmax turns into NaN: zero
        # exactly those rows (a NaN from the inputs elsewhere stays NaN).
        probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    probs = probs.to(v.dtype)
    out = masked_values(probs, v, mask) if mask is not None else torch.matmul(probs, v)  # (B, Hkv, G*T, D)
    out = out.reshape(b, h, t, d)
    if not return_lse:
        return out
    lse = torch.logsumexp(scores.to(acc), dim=-1).reshape(b, h, t)  # -inf for empty rows
    return out, lse.float()
