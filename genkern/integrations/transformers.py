"""attn_implementation="genkern" for Hugging Face transformers models (those that call transformers'
attention interface: Llama, Mistral, Qwen2, GPT-2 and most decoder models of transformers 5.x).

    import genkern.integrations.transformers as gk_hf
    gk_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="genkern")

register() adds two entries named "genkern": the attention function below to transformers'
AttentionInterface, and transformers' own SDPA mask builder (sdpa_mask) to its AttentionMaskInterface, so the
model hands each layer exactly the mask it would hand SDPA: None where plain causal attention is enough, else a
boolean (B, 1, T, S) mask combining padding, causality, the sliding window and packed sequences. Every mask of
that kind is a padding pattern (each query row sees one contiguous span of keys), which genkern reads into
per-row key spans (genkern.functional.mask_spans, once per mask, shared by the layers that use it):

- a right-padded training batch or a left-padded generate() prefill runs span_attention over the spans (key
  blocks outside every span are skipped; rows that see nothing, such as the padding queries of a left-padded
  row, give zeros, as SDPA does on the CPU);
- a single-token decode step against the cache (no gradient) runs attention_with_kvcache on the cache's keys:
  cache_seqlens is each row's last visible key + 1 (S for a dynamic cache), key_lo its first (the row's first
  real token, or the start of its sliding window), window_size the layer's sliding window;
- no mask: flash_attention, causal (with the layer's sliding window) or not, cut to SDPA's top-left causal
  alignment the way transformers' SDPA function does.

Anything else runs transformers' SDPA function unchanged: dropout, softcapping, attention sinks, position
biases, masks that are not a padding pattern (e.g. bidirectional image tokens with holes), head dims or dtypes
the kernels do not take, under torch.compile, and, with impl "auto" on a device without a kernel, the case
where only the plain-PyTorch reference would run (slower than SDPA); GENKERN_IMPL=torch runs the reference on
purpose. The output is (B, T, H, D) with no attention weights, as transformers expects.
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from genkern import _dispatch
from genkern.functional import mask_spans
from genkern.ops import attention as _attention
from genkern.ops import kv_decode as _kv_decode

NAME = "genkern"
_lock = threading.Lock()


def register() -> None:
    """Makes attn_implementation="genkern" available to every transformers model. Idempotent."""
    with _lock:
        AttentionInterface.register(NAME, attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)


def unregister() -> None:
    """Removes what register() added (entries someone else put under the name stay). Idempotent."""
    with _lock:
        for interface, fn in ((AttentionInterface, attention_forward), (AttentionMaskInterface, sdpa_mask)):
            if interface._global_mapping.get(NAME) is fn:
                del interface._global_mapping[NAME]


def is_registered() -> bool:
    return AttentionInterface._global_mapping.get(NAME) is attention_forward


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention function signature: query (B, H, T, D), key/value (B, Hkv, S, D) (the cache's
    full keys during generation), attention_mask from sdpa_mask or None; returns ((B, T, H, D), None)."""
    out = _genkern_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if out is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    return out.transpose(1, 2).contiguous(), None  # (B, H, T, D) -> (B, T, H, D)


def _genkern_attention(module, q, k, v, mask, dropout, scaling, is_causal, kwargs):
    """genkern's (B, H, T, D) result, or None where transformers' SDPA function must run instead."""
    if not _takes(q, k, v, dropout, scaling, kwargs):
        return None
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        return None
    left = -1 if window is None else window - 1  # transformers: query i sees key j when i - window < j <= i
    spans = None
    if mask is not None:
        spans = _cached_spans(mask, q, k.shape[2])
        if spans is None:
            return None
    if q.shape[2] == 1 and k.stride(-1) == v.stride(-1) == 1 and not _needs_grad(q, k, v):
        return _decode(q, k, v, spans, scaling, left)
    if spans is not None:
        return _attention.span_attention(q, k, v, *spans, scale=scaling)
    return _unmasked(module, q, k, v, scaling, is_causal, left)


def _takes(q, k, v, dropout, scaling, kwargs) -> bool:
    """Whether the call is one genkern computes exactly as transformers' SDPA function does."""
    if dropout or torch.compiler.is_compiling() or not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "position_bias")):
        return False
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))):
        return False
    if any(t.dim() != 4 for t in (q, k, v)) or k.shape != v.shape or q.dtype not in _attention.CPP_DTYPES:
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    (b, h, t, d), (bk, hkv, s, dk) = q.shape, k.shape
    if bk != b or dk != d or d not in _attention.HEAD_DIMS or min(b, t, s, hkv) == 0 or h % hkv:
        return False
    # Where only the plain-PyTorch reference could run, SDPA is faster; GENKERN_IMPL=torch asks for it anyway.
    public = "integrations.transformers.attention_forward"
    return _attention.ATTENTION.resolve("auto", q, public) != "torch" or _dispatch.explicit("auto")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _decode(q, k, v, spans, scaling, left):
    """One new query per row against the cache's S keys: the row sees keys key_lo <= j < cache_seqlens."""
    b, s = q.shape[0], k.shape[2]
    if spans is None:  # no padding: every key
        lo, seqlens = None, torch.full((b,), s, dtype=torch.int32, device=q.device)
    else:
        lo, seqlens = (x[:, 0].contiguous() for x in spans)  # (B, 1) -> (B,)
    # max_seqlen: no row holds more than the S keys, known without reading the lengths back from the device.
    return _kv_decode.attention_with_kvcache(
        q, k, v, seqlens, scale=scaling, window_size=(left, -1), key_lo=lo, max_seqlen=s
    )


def _unmasked(module, q, k, v, scaling, is_causal, left):
    """No mask: what transformers' SDPA function computes then, causal (aligned top-left) or full."""
    t, s = q.shape[2], k.shape[2]
    causal = t > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if not causal:
        return _attention.flash_attention(q, k, v, causal=False, scale=scaling)
    if s < t:
        return None
    # An empty static cache at prefill: the keys past the T queries are unwritten; SDPA cuts them off too.
    k, v = k[:, :, :t], v[:, :, :t]  # (B, Hkv, T, D): square, so both causal alignments agree
    return _attention.flash_attention(q, k, v, causal=True, window_size=(left, -1), scale=scaling)


# Masks read into spans, by tensor identity: a model builds one mask per kind of layer per forward and hands the
# same tensor to every layer of that kind, so the passes over it run once. A weak reference and the tensor's
# version counter make sure a reused id or an in-place change is never mistaken for the same mask.
_spans = {}
_SPANS_KEPT = 8


def _cached_spans(mask, q, kv_len):
    """mask_spans of a mask on q's device for q's (B, T) and kv_len keys, computed once per mask."""
    if not isinstance(mask, torch.Tensor) or mask.device != q.device:
        return None
    batch, q_len = q.shape[0], q.shape[2]
    key = (id(mask), mask._version, batch, q_len, kv_len)
    hit = _spans.get(key)
    if hit is not None and hit[0]() is mask:
        return hit[1]
    spans = mask_spans(mask, batch, q_len, kv_len)
    with _lock:
        if len(_spans) >= _SPANS_KEPT:
            _spans.clear()
        _spans[key] = (weakref.ref(mask), spans)
    return spans
