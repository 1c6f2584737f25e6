"""genkern.flash_attention_varlen, and sliding windows on flash_attention and attention_with_kvcache,
through the public functions: every impl against the float64 spec under the 2x rule (utils.assert_close_rule),
forward, lse and gradients; odd lengths, zero-length sequences inside a pack, T != S per sequence, grouped-query
heads; gradcheck, opcheck and torch.compile(fullgraph=True) of the kernel ops; bad input refused by name.

The kernels are held to more at the op level (tests/test_attention_spans_cpp.py, ..._triton.py); here is what a
user calls.
"""

from __future__ import annotations

import math

import pytest
import torch

import genkern
import utils
from genkern.ops import attention_varlen as varlen_op
from genkern.reference import attention as reference
from genkern.reference import kv_decode as kv_reference
from genkern.reference.attention_varlen import attention_varlen
from utils import assert_close_rule, one_thread  # noqa: F401 (autouse fixture)

F32, F64, I32 = torch.float32, torch.float64, torch.int32


def pack(lengths_q, lengths_k, h, hkv, d, dtype, device, seed):
    """Random packed q, k, v and their int32 cumulative lengths."""
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = utils.randn((tq, h, d), dtype, device, seed=seed)
    k = utils.randn((tk, hkv, d), dtype, device, seed=seed + 1)
    v = utils.randn((tk, hkv, d), dtype, device, seed=seed + 2)
    cu = lambda ls: torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=I32, device=device)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


def check_varlen_case(impl, dtype, lengths_q, lengths_k, h, hkv, d, *, causal, window=(-1, -1), seed=0):
    """Runs flash_attention_varlen forward and backward and holds out, lse, dq, dk, dv to the reference."""
    utils.require_impl(impl)
    device = utils.impl_device(impl)
    q, k, v, cu_q, cu_k = pack(lengths_q, lengths_k, h, hkv, d, dtype, device, seed)
    args = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    kw = dict(causal=causal, window_size=window, return_lse=True)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = genkern.flash_attention_varlen(*leaves, *args, impl=impl, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (h, q.shape[0]) and lse.dtype == F32
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves_same = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out64, lse64 = attention_varlen(*leaves64, *args, **kw)
    out_same, lse_same = attention_varlen(*leaves_same, *args, **kw)
    assert_close_rule(out, out64, out_same, name="out")
    assert_close_rule(lse, lse64, lse_same, name="lse", absolute=dtype in (F32, F64))
    g = utils.randn(out.shape, dtype, device, seed=seed + 5)
    got = torch.autograd.grad(out, leaves, g)
    want64 = torch.autograd.grad(out64, leaves64, g.double())
    want_same = torch.autograd.grad(out_same, leaves_same, g)
    for name, a, w64, ws in zip(("dq", "dk", "dv"), got, want64, want_same):
        assert_close_rule(a, w64, ws, name=name)
    return out, lse


# (lengths_q, lengths_k): odd lengths, zero-length sequences inside the pack, T != S both ways.
PACKS = [
    ((1,), (1,)),
    ((17, 1, 113), (17, 1, 113)),
    ((5, 0, 9, 3), (5, 0, 9, 3)),
    ((4, 7, 2), (9, 3, 2)),  # T < S, T > S (queries without a key under causal), T == S
    ((0, 6, 0), (3, 6, 0)),  # a sequence with keys and no queries
]
WINDOWS = [(-1, -1), (3, -1), (-1, 2), (2, 1), (0, 0)]


@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params())
@pytest.mark.parametrize(
    "lengths", PACKS, ids=lambda p: "q" + "-".join(map(str, p[0])) + "_k" + "-".join(map(str, p[1]))
)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_values_and_grads(impl, dtype, lengths, causal):
    check_varlen_case(impl, dtype, *lengths, 4, 2, 16, causal=causal)


@pytest.mark.parametrize("impl", utils.IMPLS)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_varlen_windows(impl, window, causal):
    check_varlen_case(impl, F32, (9, 0, 21, 4), (9, 0, 17, 6), 4, 1, 32, causal=causal, window=window, seed=3)


@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_varlen_long_odd(impl):
    """1025-token sequences beside short ones (the interpreted Triton kernels are too slow here)."""
    check_varlen_case(impl, F32, (1025, 17, 300), (1025, 17, 300), 2, 1, 64, causal=True, window=(129, -1), seed=7)


