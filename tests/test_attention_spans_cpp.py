"""The C++ attention kernels with sliding windows, per-row key spans and packed (varlen)
sequences, and kv_decode's window and key_lo, called through torch.ops.genkern directly
against the float64 references (genkern.reference.attention with window_size/key_spans,
genkern.reference.attention_varlen, genkern.reference.kv_decode); gradients of the
reference through autograd.

float64 must match to ~1e-10 (the kernels recompute lse in float64), float32 to ~1e-5
relative to max(1, max |reference|). Keys and values no row sees are filled with NaN/inf
in several cases: they must not reach any result, which also shows that the kernels leave
out the work outside every row's span rather than masking it after the fact.
"""

from __future__ import annotations

import math

import pytest
import torch

import genkern  # noqa: F401  (loads genkern._C: the ops below)
import utils
from genkern.reference.attention import attention as ref_attention
from genkern.reference.attention_varlen import attention_varlen as ref_varlen
from genkern.reference.kv_decode import attention_with_kvcache as ref_kv_decode

F32, F64 = torch.float32, torch.float64
TOL = {F64: 1e-10, F32: 1e-5}
ops = torch.ops.genkern


@pytest.fixture(autouse=True)
def _cpp():
    utils.require_impl("cpp")


def close(got, want, dtype, name):
    """|got - want| <= TOL * max(1, max |want|), exact where want is -inf (empty rows' lse)."""
    want = want.to(F64)
    got = got.to(F64)
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf), f"{name}: infinities differ"
    assert torch.equal(got[inf], want[inf]), f"{name}: infinities differ"
    assert torch.isfinite(got[~inf]).all(), f"{name}: non-finite values"
    scale = max(1.0, want[~inf].abs().max().item()) if (~inf).any() else 1.0
    err = (got[~inf] - want[~inf]).abs().max().item() if (~inf).any() else 0.0
    assert err <= TOL[dtype] * scale, f"{name}: max error {err:.3g} > {TOL[dtype] * scale:.3g}"


def rand(shape, dtype, seed, scale=1.0):
    return utils.randn(shape, dtype, seed=seed, scale=scale)


def grads_of(fn, inputs, gout, glse):
    """Gradients of sum(out * gout) + sum(lse * glse) w.r.t. inputs, through the float64 reference."""
    xs = [x.detach().to(F64).requires_grad_(True) for x in inputs]
    out, lse = fn(*xs)
    fin = torch.isfinite(lse)
    loss = (out * gout.to(F64)).sum() + (torch.where(fin, lse, 0) * glse.to(F64)).sum()
    return (out.detach(), lse.detach()), torch.autograd.grad(loss, xs)


# --- dense attention: windows and key spans ------------------------------------------------
def dense_case(b, h, hkv, t, s, d, dtype, seed):
    q = rand((b, h, t, d), dtype, seed, 2.0)
    k = rand((b, hkv, s, d), dtype, seed + 1)
    v = rand((b, hkv, s, d), dtype, seed + 2)
    return q, k, v


