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

    It runs genkern.flash_attention (the impl from GENKERN_IMPL, "auto" by default)
    when it can: the FlashAttention backend allowed (genkern stands in for it under
    torch.nn.attention.sdpa_kernel), 4-d (B, H, L, E) query with key and value of
    one shape (B, Hkv, S, E), no attn_mask, dropout_p == 0, H == Hkv (or enable_gqa and H % Hkv == 0), a head
    dim and dtype the chosen kernel takes, and for is_causal, L == S (torch's causal
    mask is aligned to the top-left corner, genkern's to the bottom-right; they agree
    only on square masks). Anything else calls torch's own function (held from
    import time, so replacing torch's name with this function is safe), which then
    raises the errors torch raises: e.g. inside sdpa_kernel(SDPBackend.MATH) torch's
    math path runs (and supports double backward), and inside a context that allows
    no backend able to run, torch's "No viable backend" error is raised.
    """
    if _fast_path(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return _attention.flash_attention(query, key, value, causal=bool(is_causal), scale=scale)
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


def _fast_path(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    tensors = (q, k, v)
    if attn_mask is not None or dropout_p != 0.0 or not all(isinstance(t, torch.Tensor) for t in tensors):
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
