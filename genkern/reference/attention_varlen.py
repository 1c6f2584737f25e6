"""Packed (variable-length) attention in plain PyTorch: the spec and the fallback.

B sequences of different lengths are packed one after another, without padding:

    q (total_q, H, D)      tokens of sequence b at rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1
    k, v (total_k, Hkv, D) its keys at rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1] - 1

cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), starting at 0, non-decreasing, ending at
total_q / total_k. Sequence b has T_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b] queries and
S_b keys (T_b != S_b allowed; either may be 0). max_seqlen_q / max_seqlen_k bound the T_b
/ S_b: the kernels size their grids with them; here they are only checked.

Each sequence attends only within itself, exactly as genkern.reference.attention on
its slice: grouped-query heads (H % Hkv == 0), the causal mask aligned to the
bottom-right corner of that sequence (query i sees key j <= i + S_b - T_b), and
window_size = (left, right) as FlashAttention defines it, per sequence:

    i + S_b - T_b - left <= j <= i + S_b - T_b + right      (-1: unbounded)

    two sequences, T = (2, 3), S = (3, 2), causal:
                   keys of seq 0 | seq 1
    seq 0, i = 0       x x .     |  . .
           i = 1       x x x     |  . .
    seq 1, i = 0       . . .     |  . .      (i + S - T < 0: no key; out 0, lse -inf)
           i = 1       . . .     |  x .
           i = 2       . . .     |  x x

The log-sum-exp comes back as (H, total_q) float32, heads first, as FlashAttention's
varlen functions return it (lse[h, r] belongs to query row r of q, head h).

This version loops over the sequences and is written to be read, not to be fast.
"""

from __future__ import annotations

import torch

from genkern.ops.varlen_checks import check_varlen
from genkern.reference.attention import attention


def attention_varlen(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    *,
    causal=True,
    window_size=(-1, -1),
    scale=None,
    return_lse=False,
):
    """The output (total_q, H, D) in q's dtype; with return_lse also the (H, total_q)
    float32 log-sum-exp (see the module docstring). Bad arguments raise before anything
    is computed (genkern.ops.varlen_checks.check_varlen)."""
    check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_size)
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(bounds_q) - 1):
        rows_q = slice(bounds_q[b], bounds_q[b + 1])
        rows_k = slice(bounds_k[b], bounds_k[b + 1])
        qb = q[rows_q].transpose(0, 1).unsqueeze(0)  # (1, H, T_b, D)
        kb = k[rows_k].transpose(0, 1).unsqueeze(0)  # (1, Hkv, S_b, D)
        vb = v[rows_k].transpose(0, 1).unsqueeze(0)  # (1, Hkv, S_b, D)
        out_b, lse_b = attention(qb, kb, vb, causal, scale, True, window_size=window_size)
        outs.append(out_b[0].transpose(0, 1))  # (T_b, H, D)
        lses.append(lse_b[0])  # (H, T_b)
    out = torch.cat(outs, dim=0)  # (total_q, H, D)
    return (out, torch.cat(lses, dim=1)) if return_lse else out  # lse (H, total_q)