def check_dense(q, k, v, causal, window, spans, dtype, seed=0, plant=None):
    """Forward, lse and gradients of attention_cpp_fwd/bwd against the reference; `plant`
    (mask (B, S) of keys no row sees) gets NaN/inf in k and v after the reference ran."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kw = dict(window_size=window, key_spans=spans)
    lo, hi = spans if spans is not None else (None, None)

    def fn(q_, k_, v_):
        return ref_attention(q_, k_, v_, causal, scale, True, **kw)

    gout = rand(q.shape, dtype, seed + 7)
    glse = rand(q.shape[:3], F32, seed + 8)
    (out64, lse64), (dq64, dk64, dv64) = grads_of(fn, (q, k, v), gout, glse)
    if plant is not None:
        k, v = k.clone(), v.clone()
        k[:, 0][plant] = float("nan")
        v[:, -1][plant] = float("inf")
        k[:, -1][plant] = float("-inf")
        v[:, 0][plant] = float("nan")
    out, lse = ops.attention_cpp_fwd(q, k, v, causal, scale, window[0], window[1], lo, hi)
    close(out, out64, dtype, "out")
    close(lse, lse64.float(), dtype, "lse")
    dq, dk, dv = ops.attention_cpp_bwd(gout, q, k, v, out, lse, glse, causal, scale, window[0], window[1], lo, hi)
    close(dq, dq64, dtype, "dq")
    keep = ~plant if plant is not None else torch.ones(k.shape[0], k.shape[2], dtype=torch.bool)
    close(dk.transpose(1, 2)[keep], dk64.transpose(1, 2)[keep], dtype, "dk")
    close(dv.transpose(1, 2)[keep], dv64.transpose(1, 2)[keep], dtype, "dv")
    if plant is not None:  # a key no row sees gets no gradient
        assert (dk.transpose(1, 2)[plant] == 0).all() and (dv.transpose(1, 2)[plant] == 0).all()


WINDOWS = [(-1, -1), (0, 0), (5, -1), (-1, 7), (16, 3), (0, -1), (-1, 0)]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("window", WINDOWS, ids=[f"w{w[0]}_{w[1]}" for w in WINDOWS])
@pytest.mark.parametrize("t,s", [(1, 1), (17, 17), (113, 300), (300, 113)])
def test_windows(dtype, causal, window, t, s):
    q, k, v = dense_case(2, 4, 2, t, s, 16, dtype, seed=t * 7 + s)
    check_dense(q, k, v, causal, window, None, dtype, seed=t)


def spans_of(kind, b, t, s, seed):
    """int32 (B, T) key_lo, key_hi of a padding pattern."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, s + 1, (b,), generator=g)
    if kind == "right":  # row b's keys are [0, len_b)
        lo, hi = torch.zeros(b, t), lens.view(b, 1).expand(b, t)
    elif kind == "left":  # row b's keys are [s - len_b, s)
        lo, hi = (s - lens).view(b, 1).expand(b, t), torch.full((b, t), s)
    elif kind == "random":  # anything, outside [0, S] too, empty rows included
        lo = torch.randint(-5, s + 5, (b, t), generator=g)
        hi = torch.randint(-5, s + 5, (b, t), generator=g)
    else:  # "past": spans reaching past S and before 0
        lo, hi = torch.full((b, t), -100), torch.full((b, t), s + 100)
    return lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["right", "left", "random", "past"])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (9, -1)), (False, (4, 4))])
def test_key_spans(dtype, kind, causal, window):
    b, t, s = 3, 113, 130
    q, k, v = dense_case(b, 4, 1, t, s, 16, dtype, seed=len(kind))
    check_dense(q, k, v, causal, window, spans_of(kind, b, t, s, seed=b), dtype)


def test_key_spans_empty_rows():
    """Rows whose span is empty: out 0, lse -inf, no gradient."""
    b, t, s = 2, 17, 20
    q, k, v = dense_case(b, 2, 2, t, s, 8, F64, seed=3)
    lo = torch.full((b, t), 5, dtype=torch.int32)
    hi = torch.full((b, t), 5, dtype=torch.int32)
    hi[0, ::2] = 12
    check_dense(q, k, v, False, (-1, -1), (lo, hi), F64)
    out, lse = ops.attention_cpp_fwd(q, k, v, False, 0.3, -1, -1, lo, hi)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_long_window_nan_outside(dtype):
    """T = S = 1025 causal with a window of 100: every key block no query block reaches holds
    NaN/inf (the right-padding keys too): the results stay finite and exact."""
    b, t, d = 1, 1025, 32
    q, k, v = dense_case(b, 2, 1, t, t, d, dtype, seed=11)
    lo, hi = torch.zeros(b, t, dtype=torch.int32), torch.full((b, t), 1000, dtype=torch.int32)
    plant = torch.zeros(b, t, dtype=torch.bool)
    plant[:, 1000:] = True  # past every row's key_hi
    check_dense(q, k, v, True, (100, -1), (lo, hi), dtype, seed=5, plant=plant)


