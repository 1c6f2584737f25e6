"""genkern.KVCache: the preallocated key/value buffers of autoregressive decoding."""

from __future__ import annotations

import torch

from genkern.ops.kv_decode import attention_with_kvcache, check_room
from genkern.reference.kv_decode import write_new


def _version(t):
    """t's version counter (bumped by every in-place write), None where it has none (an
    inference tensor)."""
    try:
        return t._version
    except RuntimeError:
        return None


class KVCache:
    """Keys and values of every layer, preallocated, with each batch row's filled length.

    Args:
        num_layers, batch_size, num_kv_heads, max_seq_len, head_dim: buffer sizes; the
            buffers are (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim).
        dtype, device: of the buffers (keyword-only).

    Attributes:
        k, v: the buffers, zero-initialised.
        seqlens: (batch_size,) int32 on `device`, the filled length of each row; rows
            may differ (ragged batches).
        max_len: max(seqlens) as an int, kept on the host so that no step synchronises.
            Edits of seqlens by other means than `advance` and `reset` are noticed (its
            version counter): the lengths are then read (and checked) once more.

    One decoding step: for each layer i, `cache.attend(i, q, k_new, v_new)` (or
    `genkern.attention_with_kvcache(q, *cache.layer(i), cache.seqlens, k_new, v_new,
    max_seqlen=cache.max_len)`), then `cache.advance(Tnew)` once. A prefill that attends
    by other means stores its keys and values with `cache.write(i, k_new, v_new)`.
    """

    def __init__(
        self, num_layers, batch_size, num_kv_heads, max_seq_len, head_dim, *, dtype=torch.float32, device=None
    ):
        sizes = {
            "num_layers": num_layers,
            "batch_size": batch_size,
            "num_kv_heads": num_kv_heads,
            "max_seq_len": max_seq_len,
            "head_dim": head_dim,
        }
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.num_layers, self.batch_size, self.max_seq_len = num_layers, batch_size, max_seq_len
        shape = (num_layers, batch_size, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        with torch.inference_mode(False):  # a version counter even when made under inference mode
            self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.k.device)
        self._max_len = 0  # max(seqlens), known on the host so that no step synchronises
        self._mark_lengths()

    def layer(self, i: int):
        """(k_cache, v_cache) of layer i: (B, Hkv, Smax, D) views into the buffers."""
        if not -self.num_layers <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for {self.num_layers} layers")
        return self.k[i], self.v[i]

    @property
    def max_len(self) -> int:
        """max(seqlens), known on the host (read-only: `advance` and `reset` change it, and a
        call that finds seqlens edited by hand reads it again)."""
        return self._max_len

    def _mark_lengths(self):
        """Records seqlens as this cache last set it (the tensor and its version)."""
        self._lengths_seen = (self.seqlens, _version(self.seqlens))

    def _room_bound(self):
        """max(seqlens) for the room check of a write, without synchronising while seqlens is
        the tensor this cache last set, unwritten since. Otherwise (a public attribute, edited or
        replaced) the lengths are read again: valid ones are trusted from then on, invalid ones
        give None, so that the op reads every row and refuses the call before any write."""
        seen, version = self._lengths_seen
        if torch.compiler.is_compiling() or (
            seen is self.seqlens and version is not None and version == _version(seen)
        ):
            return self._max_len
        lo, hi = (int(x) for x in torch.aminmax(self.seqlens))
        if lo < 0 or hi > self.max_seq_len:
            return None
        self._max_len = hi
        self._mark_lengths()
        return hi

    def attend(self, i: int, q, k_new=None, v_new=None, *, scale=None, impl="auto"):
        """genkern.attention_with_kvcache on layer i (writes k_new/v_new; lengths unchanged)."""
        k, v = self.layer(i)
        return attention_with_kvcache(
            q, k, v, self.seqlens, k_new, v_new, scale=scale, impl=impl, max_seqlen=self._room_bound()
        )

    def write(self, i: int, k_new, v_new):
        """Stores k_new/v_new (B, Hkv, Tnew, D) in layer i at each row's positions seqlens[b] ..
        seqlens[b] + Tnew - 1, attending to nothing (lengths unchanged: `advance` afterwards).

        For a prefill whose attention runs without the cache (genkern.flash_attention over
        the prompt). Writing past max_seq_len raises before anything is written.
        """
        k, v = self.layer(i)
        self._check_new(k, k_new, v_new)
        write_new(k, v, self.seqlens, k_new, v_new)

    def _check_new(self, k, k_new, v_new):
        b, hkv, _, d = k.shape
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                raise TypeError(f"{name} must be a floating-point tensor, got {got}")
            if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (b, hkv, d) or t.shape != k_new.shape:
                raise ValueError(
                    f"{name} must have shape (B={b}, Hkv={hkv}, Tnew, D={d}), k_new's, got {tuple(t.shape)}"
                )
            if t.device != k.device:
                raise ValueError(f"{name} must be on the cache's device {k.device}, got {t.device}")
        check_room(self.seqlens, k_new.shape[2], self.max_seq_len, self._room_bound())

    def advance(self, n):
        """Adds n filled positions to every row (int), or n[b] to row b ((B,) tensor)."""
        if isinstance(n, torch.Tensor):
            if n.shape != (self.batch_size,) or n.dtype.is_floating_point:
                raise ValueError(
                    f"n must be an int or a ({self.batch_size},) integer tensor, got "
                    f"{n.dtype} of shape {tuple(n.shape)}"
                )
            new = self.seqlens.long() + n.to(self.seqlens.device).long()
            lo, hi = (int(x) for x in torch.aminmax(new))
        else:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"n must be an int or an integer tensor, got {type(n).__name__}")
            bound = self._room_bound()
            new = self.seqlens.long() + n
            if bound is None:
                lo, hi = (int(x) for x in torch.aminmax(new))
            else:
                lo, hi = (int(new.min()) if n < 0 else 0), bound + n
        if lo < 0 or hi > self.max_seq_len:
            raise ValueError(f"advancing by {n} leaves a row outside 0..max_seq_len={self.max_seq_len}")
        self.seqlens.copy_(new)
        self._max_len = hi
        self._mark_lengths()

    def reset(self):
        """Empties every row (the buffers keep their memory; stale values are never read)."""
        self.seqlens.zero_()
        self._max_len = 0
        self._mark_lengths()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.seqlens.nbytes

    def __repr__(self):
        b, hkv, smax, d = self.k.shape[1:]
        return (
            f"KVCache(num_layers={self.num_layers}, batch_size={b}, num_kv_heads={hkv}, max_seq_len={smax}, "
            f"head_dim={d}, dtype={self.k.dtype}, device={self.k.device}, max filled={self._max_len})"
        )
