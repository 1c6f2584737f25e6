"""Drop-in replacements for torch.nn.functional, taking genkern's kernels where they apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genkern.ops import attention as _attention


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """torch.nn.functional.scaled_dot_product_attention with the same signature and results.

    It runs genkern.flash_attention (the impl from GENKERN_IMPL, "auto" by default)
    when it can: 4-d (B, H, L, E) query with key and value of one shape (B, Hkv, S, E),
    no attn_mask, dropout_p == 0, H == Hkv (or enable_gqa and H % Hkv == 0), a head
    dim and dtype the chosen kernel takes, and for is_causal, L == S (torch's causal
    mask is aligned to the top-left corner, genkern's to the bottom-right; they agree
    only on square masks). Anything else calls torch's own function, which then
    raises the errors torch raises.
    """
    if _fast_path(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return _attention.flash_attention(query, key, value, causal=bool(is_causal), scale=scale)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def _fast_path(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    tensors = (q, k, v)
    if attn_mask is not None or dropout_p != 0.0 or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        return False
    if any(t.dim() != 4 for t in tensors) or k.shape != v.shape:
        return False
    if q.dtype not in _attention.CPP_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return False
    if k.device != q.device or v.device != q.device:
        return False
    (b, h, t, d), (bk, hkv, s, dk) = q.shape, k.shape
    if bk != b or dk != d or min(b, t, s, hkv) == 0 or (h != hkv and not (enable_gqa and h % hkv == 0)):
        return False
    if (is_causal and t != s) or d not in _attention.HEAD_DIMS:
        return False
    # Only where a kernel runs: the plain-PyTorch impl is slower than torch's own function.
    return _attention.ATTENTION.resolve("auto", q, "scaled_dot_product_attention") != "torch"