@pytest.mark.parametrize("impl", utils.IMPLS)
def test_varlen_equals_each_sequence_alone(impl):
    """A pack gives what each sequence gives through flash_attention on its own (and nothing leaks between)."""
    utils.require_impl(impl)
    device = utils.impl_device(impl)
    lengths = (13, 0, 30, 7)
    q, k, v, cu_q, cu_k = pack(lengths, lengths, 4, 2, 16, F32, device, seed=11)
    out = genkern.flash_attention_varlen(q, k, v, cu_q, cu_k, 30, 30, window_size=(5, -1), impl=impl)
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        alone = genkern.flash_attention(
            *(x[rows].transpose(0, 1).unsqueeze(0) for x in (q, k, v)), window_size=(5, -1), impl=impl
        )
        torch.testing.assert_close(out[rows], alone[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


# --- windows on the dense and decode functions ----------------------------------------


@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params())
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("ts", [(17, 17), (9, 31), (31, 9)], ids=lambda p: f"T{p[0]}-S{p[1]}")
def test_dense_window(impl, dtype, window, ts):
    utils.require_impl(impl)
    device = utils.impl_device(impl)
    t, s = ts
    q = utils.randn((2, 4, t, 16), dtype, device, seed=20)
    k, v = (utils.randn((2, 2, s, 16), dtype, device, seed=21 + i) for i in range(2))
    for causal in (True, False):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out, lse = genkern.flash_attention(*leaves, causal=causal, window_size=window, return_lse=True, impl=impl)
        leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
        leaves_same = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out64, lse64 = reference.attention(*leaves64, causal, None, True, window_size=window)
        out_same, lse_same = reference.attention(*leaves_same, causal, None, True, window_size=window)
        assert_close_rule(out, out64, out_same, name="out")
        assert_close_rule(lse, lse64, lse_same, name="lse", absolute=dtype in (F32, F64))
        g = utils.randn(out.shape, dtype, device, seed=25)
        got = torch.autograd.grad(out, leaves, g)
        want64 = torch.autograd.grad(out64, leaves64, g.double())
        want_same = torch.autograd.grad(out_same, leaves_same, g)
        for name, a, w64, ws in zip(("dq", "dk", "dv"), got, want64, want_same):
            assert_close_rule(a, w64, ws, name=name)


@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_window_skips_nothing_it_needs(impl):
    """T = 1100 with a 100-key window against the same rows computed on only the keys they can see."""
    utils.require_impl(impl)
    q, k, v = (utils.randn((1, 2, 1100, 32), F32, seed=30 + i) for i in range(3))
    out = genkern.flash_attention(q, k, v, window_size=(100, 0), impl=impl)
    for i in (0, 99, 100, 517, 1099):
        lo = max(0, i - 100)
        row = genkern.flash_attention(q[:, :, i : i + 1], k[:, :, lo : i + 1], v[:, :, lo : i + 1], impl="torch")
        torch.testing.assert_close(out[:, :, i : i + 1], row, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params())
@pytest.mark.parametrize("left", [-1, 0, 3, 40])
def test_kvcache_window_and_key_lo(impl, dtype, left):
    utils.require_impl(impl)
    device = utils.impl_device(impl)
    b, h, hkv, d, smax, tnew = 3, 4, 2, 16, 64, 2
    q = utils.randn((b, h, tnew, d), dtype, device, seed=40)
    k_cache, v_cache = (utils.randn((b, hkv, smax, d), dtype, device, seed=41 + i) for i in range(2))
    k_new, v_new = (utils.randn((b, hkv, tnew, d), dtype, device, seed=43 + i) for i in range(2))
    lens = torch.tensor([0, 17, 50], dtype=I32, device=device)
    key_lo = torch.tensor([0, 5, 44], dtype=I32, device=device)
    with torch.no_grad():
        kc, vc = k_cache.clone(), v_cache.clone()
        out = genkern.attention_with_kvcache(
            q, kc, vc, lens, k_new, v_new, window_size=(left, -1), key_lo=key_lo, impl=impl
        )
        kc64, vc64 = k_cache.double(), v_cache.double()
        args64 = (q.double(), kc64, vc64, lens, k_new.double(), v_new.double())
        out64 = kv_reference.attention_with_kvcache(*args64, window_size=(left, -1), key_lo=key_lo)
        ks, vs = k_cache.clone(), v_cache.clone()
        args_same = (q, ks, vs, lens, k_new, v_new)
        out_same = kv_reference.attention_with_kvcache(*args_same, window_size=(left, -1), key_lo=key_lo)
    assert_close_rule(out, out64, out_same, name="out")
    torch.testing.assert_close(kc, ks, rtol=0, atol=0)  # the new keys were written where the spec writes them


# --- the kernel ops under torch's checks ------------------------------------------------


def test_varlen_gradcheck_cpp():
    utils.require_impl("cpp")
    q, k, v, cu_q, cu_k = pack((3, 0, 5), (4, 0, 5), 2, 1, 16, F64, "cpu", seed=50)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    fn = lambda q, k, v: genkern.flash_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, window_size=(2, -1), impl="cpp")  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


def test_varlen_opcheck_cpp():
    utils.require_impl("cpp")
    q, k, v, cu_q, cu_k = pack((3, 0, 5), (4, 0, 5), 4, 2, 16, F32, "cpu", seed=51)
    op = varlen_op.ATTENTION_VARLEN.op("cpp")
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu_q, cu_k, 5, 5, True, 0.25, 2, -1)
    torch.library.opcheck(op, args)


