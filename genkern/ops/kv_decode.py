"""Attention against a preallocated KV cache: incremental decoding and chunked prefill."""

from __future__ import annotations

import torch

from genkern.ops._common import KernelOp, check_float_tensor, check_same_device
from genkern.ops.attention import CPP_DTYPES, check_scale, head_dim_backend
from genkern.ops.varlen_checks import check_window
from genkern.reference import kv_decode as reference


def attention_with_kvcache(
    q,
    k_cache,
    v_cache,
    cache_seqlens,
    k_new=None,
    v_new=None,
    *,
    scale=None,
    window_size=(-1, -1),
    key_lo=None,
    impl="auto",
    max_seqlen=None,
):
    """Appends new keys/values to a KV cache in place and attends to the filled part.

    Args:
        q: (B, H, Tnew, D) queries of the Tnew newest tokens of each row.
        k_cache, v_cache: (B, Hkv, Smax, D) preallocated caches, q's dtype and device,
            H % Hkv == 0 (query head h reads KV head h // (H // Hkv)). Last dim contiguous.
        cache_seqlens: (B,) int32 on q's device: L_b, the positions of row b already
            filled. Rows may differ (ragged batches). Not modified.
        k_new, v_new: (B, Hkv, Tnew, D) or both None. When given they are written in
            place at positions L_b .. L_b + Tnew - 1 of each row first, and the row
            then holds n_b = L_b + Tnew positions; without them n_b = L_b.
        scale: multiplies the scores; default 1 / sqrt(D).
        window_size: (left, right), FlashAttention's sliding window over the row's filled
            positions: query i also ignores positions j < i + n_b - Tnew - left (-1: no
            limit). The attention is causal, so right is 0 whatever is passed. The kernels
            read only the window, so a long cache with a small window costs the window.
        key_lo: (B,) int32 on q's device, or None: positions j < key_lo[b] of row b are
            ignored too (the padding at the start of a left-padded row of a batch).
        impl: "auto" | "torch" | "cpp" | "triton" (default from GENKERN_IMPL).
        max_seqlen: an int the caller knows to be >= max(cache_seqlens) (genkern.KVCache
            passes its `max_len`), or None. Given, the bound check of CUDA lengths uses it
            instead of reading cache_seqlens on the host, and negative lengths go unchecked
            there (CPU lengths are always read: it costs no synchronisation).

    Returns:
        out: (B, H, Tnew, D) in q's dtype. Query i of row b attends to the positions
        j < n_b with j <= i + n_b - Tnew (causal, aligned to the row's last filled
        position): Tnew = 1 is one decoding step, Tnew > 1 a chunk of prefill or a
        block of speculated tokens. A row with n_b = 0 gives zeros.

    Inference only: there is no backward, and inputs that require grad (with grad
    mode on) are refused. Writing past Smax raises before anything is written (this
    reads cache_seqlens on the host, one synchronisation on CUDA, unless max_seqlen
    is given).
    """
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be an int >= 0 or None, got {max_seqlen!r}")
    left, _ = check_window(window_size)
    if key_lo is not None:
        if not isinstance(key_lo, torch.Tensor) or key_lo.dtype != torch.int32 or key_lo.shape != cache_seqlens.shape:
            got = f"{key_lo.dtype} {tuple(key_lo.shape)}" if isinstance(key_lo, torch.Tensor) else type(key_lo).__name__
            raise ValueError(f"key_lo must be an int32 tensor of shape (B,) like cache_seqlens, or None, got {got}")
        check_same_device(key_lo, "key_lo", q, "q")
    return _attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, impl, max_seqlen, window_left=left, key_lo=key_lo
    )


def _attention_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, impl, max_len, *, window_left=-1, key_lo=None
):
    """attention_with_kvcache; `max_len`, when the caller knows it, bounds max(cache_seqlens)."""
    _check_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    check_room(cache_seqlens, 0 if k_new is None else k_new.shape[2], k_cache.shape[2], max_len)
    scale = check_scale(scale, q.shape[-1])
    backend = head_dim_backend(KV_DECODE, impl, q)
    if backend == "torch":
        return reference.attention_with_kvcache(
            q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_size=(window_left, -1), key_lo=key_lo
        )
    if window_left == -1 and key_lo is None:  # the schema's defaults: the call of every plain decoding step
        return KV_DECODE(backend, q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
    return KV_DECODE(backend, q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left, key_lo)


def _check_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
    check_float_tensor(q, "q")
    check_float_tensor(k_cache, "k_cache", like=q, like_name="q")
    check_float_tensor(v_cache, "v_cache", like=q, like_name="q")
    # getattr: k_new/v_new are checked to be tensors below; a bad one must reach that TypeError.
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k_cache, v_cache, k_new, v_new)):
        raise RuntimeError(
            "attention_with_kvcache has no backward: call it under torch.no_grad() or "
            "torch.inference_mode(), or detach the inputs"
        )
    if q.dim() != 4:
        raise ValueError(f"q must be 4-d (B, H, Tnew, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be (B, Hkv, Smax, D) of one shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    (b, h, tnew, d), (bc, hkv, smax, dc) = q.shape, k_cache.shape
    if bc != b or dc != d:
        raise ValueError(
            f"k_cache must be (B={b}, Hkv, Smax, D={d}) to match q of shape {tuple(q.shape)}, "
            f"got {tuple(k_cache.shape)}"
        )
    if hkv == 0 or h % hkv:
        raise ValueError(f"q's heads H={h} must be a multiple of the cache's heads Hkv={hkv}")
    if b == 0 or tnew == 0 or d == 0 or smax == 0:
        raise ValueError(
            f"q and the caches need B, Tnew, D, Smax >= 1, got q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}"
        )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (it is written in place)")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32:
        got = cache_seqlens.dtype if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise TypeError(f"cache_seqlens must be an int32 tensor, got {got}")
    if cache_seqlens.shape != (b,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({b},), got {tuple(cache_seqlens.shape)}")
    check_same_device(cache_seqlens, "cache_seqlens", q, "q")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or both None)")
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_float_tensor(t, name, like=q, like_name="q")
            if t.shape != (b, hkv, tnew, d):
                raise ValueError(
                    f"{name} must have shape (B, Hkv, Tnew, D) = {(b, hkv, tnew, d)}, got {tuple(t.shape)}"
                )


def check_room(cache_seqlens, tnew, smax, max_len):
    """Refuses lengths outside [0, smax - tnew], before anything is written. A bound the caller
    knows (max_len) spares reading the lengths on the host; CPU lengths are read anyway (no
    synchronisation there), so that every row is checked."""
    if max_len is None or (cache_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()):
        lo, hi = (int(x) for x in torch.aminmax(cache_seqlens))
        hi = hi if max_len is None else max(hi, max_len)
    else:
        lo, hi = 0, max_len
    if torch.compiler.is_compiling():
        # lo and hi are data-dependent here: an `if` cannot be traced, so the checks
        # become runtime asserts of the compiled graph (messages cannot name them).
        torch._check(lo >= 0)
        torch._check(hi + tnew <= smax)
        return
    if lo < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got a length of {lo}")
    if hi + tnew > smax:
        raise ValueError(
            f"the KV cache is full: a row of length {hi} plus {tnew} new tokens exceeds max_seq_len={smax}"
        )


# --- the op: fake kernel (inference only: no autograd) --------------------------------


def _fake(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left=-1, key_lo=None):
    return q.new_empty(q.shape)


KV_DECODE = KernelOp("kv_decode", "attention_with_kvcache", fake=_fake, cpp_dtypes=CPP_DTYPES)
KV_DECODE.register()
