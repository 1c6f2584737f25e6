"""The sliding-window and packed (varlen) references against independent float64 formulas.

genkern.reference.attention_varlen, and genkern.reference.attention /
genkern.reference.kv_decode with window_size, are held to `loop_varlen` and
`loop_kvcache_window`: the same math written out one query at a time in float64, with
FlashAttention's window rule spelled out (query i of a sequence with T queries and S keys
sees keys j with i + S - T - left <= j <= i + S - T + right; causal: right = 0), never
calling the reference. Outputs and gradients (autograd through the loops) must match
within utils.SPEC_TOL (utils.assert_matches_formula). genkern.ops.varlen_checks must
refuse every bad argument with an exception naming it.
"""

from __future__ import annotations

import math

import pytest
import torch

import utils
from genkern.ops.varlen_checks import check_varlen
from genkern.reference import attention as reference
from genkern.reference import kv_decode
from genkern.reference.attention_varlen import attention_varlen
from utils import assert_matches_formula, one_thread  # noqa: F401 (autouse fixture)

F32, F64, I32 = torch.float32, torch.float64, torch.int32


def visible_range(i, t, s, causal, window_size):
    """(lo, hi): query i of T sees keys lo .. hi of S (empty when lo > hi), FlashAttention's rule."""
    left, right = window_size
    right = 0 if causal else right
    diag = i + s - t  # the key aligned with query i (bottom-right)
    lo = 0 if left < 0 else max(0, diag - left)
    hi = s - 1 if right < 0 else min(s - 1, diag + right)
    return lo, hi


def loop_varlen(q, k, v, cu_q, cu_k, causal, window_size, scale=None):
    """out (total_q, H, D) and lse (H, total_q) in float64, one query at a time, all heads at
    once: head h reads KV head h // (H // Hkv); softmax as exp / sum; a query that sees no
    key gets out 0 and lse -inf. Differentiable."""
    total_q, h, d = q.shape
    heads = torch.arange(h) // (h // k.shape[1])  # (H,): the KV head of each query head
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        t, s = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(t):
            lo, hi = visible_range(i, t, s, causal, window_size)
            if lo > hi:
                outs.append(q.new_zeros(h, d))
                lses.append(q.new_full((h,), -math.inf))
                continue
            keys = k[cu_k[b] + lo : cu_k[b] + hi + 1][:, heads]  # (n, H, D)
            values = v[cu_k[b] + lo : cu_k[b] + hi + 1][:, heads]  # (n, H, D)
            x = (keys * q[cu_q[b] + i]).sum(-1) * scale  # (n, H) scores
            m = x.max(0).values.detach()  # (H,): the shift changes no value
            e = torch.exp(x - m)
            outs.append((e.unsqueeze(-1) * values).sum(0) / e.sum(0).unsqueeze(-1))
            lses.append(m + torch.log(e.sum(0)))
    return torch.stack(outs), torch.stack(lses, dim=1)


def make_packed(lengths_q, lengths_k, heads, d, dtype=F64, seed=0):
    """Random packed q (total_q, H, D), k, v (total_k, Hkv, D) and the int32 cu_seqlens."""
    h, hkv = heads
    cu_q = [0] + [sum(lengths_q[: b + 1]) for b in range(len(lengths_q))]
    cu_k = [0] + [sum(lengths_k[: b + 1]) for b in range(len(lengths_k))]
    q = utils.randn((cu_q[-1], h, d), dtype, seed=seed, scale=2.0)
    k = utils.randn((cu_k[-1], hkv, d), dtype, seed=seed + 1)
    v = utils.randn((cu_k[-1], hkv, d), dtype, seed=seed + 2)
    return q, k, v, torch.tensor(cu_q, dtype=I32), torch.tensor(cu_k, dtype=I32)