def test_varlen_compile_fullgraph_cpp():
    utils.require_impl("cpp")
    q, k, v, cu_q, cu_k = pack((6, 0, 11), (6, 0, 11), 4, 2, 16, F32, "cpu", seed=52)

    def f(q, k, v):
        out = genkern.flash_attention_varlen(q, k, v, cu_q, cu_k, 11, 11, window_size=(4, -1), impl="cpp")
        return out.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)


# --- bad input ------------------------------------------------------------------------


def _good():
    q, k, v, cu_q, cu_k = pack((3, 5), (3, 5), 2, 1, 16, F32, "cpu", seed=60)
    return [q, k, v, cu_q, cu_k, 5, 5]


BAD = [
    ("non-monotonic", lambda a: a.__setitem__(3, torch.tensor([0, 6, 8], dtype=I32)), ValueError, "cu_seqlens_q"),
    ("does not start at 0", lambda a: a.__setitem__(4, torch.tensor([1, 3, 8], dtype=I32)), ValueError, "cu_seqlens_k"),
    ("total mismatch", lambda a: a.__setitem__(3, torch.tensor([0, 3, 9], dtype=I32)), ValueError, "cu_seqlens_q"),
    ("int64", lambda a: a.__setitem__(3, a[3].long()), TypeError, "cu_seqlens_q"),
    ("max_seqlen too small", lambda a: a.__setitem__(5, 4), ValueError, "max_seqlen_q"),
    ("max_seqlen_k too small", lambda a: a.__setitem__(6, 2), ValueError, "max_seqlen_k"),
    ("batch mismatch", lambda a: a.__setitem__(4, torch.tensor([0, 8], dtype=I32)), ValueError, "cu_seqlens"),
]


@pytest.mark.parametrize("impl", utils.IMPLS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_varlen_bad_input(impl, case):
    _, spoil, exc, name = case
    args = _good()
    spoil(args)
    with pytest.raises(exc, match=name):
        genkern.flash_attention_varlen(*args, impl=impl)


@pytest.mark.parametrize("window", [(-2, -1), (0, -5), (1.5, 2), (1,), "(1, 1)"])
def test_window_refused(window):
    args = _good()
    with pytest.raises((TypeError, ValueError), match="window_size"):
        genkern.flash_attention_varlen(*args, window_size=window)
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises((TypeError, ValueError), match="window_size"):
        genkern.flash_attention(q, q, q, window_size=window)


def test_key_lo_refused():
    q = torch.randn(2, 2, 1, 16)
    cache = torch.randn(2, 2, 8, 16)
    lens = torch.tensor([3, 4], dtype=I32)
    with pytest.raises(ValueError, match="key_lo"):
        genkern.attention_with_kvcache(q, cache, cache.clone(), lens, key_lo=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="key_lo"):
        genkern.attention_with_kvcache(q, cache, cache.clone(), lens, key_lo=torch.tensor([0], dtype=I32))


def test_empty_rows_are_zero():
    """Queries whose window holds no key (T > S under causal) give 0 and lse -inf, not NaN."""
    q, k, v, cu_q, cu_k = pack((6,), (2,), 2, 2, 16, F32, "cpu", seed=70)
    out, lse = genkern.flash_attention_varlen(q, k, v, cu_q, cu_k, 6, 2, return_lse=True, impl="torch")
    assert bool((out[:4] == 0).all()) and bool((lse[:, :4] == -math.inf).all())
    assert bool(torch.isfinite(out[4:]).all())


def test_window_and_spans_opcheck_cpp():
    utils.require_impl("cpp")
    from genkern.ops import attention as attention_op

    q = utils.randn((2, 4, 9, 16), F32, seed=80).requires_grad_()
    k, v = (utils.randn((2, 2, 11, 16), F32, seed=81 + i).requires_grad_() for i in range(2))
    lo = torch.tensor([[0] * 9, [3] * 9], dtype=I32)
    hi = torch.tensor([[6] * 9, [11] * 9], dtype=I32)
    op = attention_op.ATTENTION.op("cpp")
    torch.library.opcheck(op, (q, k, v, True, 0.25, 3, -1, lo, hi))
    torch.library.opcheck(op, (q, k, v, False, 0.25, 2, 1, None, None))


def test_window_and_spans_compile_fullgraph_cpp():
    utils.require_impl("cpp")
    from genkern.ops.attention import span_attention

    q = utils.randn((2, 4, 9, 16), F32, seed=90)
    k, v = (utils.randn((2, 2, 9, 16), F32, seed=91 + i) for i in range(2))
    lo = torch.tensor([[0] * 9, [4] * 9], dtype=I32)
    hi = torch.tensor([[5] * 9, [9] * 9], dtype=I32)

    def f(q, k, v):
        a = genkern.flash_attention(q, k, v, window_size=(3, 0), impl="cpp")
        b = span_attention(q, k, v, lo, hi, impl="cpp")
        return (a * b).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(f(*leaves), leaves)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