def test_planted_nan_left_window():
    """A window that leaves the first keys to no row: NaN/inf there change nothing."""
    b, t, s = 2, 300, 300
    q, k, v = dense_case(b, 4, 2, t, s, 16, F64, seed=13)
    plant = torch.zeros(b, s, dtype=torch.bool)
    plant[:, :37] = True  # below every row's key_lo
    lo = torch.full((b, t), 37, dtype=torch.int32)
    hi = torch.full((b, t), s, dtype=torch.int32)
    check_dense(q, k, v, True, (50, -1), (lo, hi), F64, plant=plant)


def test_bad_span_arguments():
    q, k, v = dense_case(1, 2, 1, 5, 6, 8, F32, seed=1)
    lo = torch.zeros(1, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="key_lo and key_hi"):
        ops.attention_cpp_fwd(q, k, v, True, 1.0, -1, -1, lo, None)
    with pytest.raises(TypeError, match="key_hi"):
        ops.attention_cpp_fwd(q, k, v, True, 1.0, -1, -1, lo, lo.long())
    with pytest.raises(ValueError, match="key_lo"):
        ops.attention_cpp_fwd(q, k, v, True, 1.0, -1, -1, lo[:, :3], lo)
    with pytest.raises(ValueError, match="window_left"):
        ops.attention_cpp_fwd(q, k, v, True, 1.0, -2, -1, None, None)


# --- packed (varlen) attention -------------------------------------------------------------
def packed(lens_q, lens_k, h, hkv, d, dtype, seed):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = rand((int(cu_q[-1]), h, d), dtype, seed, 2.0)
    k = rand((int(cu_k[-1]), hkv, d), dtype, seed + 1)
    v = rand((int(cu_k[-1]), hkv, d), dtype, seed + 2)
    return q, k, v, cu_q, cu_k


def check_varlen(q, k, v, cu_q, cu_k, causal, window, dtype, seed=0, plant=None):
    scale = 0.37
    mq, mk = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())

    def fn(q_, k_, v_):
        kw = dict(causal=causal, window_size=window, scale=scale, return_lse=True)
        return ref_varlen(q_, k_, v_, cu_q, cu_k, mq, mk, **kw)

    gout = rand(q.shape, dtype, seed + 7)
    glse = rand((q.shape[1], q.shape[0]), F32, seed + 8)
    (out64, lse64), (dq64, dk64, dv64) = grads_of(fn, (q, k, v), gout, glse)
    if plant is not None:  # rows of k, v no query sees
        k, v = k.clone(), v.clone()
        k[plant] = float("nan")
        v[plant] = float("inf")
    args = (cu_q, cu_k, mq, mk, causal, scale, window[0], window[1])
    out, lse = ops.attention_varlen_cpp_fwd(q, k, v, *args)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (q.shape[1], q.shape[0])
    close(out, out64, dtype, "out")
    close(lse, lse64, dtype, "lse")
    dq, dk, dv = ops.attention_varlen_cpp_bwd(gout, q, k, v, out, lse, glse, *args)
    keep = ~plant if plant is not None else torch.ones(k.shape[0], dtype=torch.bool)
    close(dq, dq64, dtype, "dq")
    close(dk[keep], dk64[keep], dtype, "dk")
    close(dv[keep], dv64[keep], dtype, "dv")
    if plant is not None:
        assert (dk[plant] == 0).all() and (dv[plant] == 0).all()


