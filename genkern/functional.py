"""Drop-in replacements for torch.nn.functional, taking genkern's kernels where they apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genkern.ops import attention as _attention

# torch's own function, held from import time: the fallback never looks the name up again, so replacing
# torch.nn.functional.scaled_dot_product_attention with the function below (by hand or with genkern.patch())
# cannot make it call itself. torch._C._nn holds the binding that torch.nn.functional re-exports; it is read
# there first so that a replacement made before genkern was imported is not taken for torch's.
_TORCH_SDPA = getattr(torch._C._nn, "scaled_dot_product_attention", F.scaled_dot_product_attention)


@torch.compiler.assume_constant_result
def _flash_backend_enabled() -> bool:
    """Whether the active torch.nn.attention.sdpa_kernel(...) context (or torch.backends.cuda.enable_flash_sdp)
    allows the FlashAttention backend, which genkern stands in for.

    sdpa_kernel toggles the same process-wide flag that torch.backends.cuda.flash_sdp_enabled() reads (on the
    CPU too); reading it costs well under a microsecond. Under torch.compile the value is read once, when the
    function is traced, so that fullgraph=True still traces: a graph compiled outside a context keeps its
    choice inside one.
    """
    return torch._C._get_flash_sdp_enabled()


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """torch.nn.functional.scaled_dot_product_attention with the same signature and results.

    It runs genkern's kernels (the impl from GENKERN_IMPL, "auto" by default) when it
    can: the FlashAttention backend allowed (genkern stands in for it under
    torch.nn.attention.sdpa_kernel), 4-d (B, H, L, E) query with key and value of
    one shape (B, Hkv, S, E), dropout_p == 0, H == Hkv (or enable_gqa and H % Hkv == 0), a head
    dim and dtype the chosen kernel takes, and
      - no attn_mask: genkern.flash_attention; for is_causal only L == S (torch's causal
        mask is aligned to the top-left corner, genkern's to the bottom-right; they agree
        only on square masks);
      - an attn_mask that is a padding pattern (see mask_spans: the same for every head, each
        query row one contiguous span of keys, boolean or additive 0 / -inf; is_causal False,
        as torch requires): span_attention over those spans, whose key blocks outside every
        span are skipped. A row that sees no key gives zeros, as torch's function does on the
        CPU; on other devices such a mask runs torch's function.
    Anything else calls torch's own function (held from import time, so replacing torch's
    name with this function is safe), which then raises the errors torch raises: e.g. inside
    sdpa_kernel(SDPBackend.MATH) torch's math path runs (and supports double backward), and
    inside a context that allows no backend able to run, torch's "No viable backend" error
    is raised. So does any other mask: a bias (finite values other than 0), per-head
    differences, rows that are not one span, a mask that requires grad.
    """
    if _fast_path(query, key, value, dropout_p, is_causal, scale, enable_gqa):
        if attn_mask is None:
            return _attention.flash_attention(query, key, value, causal=bool(is_causal), scale=scale)
        spans = None if is_causal else _query_spans(attn_mask, query, key)
        if spans is not None:
            return _attention.span_attention(query, key, value, *spans, scale=scale)
    return _TORCH_SDPA(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


def _fast_path(q, k, v, dropout_p, is_causal, scale, enable_gqa) -> bool:
    tensors = (q, k, v)
    if dropout_p != 0.0 or not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        return False
    if any(t.dim() != 4 for t in tensors) or k.shape != v.shape:
        return False
    if not _flash_backend_enabled():
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


def _query_spans(attn_mask, q, k):
    """mask_spans for the drop-in: only a mask torch's function would take as it is (bool or q's dtype, q's
    device), and, off the CPU, only one without empty rows (torch's result for those is only known there)."""
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.device != q.device:
        return None
    if attn_mask.dtype not in (torch.bool, q.dtype):
        return None
    spans = mask_spans(attn_mask, q.shape[0], q.shape[2], k.shape[2])
    if spans is None or (q.device.type != "cpu" and bool((spans[0] >= spans[1]).any())):
        return None
    return spans


def mask_spans(mask, batch, q_len, kv_len):
    """(key_lo, key_hi), int32 (batch, q_len) each, when `mask` is a padding pattern; else None.

    A padding pattern: a boolean (True = attend) or additive (0.0 = attend, -inf = not) mask of 2 to 4 dims
    broadcastable to (batch, 1, q_len, kv_len), i.e. the same for every head, whose every query row allows one
    contiguous span of keys key_lo <= j < key_hi (possibly empty: then key_lo >= key_hi). Right and left
    padding, causal masks and sliding windows, and any combination of them, are padding patterns; a bias (any
    finite value other than 0), per-head masks and rows with holes are not. Not under torch.compile (the answer
    is data-dependent), nor for a mask that requires grad (torch's function differentiates it).

    Cost: a few vectorised passes over the mask (two argmax, a max, a global count), no loop over rows, and one
    synchronisation to read the verdict.
    """
    if not isinstance(mask, torch.Tensor) or mask.requires_grad or torch.compiler.is_compiling():
        return None
    allowed = _allowed(mask, batch, q_len, kv_len)  # (Bm, Lm, S), Bm in (1, batch), Lm in (1, q_len)
    if allowed is None:
        return None
    flat = allowed.view(torch.uint8)  # argmax does not take bool
    lo = flat.argmax(-1)  # (Bm, Lm): first allowed key (0 for an empty row)
    hi = kv_len - flat.flip(-1).argmax(-1)  # (Bm, Lm): one past the last allowed key (kv_len for an empty row)
    seen = flat.amax(-1).bool()  # (Bm, Lm): rows that allow any key
    # Each row allows at most hi - lo keys, exactly that many when they form one span: comparing the totals
    # checks every row at once.
    if int(torch.count_nonzero(allowed)) != int(torch.where(seen, hi - lo, 0).sum()):
        return None
    lo = torch.where(seen, lo, 0)
    hi = torch.where(seen, hi, 0)
    return tuple(x.to(torch.int32).expand(batch, q_len).contiguous() for x in (lo, hi))


def _allowed(mask, batch, q_len, kv_len):
    """The mask as booleans (True = attend) of shape (Bm, Lm, kv_len), or None when it is not one of the same
    for every head, or holds values other than 0 and -inf (additive)."""
    if not 2 <= mask.dim() <= 4 or not (mask.dtype == torch.bool or mask.is_floating_point()):  # as torch's function
        return None
    mb, mh, ml, ms = (1,) * (4 - mask.dim()) + tuple(mask.shape)  # as broadcast against (B, H, L, S)
    if mb not in (1, batch) or mh != 1 or ml not in (1, q_len) or ms not in (1, kv_len) or mask.numel() == 0:
        return None
    mask = mask.reshape(mb, ml, ms)  # (Bm, Lm, Sm): the head dim is 1
    if mask.dtype != torch.bool:
        allowed = mask == 0
        if int(torch.count_nonzero(allowed)) + int(torch.count_nonzero(torch.isneginf(mask))) != mask.numel():
            return None  # a bias, +inf or NaN: torch's function adds it
        mask = allowed
    return mask.expand(mb, ml, kv_len)
