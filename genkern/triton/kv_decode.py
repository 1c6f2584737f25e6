"""Triton split-KV decoding (flash-decoding): attention of a few new queries against a KV cache.

Math: genkern/reference/kv_decode.py (the spec). q (B, H, Tnew, D); caches (B, Hkv, Smax, D) with
L_b filled positions per row; k_new, v_new (B, Hkv, Tnew, D) or None. With new keys the row holds
n_b = L_b + Tnew positions (the new ones written in place at L_b ..), else n_b = L_b. Query i sees
positions j < n_b with j <= i + n_b - Tnew (causal, aligned to the row's last filled position):

    Tnew = 3, n_b = 6       j = 0 1 2 3 4 5
    query i = 0                 x x x x . .     diag = n_b - Tnew = 3
    query i = 1                 x x x x x .
    query i = 2                 x x x x x x

Decoding has few queries and a long cache: one program per (batch row, KV head) would leave most
SMs idle, so the cache positions are cut into `num_splits` chunks, each its own program:

    _kv_decode_append_kernel   (with k_new/v_new) cache[b, hk, L_b + t] = new[b, hk, t], first,
                               so the split programs read every position from the cache (reading
                               k_new/v_new in the split kernel's pipelined loop instead would
                               double its shared-memory buffers and spill its registers).
    _kv_decode_split_kernel    grid (B * Hkv, num_splits): the G * Tnew query rows of one KV group
                               (G = H // Hkv) form the M side of one tl.dot against each K block,
                               so a group reads each K/V block once; online softmax over the chunk
                               gives a float32 partial out_s and lse_s per query row. More than
                               BLOCK_M rows (a prefill chunk) take several programs on axis 0,
                               next to each other so that they share the K/V blocks in L2.
    _kv_decode_combine_kernel  one program per query row: out = sum_s w_s out_s / sum_s w_s with
                               w_s = exp(lse_s - max lse), zeros when every partial is empty.

Positions >= n_b are never loaded (they may hold NaN). The kernels clamp L_b to [0, Smax] and n_b
to Smax, so even lengths that break the contract move no load or store out of bounds.
"""

from __future__ import annotations

import torch
import triton

from genkern.reference.kv_decode import separate_new
from genkern.triton._common import (
    BLOCK_DS,
    INTERPRETED,
    LOG2E,
    check_dtype,
    rows8,
)
from genkern.triton.kv_decode_kernels import (
    APPEND_ROWS,
    BLOCK_M,
    CHUNK_ALIGN,
    CONFIGS,
    INTERPRETER_CONFIG,
    MAX_SPLITS,
    MAX_STRIDE,
    MIN_CHUNK,
    SMALL_WARPS,
    STRIDED_CONFIG,
    _kv_decode_append_kernel,
    _kv_decode_combine_kernel,
    _kv_decode_split_kernel,
)

# --- launcher: check, allocate, launch ------------------------------------------------------


def _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new, key_lo=None):
    """Checks the op's contract (genkern/ops/kv_decode.py checks it first, with the bound on the
    lengths); returns (B, H, Tnew, D, Hkv, Smax)."""
    check_dtype("q", q, "kv_decode")
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(
            f"q must be (B, H, Tnew, D) and the caches (B, Hkv, Smax, D), got {tuple(q.shape)}, {tuple(k_cache.shape)}"
        )
    (B, H, T, D), (_, Hkv, S, _) = q.shape, k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D or Hkv == 0 or H % Hkv:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} must be (B, Hkv, Smax, D) with H % Hkv == 0 for q {tuple(q.shape)}"
        )
    if D % 8 or not 16 <= D <= 256 or min(B, T, S) < 1:
        raise ValueError(
            f"head dim must be 16..256 in steps of 8 and B, Tnew, Smax >= 1, got q {tuple(q.shape)}, Smax={S}"
        )
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or both None)")
    new = (k_cache.shape[:2] + (T, D), q.dtype)
    for name, t, (shape, dtype) in (
        ("v_cache", v_cache, (k_cache.shape, q.dtype)),
        ("k_new", k_new, new),
        ("v_new", v_new, new),
        ("cache_seqlens", cache_seqlens, ((B,), torch.int32)),
        ("key_lo", key_lo, ((B,), torch.int32)),
    ):
        if t is not None and (t.shape != shape or t.dtype != dtype or t.device != q.device):
            raise ValueError(
                f"{name} must be {tuple(shape)} {dtype} on {q.device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
            )
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(3) != 1 or t.stride(2) >= MAX_STRIDE:
            raise ValueError(
                f"{name} must have a unit-stride last dim and a position stride below {MAX_STRIDE} "
                f"(it is written in place, never copied), got strides {t.stride()}"
            )
    if B * H * T >= 2**31:  # the combine kernel's grid (the split kernel's axis 0 is smaller)
        raise ValueError(f"q {tuple(q.shape)} has too many query rows for the kv_decode kernels")
    return B, H, T, D, Hkv, S