PACKS = {
    "mixed": ([1, 17, 0, 113, 300], [1, 17, 0, 113, 300]),
    "t_ne_s": ([5, 0, 113, 40], [17, 3, 100, 0]),
    "zeros": ([0, 0, 9, 0], [0, 4, 9, 0]),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("window", [(-1, -1), (0, 0), (7, -1), (-1, 3), (20, 5)], ids=str)
@pytest.mark.parametrize("pack", list(PACKS))
def test_varlen(dtype, causal, window, pack):
    q, k, v, cu_q, cu_k = packed(*PACKS[pack], 4, 2, 16, dtype, seed=len(pack))
    check_varlen(q, k, v, cu_q, cu_k, causal, window, dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_varlen_long_and_huge_empty_tail(dtype):
    """One ~1025-long sequence among short ones, then 2000 zero-length sequences; GQA."""
    lens = [1025, 3, 260] + [0] * 2000
    q, k, v, cu_q, cu_k = packed(lens, lens, 4, 1, 32, dtype, seed=21)
    check_varlen(q, k, v, cu_q, cu_k, True, (-1, -1), dtype)


def test_varlen_window_nan_outside():
    """A window leaves the first keys of every sequence to no query: NaN/inf there (and
    in the keys of a sequence without queries) reach no result."""
    lens_q, lens_k = [50, 0, 130], [80, 20, 160]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 2, 2, 16, F64, seed=3)
    plant = torch.zeros(k.shape[0], dtype=torch.bool)
    # causal, left = 10: query i of a (T, S) sequence sees from i + S - T - 10 on
    plant[0 : 80 - 50 - 10] = True
    plant[80:100] = True
    plant[100 : 100 + 160 - 130 - 10] = True
    check_varlen(q, k, v, cu_q, cu_k, True, (10, -1), F64, plant=plant)


def test_varlen_low_precision_matches_float32(monkeypatch):
    monkeypatch.setenv("GENKERN_ATTN_LOWP", "0")  # the widening path; the matrix path: tests/test_attention_lowp.py
    q, k, v, cu_q, cu_k = packed([7, 30], [7, 30], 2, 1, 16, F32, seed=4)
    args = (cu_q, cu_k, 30, 30, True, 0.25, -1, -1)
    for dt in (torch.float16, torch.bfloat16):
        out, lse = ops.attention_varlen_cpp_fwd(q.to(dt), k.to(dt), v.to(dt), *args)
        want, want_lse = ops.attention_varlen_cpp_fwd(q.to(dt).float(), k.to(dt).float(), v.to(dt).float(), *args)
        assert out.dtype == dt and torch.equal(out, want.to(dt)) and torch.equal(lse, want_lse)


def test_varlen_bad_arguments():
    q, k, v, cu_q, cu_k = packed([3, 4], [3, 4], 2, 1, 8, F32, seed=1)
    f = ops.attention_varlen_cpp_fwd
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        f(q, k, v, cu_q.long(), cu_k, 4, 4, True, 1.0, -1, -1)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        f(q, k, v, cu_q, torch.tensor([0, 5, 7], dtype=torch.int32), 4, 4, True, 1.0, -1, -1)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        f(q, k, v, cu_q, torch.tensor([0, 3, 9], dtype=torch.int32), 9, 9, True, 1.0, -1, -1)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        f(q, k, v, cu_q, cu_k, 3, 4, True, 1.0, -1, -1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        f(q, k, v, cu_q, torch.tensor([0, 7], dtype=torch.int32), 4, 7, True, 1.0, -1, -1)
    with pytest.raises(ValueError, match="non-decreasing"):
        f(q, k, v, torch.tensor([0, 5, 3, 7], dtype=torch.int32), cu_k, 9, 9, True, 1.0, -1, -1)


# --- kv_decode: window_left and key_lo -----------------------------------------------------
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("left", [-1, 0, 5, 100])
@pytest.mark.parametrize("with_key_lo", [False, True], ids=["", "key_lo"])
@pytest.mark.parametrize("tnew,with_new", [(1, True), (3, False), (17, True)])
def test_kv_decode_window(dtype, left, with_key_lo, tnew, with_new):
    b, h, hkv, smax, d = 3, 4, 2, 1100, 16
    lens = torch.tensor([1000, 0, 37] if with_new else [1050, 3, 37], dtype=torch.int32)
    q = rand((b, h, tnew, d), dtype, 1, 2.0)
    kc = rand((b, hkv, smax, d), dtype, 2)
    vc = rand((b, hkv, smax, d), dtype, 3)
    kn = rand((b, hkv, tnew, d), dtype, 4) if with_new else None
    vn = rand((b, hkv, tnew, d), dtype, 5) if with_new else None
    key_lo = torch.tensor([400, 0, 40], dtype=torch.int32) if with_key_lo else None
    n = lens + (tnew if with_new else 0)
    first = n - tnew - max(left, 0) if left >= 0 else torch.zeros_like(n)
    if key_lo is not None:
        first = torch.maximum(first, key_lo)
    k_ref, v_ref = kc.to(F64), vc.to(F64)
    want = ref_kv_decode(
        q.to(F64),
        k_ref,
        v_ref,
        lens,
        None if kn is None else kn.to(F64),
        None if vn is None else vn.to(F64),
        0.3,
        window_size=(left, -1),
        key_lo=key_lo,
    )
    for r in range(b):  # positions before every query's first one, and stale ones, hold garbage
        f = max(int(first[r]), 0)
        kc[r, :, :f] = float("nan")
        vc[r, :, :f] = float("inf")
        kc[r, :, int(n[r]) :] = float("nan")
        vc[r, :, int(n[r]) :] = float("nan")
    out = ops.kv_decode_cpp(q, kc, vc, lens, kn, vn, 0.3, left, key_lo)
    close(out, want, dtype, "out")


def test_kv_decode_bad_key_lo():
    q = rand((2, 2, 1, 8), F32, 1)
    kc, vc = rand((2, 1, 10, 8), F32, 2), rand((2, 1, 10, 8), F32, 3)
    lens = torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="key_lo"):
        ops.kv_decode_cpp(q, kc, vc, lens, None, None, 1.0, -1, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="key_lo"):
        ops.kv_decode_cpp(q, kc, vc, lens, None, None, 1.0, -1, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="window_left"):
        ops.kv_decode_cpp(q, kc, vc, lens, None, None, 1.0, -3, None)


def test_varlen_strided_inputs():
    """q, k, v as slices of one fused (total, H + 2 Hkv, D) projection: strided rows, no copy."""
    lens = [9, 0, 40, 33]
    q0, k0, v0, cu_q, cu_k = packed(lens, lens, 4, 2, 16, F64, seed=8)
    qkv = torch.cat([q0, k0, v0], dim=1)  # (total, H + 2 Hkv, D)
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    assert not q.is_contiguous()
    check_varlen(q, k, v, cu_q, cu_k, True, (6, -1), F64)


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_varlen_backward_low_precision(dt, monkeypatch):
    """float16/bfloat16 are computed in float32: the same as the float32 kernel on the rounded inputs."""
    monkeypatch.setenv("GENKERN_ATTN_LOWP", "0")  # the widening path; the matrix path: tests/test_attention_lowp.py
    q, k, v, cu_q, cu_k = packed([7, 0, 30], [9, 2, 30], 4, 2, 16, F32, seed=6)
    args = (cu_q, cu_k, 30, 30, True, 0.25, 4, -1)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    out, lse = ops.attention_varlen_cpp_fwd(q, k, v, *args)
    gout = rand(q.shape, dt, 3)
    got = ops.attention_varlen_cpp_bwd(gout, q, k, v, out, lse, None, *args)
    want = ops.attention_varlen_cpp_bwd(gout.float(), q.float(), k.float(), v.float(), out.float(), lse, None, *args)
    for g, w in zip(got, want):
        assert g.dtype == dt and torch.equal(g, w.to(dt))