CASES = {
    # name: (lengths_q, lengths_k, (H, Hkv), D, causal, window_size)
    "odd-causal": ([1, 17, 113], [1, 17, 113], (4, 4), 16, True, (-1, -1)),
    "odd-full": ([1, 17, 113], [1, 17, 113], (4, 2), 16, False, (-1, -1)),
    "zero-length-inside": ([3, 0, 17, 0, 5, 4], [3, 0, 17, 6, 0, 9], (4, 2), 8, True, (-1, -1)),
    "zero-length-full": ([3, 0, 17, 0, 5], [3, 0, 17, 6, 0], (4, 2), 8, False, (-1, -1)),
    "t-ne-s-causal": ([5, 17, 1, 9], [9, 3, 1, 20], (4, 2), 8, True, (-1, -1)),
    "t-ne-s-full": ([5, 17, 1], [9, 3, 1], (4, 2), 8, False, (-1, -1)),
    "mqa": ([17, 4], [5, 17], (4, 1), 8, True, (-1, -1)),
    "left-only": ([17, 113], [20, 113], (4, 2), 8, False, (5, -1)),
    "right-only": ([17, 113], [20, 100], (4, 2), 8, False, (-1, 3)),
    "both": ([17, 1, 113], [9, 4, 113], (4, 2), 8, False, (7, 2)),
    "causal-left": ([17, 113, 3], [30, 113, 1], (4, 1), 8, True, (6, -1)),
    "causal-both": ([17, 113], [17, 90], (4, 2), 8, True, (6, 4)),  # causal: right is 0
    "zero-window": ([17, 5], [17, 9], (2, 1), 8, False, (0, 0)),  # the diagonal only
    "long-window": ([1025], [1025], (2, 1), 4, True, (64, -1)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_varlen_matches_loop(case):
    lengths_q, lengths_k, heads, d, causal, window = CASES[case]
    q, k, v, cu_q, cu_k = make_packed(lengths_q, lengths_k, heads, d, seed=len(case))
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = attention_varlen(
        *leaves, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=causal, window_size=window, return_lse=True
    )
    leaves64 = [x.detach().requires_grad_() for x in (q, k, v)]
    out64, lse64 = loop_varlen(*leaves64, cu_q.tolist(), cu_k.tolist(), causal, window)
    assert out.dtype == F64 and lse.dtype == F32 and lse.shape == (heads[0], q.shape[0])
    assert_matches_formula(out, out64, name="out")
    assert_matches_formula(lse, lse64, name="lse")
    if q.shape[0] > 1000:
        return  # gradients: the other cases (1, 17, 113); autograd through 1025 loop steps costs seconds
    g_out = utils.randn(out.shape, F64, seed=7)
    g_lse = utils.randn(lse.shape, F32, seed=8)
    fin = torch.isfinite(lse64)  # rows that see no key: no gradient through their -inf
    grads = torch.autograd.grad([out, lse], leaves, [g_out, g_lse.masked_fill(~fin, 0)])
    want = torch.autograd.grad([out64, lse64[fin]], leaves64, [g_out, g_lse.double()[fin]])
    for name, got, w in zip("qkv", grads, want):
        assert_matches_formula(got, w, name=f"d{name}")


def test_varlen_float32_and_defaults():
    """q's dtype is kept, lse is float32; without return_lse only the output; causal and an
    unbounded window are the defaults."""
    q, k, v, cu_q, cu_k = make_packed([5, 0, 17], [9, 2, 17], (4, 2), 8, dtype=F32, seed=3)
    out = attention_varlen(q, k, v, cu_q, cu_k, 17, 17)
    out64, _ = loop_varlen(q, k, v, cu_q.tolist(), cu_k.tolist(), True, (-1, -1))
    assert out.dtype == F32 and out.shape == q.shape
    assert_matches_formula(out, out64)


def test_varlen_gradcheck():
    q, k, v, cu_q, cu_k = make_packed([2, 0, 3], [3, 1, 3], (2, 1), 3, seed=5)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    for causal, window in ((True, (1, -1)), (False, (1, 1)), (True, (-1, -1))):

        def f(q, k, v):
            return attention_varlen(q, k, v, cu_q, cu_k, 3, 3, causal=causal, window_size=window)

        assert torch.autograd.gradcheck(f, leaves)


def to_packed(x):
    """(B, H, T, D) -> (B * T, H, D): every sequence of one length."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d)  # (B*T, H, D)


@pytest.mark.parametrize("causal,window", [(True, (3, -1)), (True, (2, 5)), (False, (4, 1)), (False, (-1, 0))])
@pytest.mark.parametrize("t,s", [(7, 19), (19, 7), (1, 1)])
def test_dense_window_matches_loop(t, s, causal, window):
    b, (h, hkv), d = 2, (4, 2), 8
    q = utils.randn((b, h, t, d), F64, seed=t, scale=2.0).requires_grad_()
    k = utils.randn((b, hkv, s, d), F64, seed=s + 1).requires_grad_()
    v = utils.randn((b, hkv, s, d), F64, seed=s + 2).requires_grad_()
    out, lse = reference.attention(q, k, v, causal, None, True, window_size=window)
    cu_q, cu_k = [i * t for i in range(b + 1)], [i * s for i in range(b + 1)]
    out64, lse64 = loop_varlen(to_packed(q), to_packed(k), to_packed(v), cu_q, cu_k, causal, window)
    assert_matches_formula(to_packed(out), out64, name="out")
    assert_matches_formula(lse.transpose(1, 2).reshape(b * t, h).T, lse64, name="lse")  # (H, B*T)
    g = utils.randn(out.shape, F64, seed=9)
    grads = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(out64, (q, k, v), to_packed(g))
    for name, got, w in zip("qkv", grads, want):
        assert_matches_formula(got, w, name=f"d{name}")


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,s", [(5, 9), (9, 5)])
def test_dense_default_window_is_unchanged(t, s, causal):
    """window_size=(-1, -1) is the call without it, bit for bit; a window wider than the
    whole score matrix masks nothing, so it gives the same bits too."""
    q = utils.randn((2, 4, t, 8), F32, seed=1, scale=2.0)
    k, v = utils.randn((2, 2, s, 8), F32, seed=2), utils.randn((2, 2, s, 8), F32, seed=3)
    old = reference.attention(q, k, v, causal, None, True)
    for window in ((-1, -1), (t + s, -1), (t + s, t + s)):
        new = reference.attention(q, k, v, causal, None, True, window_size=window)
        assert all(torch.equal(a, b) for a, b in zip(old, new)), window


def loop_kvcache_window(q, k_after, v_after, lengths, left, scale=None):
    """float64 (B, H, Tnew, D) from the caches after the write and each row's length n_b:
    query i of row b sees positions max(0, i + n_b - Tnew - left) .. i + n_b - Tnew."""
    b, h, tnew, d = q.shape
    out = torch.zeros(q.shape, dtype=F64)
    for row, n in enumerate(lengths):
        cu = [0, tnew], [0, n]
        k_row, v_row = k_after[row, :, :n].transpose(0, 1), v_after[row, :, :n].transpose(0, 1)  # (n, Hkv, D)
        o, _ = loop_varlen(q[row].transpose(0, 1), k_row, v_row, *cu, True, (left, -1), scale)  # (Tnew, H, D)
        out[row] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("left", [-1, 0, 3])
@pytest.mark.parametrize("with_new", [True, False])
def test_kvcache_window_matches_loop(left, with_new):
    b, (h, hkv), tnew, smax, d = 4, (4, 2), 3, 16, 8
    lengths = [0, 1, smax - tnew, 7] if with_new else [0, 1, smax, 9]
    q = utils.randn((b, h, tnew, d), F64, seed=1, scale=2.0)
    kc, vc = utils.randn((b, hkv, smax, d), F64, seed=2), utils.randn((b, hkv, smax, d), F64, seed=3)
    kn = utils.randn((b, hkv, tnew, d), F64, seed=4) if with_new else None
    vn = utils.randn((b, hkv, tnew, d), F64, seed=5) if with_new else None
    seqlens = torch.tensor(lengths, dtype=I32)
    k_after, v_after = kc.clone(), vc.clone()
    out = kv_decode.attention_with_kvcache(q, k_after, v_after, seqlens, kn, vn, window_size=(left, 5))
    n_after = [n + tnew for n in lengths] if with_new else lengths
    assert_matches_formula(out, loop_kvcache_window(q, k_after, v_after, n_after, left))
    if left < 0:  # the default: bit for bit the call without window_size
        k2, v2 = kc.clone(), vc.clone()
        assert torch.equal(out, kv_decode.attention_with_kvcache(q, k2, v2, seqlens, kn, vn))


def good_args():
    q, k, v, cu_q, cu_k = make_packed([3, 0, 5], [4, 2, 5], (4, 2), 8, dtype=F32)
    return dict(
        q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=5, window_size=(-1, -1)
    )


BAD = {
    # name: (changes to good_args(), exception, the argument the message must name)
    "cu-not-monotonic": (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8], dtype=I32)), ValueError, "cu_seqlens_q"),
    "cu-out-of-range": (dict(cu_seqlens_k=torch.tensor([0, 4, 6, 99], dtype=I32)), ValueError, "cu_seqlens_k"),
    "cu-negative": (dict(cu_seqlens_k=torch.tensor([0, -1, 6, 11], dtype=I32)), ValueError, "cu_seqlens_k"),
    "cu-not-at-0": (dict(cu_seqlens_q=torch.tensor([1, 3, 3, 8], dtype=I32)), ValueError, "cu_seqlens_q"),
    "cu-int64": (dict(cu_seqlens_q=torch.tensor([0, 3, 3, 8])), TypeError, "cu_seqlens_q"),
    "cu-list": (dict(cu_seqlens_k=[0, 4, 6, 11]), TypeError, "cu_seqlens_k"),
    "cu-2d": (dict(cu_seqlens_k=torch.zeros(2, 2, dtype=I32)), ValueError, "cu_seqlens_k"),
    "cu-too-short": (dict(cu_seqlens_q=torch.zeros(1, dtype=I32)), ValueError, "cu_seqlens_q"),
    "cu-batch-differs": (dict(cu_seqlens_k=torch.tensor([0, 4, 11], dtype=I32)), ValueError, "cu_seqlens_k"),
    "total-q-short": (dict(cu_seqlens_q=torch.tensor([0, 3, 3, 7], dtype=I32)), ValueError, "cu_seqlens_q"),
    "max-q-small": (dict(max_seqlen_q=4), ValueError, "max_seqlen_q"),
    "max-k-small": (dict(max_seqlen_k=1), ValueError, "max_seqlen_k"),
    "max-not-int": (dict(max_seqlen_k=5.0), TypeError, "max_seqlen_k"),
    "window-left": (dict(window_size=(-2, 0)), ValueError, "window_size"),
    "window-right": (dict(window_size=(3, -5)), ValueError, "window_size"),
    "window-float": (dict(window_size=(3.0, 1)), TypeError, "window_size"),
    "window-triple": (dict(window_size=(1, 1, 1)), TypeError, "window_size"),
    "q-4d": (dict(q=torch.zeros(1, 8, 4, 8)), ValueError, "q"),
    "k-v-shapes": (dict(v=torch.zeros(11, 2, 4)), ValueError, "k and v"),
    "head-dim": (dict(k=torch.zeros(11, 2, 4), v=torch.zeros(11, 2, 4)), ValueError, "D="),
    "heads": (dict(k=torch.zeros(11, 3, 8), v=torch.zeros(11, 3, 8)), ValueError, "heads"),
    "dtype": (dict(k=torch.zeros(11, 2, 8, dtype=F64)), TypeError, "k "),
    "int-q": (dict(q=torch.zeros(8, 4, 8, dtype=I32)), TypeError, "q "),
    "device": (dict(cu_seqlens_k=torch.tensor([0, 4, 6, 11], dtype=I32, device="meta")), ValueError, "cu_seqlens_k"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_check_varlen_refuses(case):
    changes, exc, name = BAD[case]
    args = {**good_args(), **changes}
    with pytest.raises(exc, match=name):
        check_varlen(**args)
    window = args.pop("window_size")
    with pytest.raises(exc, match=name):  # the reference checks before it computes
        attention_varlen(*args.values(), window_size=window)


def test_check_varlen_accepts():
    check_varlen(**good_args())
    args = good_args()
    args.update(max_seqlen_q=100, window_size=[0, 0])
    check_varlen(**args)


@pytest.mark.parametrize("window", [(-2, -1), (0.5, 1)])
def test_dense_references_refuse_bad_window(window):
    q = torch.zeros(1, 2, 3, 4)
    exc = ValueError if window[0] == -2 else TypeError
    with pytest.raises(exc, match="window_size"):
        reference.attention(q, q, q, window_size=window)
    with pytest.raises(exc, match="window_size"):
        kv_decode.attention_with_kvcache(q, q.clone(), q.clone(), torch.zeros(1, dtype=I32), window_size=window)