def _cache_strides(k_cache, v_cache):
    """(SU, strides of dims 0-2 of both caches in units of SU): 8 lets the compiler vectorise
    every row along D; an oddly strided cache takes the element-wise path (SU = 1)."""
    su = 8 if all(t.shape[i] == 1 or t.stride(i) % 8 == 0 for t in (k_cache, v_cache) for i in range(3)) else 1
    return su, [t.stride(i) // su if t.shape[i] > 1 else 0 for t in (k_cache, v_cache) for i in range(3)]


_SMS = {}


def _split_plan(programs, smax, device):
    """(num_splits, chunk): about two waves of programs over the device's SMs, chunks of at least
    MIN_CHUNK positions, a multiple of CHUNK_ALIGN; under the interpreter a few small chunks."""
    if INTERPRETED:
        step, splits = INTERPRETER_CONFIG[0], min(4, triton.cdiv(smax, INTERPRETER_CONFIG[0]))
    else:
        if device not in _SMS:
            _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
        step = CHUNK_ALIGN
        splits = max(1, min(MAX_SPLITS, triton.cdiv(2 * _SMS[device], programs), triton.cdiv(smax, MIN_CHUNK)))
    chunk = triton.cdiv(triton.cdiv(smax, splits), step) * step
    return triton.cdiv(smax, chunk), chunk


def kv_decode(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, window_left=-1, key_lo=None):
    """out (B, H, Tnew, D) contiguous in q's dtype; writes k_new/v_new into the caches in place.
    The contract of kv_decode in genkern/ops/_library.py; see the module docstring."""
    B, H, T, D, Hkv, S = _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new, key_lo)
    if k_new is not None:
        k_new, v_new = separate_new(k_cache, v_cache, k_new, v_new)  # a view of a cache is read first
    (q, sq), (su, sc), block_d = rows8(q), _cache_strides(k_cache, v_cache), triton.next_power_of_2(D)
    if k_new is not None:
        (kn, skn), (vn, svn) = rows8(k_new), rows8(v_new)
        _kv_decode_append_kernel[(B * Hkv, triton.cdiv(T, APPEND_ROWS))](
            k_cache,
            v_cache,
            kn,
            vn,
            cache_seqlens,
            *sc,
            *skn,
            *svn,
            Hkv,
            T,
            S,
            D // 8,
            SU=su,
            BLOCK_T=APPEND_ROWS,
            BLOCK_D=block_d,
            num_warps=SMALL_WARPS,
        )
    m_tiles = triton.cdiv((H // Hkv) * T, BLOCK_M)
    splits, chunk = _split_plan(B * Hkv * m_tiles, S, q.device)
    part_o = torch.empty((B * H * T, splits, D), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B * H * T, splits), dtype=torch.float32, device=q.device)
    kernel, pinned = (
        (_kv_decode_split_kernel, {})
        if su == 8
        else (
            _kv_decode_split_kernel.fn,
            dict(BLOCK_N=STRIDED_CONFIG[0], num_warps=STRIDED_CONFIG[1], num_stages=STRIDED_CONFIG[2]),
        )
    )
    kernel[(B * Hkv * m_tiles, splits)](
        part_o,
        part_lse,
        q,
        k_cache,
        v_cache,
        cache_seqlens,
        cache_seqlens if key_lo is None else key_lo.contiguous(),  # with stride 0 not read
        0 if key_lo is None else 1,
        window_left if 0 <= window_left < S else -1,  # Smax or more hides nothing
        *sq,
        *sc,
        Hkv,
        H // Hkv,
        T,
        0 if k_new is None else T,
        S,
        D // 8,
        m_tiles,
        chunk,
        scale * LOG2E,
        SU=su,
        BLOCK_M=BLOCK_M,
        BLOCK_D=block_d,
        **pinned,
    )
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    _kv_decode_combine_kernel[(B * H * T,)](
        out,
        part_o,
        part_lse,
        splits,
        D // 8,
        BLOCK_S=MAX_SPLITS,
        CHUNK_S=_chunk_s(block_d),
        BLOCK_D=block_d,
        num_warps=SMALL_WARPS,
    )
    return out


def _chunk_s(block_d):
    return min(16, 2048 // block_d)  # partials per round of the combine: <= 2048 elements in registers


def aot_cases():
    """For genkern.triton._aot: the split kernel at every BLOCK_D x autotune config, and with an
    oddly strided cache (SU = 1) at STRIDED_CONFIG; the append kernel (SU = 8, 1) and the combine
    kernel at every BLOCK_D."""
    types = {"po_ptr": "*fp32", "plse_ptr": "*fp32", "seqlens_ptr": "*i32", "klo_ptr": "*i32", "qk_scale": "fp32"}
    for bd, configs in CONFIGS.items():
        for su, (bn, w, s) in [(8, c) for c in configs] + [(1, STRIDED_CONFIG)]:
            yield dict(
                kernel=_kv_decode_split_kernel.fn,
                constexprs=dict(SU=su, BLOCK_M=BLOCK_M, BLOCK_D=bd, BLOCK_N=bn),
                num_warps=w,
                num_stages=s,
                types=types,
            )
    for bd in BLOCK_DS:
        for su in (8, 1):
            yield dict(
                kernel=_kv_decode_append_kernel,
                types=types,
                num_warps=SMALL_WARPS,
                constexprs=dict(SU=su, BLOCK_T=APPEND_ROWS, BLOCK_D=bd),
            )
        yield dict(
            kernel=_kv_decode_combine_kernel,
            types=types,
            num_warps=SMALL_WARPS,
            constexprs=dict(BLOCK_S=MAX_SPLITS, CHUNK_S=_chunk_s(bd), BLOCK_D=bd),
        )
