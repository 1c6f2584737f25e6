"""The Triton attention ops with sliding windows, per-row key spans and packed (varlen) sequences, and the
Triton decode op with a window and key_lo, against the float64 references.

Without a GPU they run under the Triton interpreter on CPU tensors (float32, and one float16 case per op
under the rule of DESIGN.md: error vs float64 at most 2x the plain-PyTorch error in the same dtype plus a
small floor). The loss backpropagated is sum(out * grad_out) + sum(lse * grad_lse) over the rows that see
a key. Sizes are kept small: the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch

import utils
from genkern.reference.attention import attention as reference
from genkern.reference.attention_varlen import attention_varlen as reference_varlen
from genkern.reference.kv_decode import attention_with_kvcache as reference_decode
from utils import assert_close_rule

pytest.importorskip("triton")

DEVICE = utils.impl_device("triton")
OPS = torch.ops.genkern
F16 = torch.float16
I32 = torch.int32


def _grads(fn, q, k, v, grad_out, grad_lse):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) by autograd; rows with lse = -inf take no grad_lse."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * grad_out.double()).sum()
    seen = torch.isfinite(lse)
    loss = loss + (lse.double() * grad_lse.double())[seen].sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _compare(got, fn, q, k, v, grad_out, grad_lse):
    """got (out, lse, dq, dk, dv) against fn in float64 and in q's dtype, and finite gradients."""
    truth = _grads(fn, *utils.to64(q, k, v, grad_out), grad_lse)
    same = _grads(fn, q, k, v, grad_out, grad_lse)
    for name, g, t, s, like in zip(("out", "lse", "dq", "dk", "dv"), got, truth, same, (q, got[1], q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert_close_rule(g, t, s.to(g.dtype), name=name)
    for name, g in zip(("dq", "dk", "dv"), got[2:]):
        assert bool(torch.isfinite(g).all()), name


def _inputs(q_shape, kv_shape, lse_shape, dtype, seed):
    q = utils.randn(q_shape, dtype, DEVICE, seed=seed)
    k, v = (utils.randn(kv_shape, dtype, DEVICE, seed=seed + i) for i in (1, 2))
    grad_out = utils.randn(q_shape, dtype, DEVICE, seed=seed + 3)
    return q, k, v, grad_out, utils.randn(lse_shape, torch.float32, DEVICE, seed=seed + 4)


# --- dense: windows and key spans ---------------------------------------------------------------------


def _spans(kind, b, t, s, seed):
    """(key_lo, key_hi) int32 (B, T) of a padding pattern, or None."""
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, s + 1, (b, 1), generator=g)
    lens[0] = s  # one row unpadded
    zero, full = torch.zeros(b, t, dtype=torch.long), torch.full((b, t), s)
    if kind == "right":  # keys [0, len_b)
        lo, hi = zero, lens.expand(b, t)
    elif kind == "left":  # keys [S - len_b, S)
        lo, hi = (s - lens).expand(b, t), full
    else:  # "ragged": spans that leave the range [0, S] (clamped) and rows that see nothing (lo >= hi)
        lo = torch.randint(-3, s, (b, t), generator=g)
        hi = lo + torch.randint(-2, s + 4, (b, t), generator=g)
    return lo.to(I32).to(DEVICE), hi.to(I32).to(DEVICE)


# (B, H, Hkv, T, S, D, causal, window, spans): T, S in {1, 17, 113}, T != S both ways, GQA and MQA.
DENSE = [
    (1, 2, 1, 17, 17, 16, True, (4, -1), None),
    (1, 2, 2, 17, 113, 16, False, (-1, 5), None),
    (1, 4, 2, 113, 17, 16, False, (3, 7), None),
    (1, 2, 1, 113, 113, 16, True, (0, -1), None),
    (1, 2, 1, 17, 17, 64, False, (0, 0), None),
    (1, 2, 2, 1, 17, 16, True, (5, -1), None),
    (2, 2, 1, 17, 33, 16, True, (-1, -1), "right"),
    (2, 4, 2, 33, 17, 16, False, (-1, -1), "left"),
    (2, 2, 1, 40, 29, 16, True, (6, -1), "left"),
    (3, 2, 1, 23, 31, 16, False, (-1, -1), "ragged"),
    (2, 2, 2, 37, 37, 16, False, (9, 2), "ragged"),
]


def _dense_id(c):
    return "B{}H{}Hkv{}T{}S{}D{}-{}-w{}_{}-{}".format(*c[:6], "causal" if c[6] else "full", *c[7], c[8])


def _run_dense(case, dtype, seed):
    b, h, hkv, t, s, d, causal, window, kind = case
    q, k, v, grad_out, grad_lse = _inputs((b, h, t, d), (b, hkv, s, d), (b, h, t), dtype, seed)
    spans, scale = _spans(kind, b, t, s, seed), 1.0 / math.sqrt(d)
    lo, hi = spans if spans is not None else (None, None)
    out, lse = OPS.attention_triton_fwd(q, k, v, causal, scale, *window, lo, hi)
    grads = OPS.attention_triton_bwd(grad_out, q, k, v, out, lse, grad_lse, causal, scale, *window, lo, hi)

    def fn(q, k, v):
        return reference(q, k, v, causal, scale, True, window_size=window, key_spans=spans)

    _compare((out, lse, *grads), fn, q, k, v, grad_out, grad_lse)
    return q, (out, lse, *grads), spans


@pytest.mark.parametrize("case", DENSE, ids=_dense_id)
def test_dense_windows_and_spans(case):
    _run_dense(case, torch.float32, seed=sum(case[:6]))


def test_dense_float16():
    _run_dense((2, 4, 2, 33, 29, 64, True, (7, -1), "right"), F16, seed=3)


def test_dense_empty_rows_and_unseen_keys():
    # rows whose span is empty: out 0, lse -inf, dq 0; keys no row sees: dk = dv = 0, and their inf/NaN in k
    # reaches nothing
    b, h, t, s, d = 2, 2, 21, 30, 16
    q, k, v, grad_out, grad_lse = _inputs((b, h, t, d), (b, 1, s, d), (b, h, t), torch.float32, seed=5)
    lo = torch.full((b, t), 4, dtype=I32)
    hi = torch.full((b, t), 19, dtype=I32)
    hi[:, ::3] = 2  # empty rows
    lo[1, 1], hi[1, 1] = 40, 50  # a span past S: empty
    scale = 0.3
    out, lse = OPS.attention_triton_fwd(q, k, v, False, scale, -1, -1, lo, hi)
    dq, dk, dv = OPS.attention_triton_bwd(grad_out, q, k, v, out, lse, grad_lse, False, scale, -1, -1, lo, hi)
    empty = hi.clamp(max=s) <= lo.clamp(min=0)  # (B, T)
    assert bool((out.transpose(1, 2)[empty] == 0).all()) and bool((dq.transpose(1, 2)[empty] == 0).all())
    assert bool((lse.transpose(1, 2)[empty] == float("-inf")).all())
    assert bool(torch.isfinite(lse.transpose(1, 2)[~empty]).all())
    unseen = torch.ones(s, dtype=torch.bool)
    unseen[4:19] = False
    assert not bool(dk[:, :, unseen].any()) and not bool(dv[:, :, unseen].any())
    k2 = k.clone()
    k2[:, :, 25] = float("nan")
    out2, lse2 = OPS.attention_triton_fwd(q, k2, v, False, scale, -1, -1, lo, hi)
    grads2 = OPS.attention_triton_bwd(grad_out, q, k2, v, out2, lse2, grad_lse, False, scale, -1, -1, lo, hi)
    for x, y in zip((out2, lse2, *grads2), (out, lse, dq, dk, dv)):
        torch.testing.assert_close(x[:, :, :25], y[:, :, :25], rtol=0, atol=0, equal_nan=True)
        assert bool(torch.isfinite(x[..., :25, :] if x.dim() == 4 else x.nan_to_num(0, 0, 0)).all())


# --- packed (varlen) -----------------------------------------------------------------------------------


def _varlen(direction):
    """torch.ops.genkern.attention_varlen_triton_<direction>; its launcher itself while no op module has
    registered it yet (genkern.triton.bind("attention_varlen") runs when the public op is registered)."""
    name = f"attention_varlen_triton_{direction}"
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"genkern::{name}", DEVICE.type.upper()):
        return getattr(OPS, name)
    from genkern.triton import attention_varlen

    return getattr(attention_varlen, {"fwd": "attention_varlen_forward", "bwd": "attention_varlen_backward"}[direction])


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=I32, device=DEVICE)


# (T_b, S_b, H, Hkv, D, causal, window): zero-length sequences, T_b != S_b both ways, 1, 17, 113.
VARLEN = [
    ((17, 0, 40, 1), (17, 5, 0, 33), 4, 2, 16, True, (-1, -1)),
    ((17, 0, 40, 1), (20, 5, 0, 33), 2, 1, 16, False, (-1, -1)),
    ((113, 3, 17), (113, 1, 30), 2, 2, 16, True, (9, -1)),
    ((5, 17, 1), (17, 9, 1), 4, 1, 64, False, (3, 4)),
    ((0, 23, 19), (7, 23, 0), 2, 1, 16, False, (-1, 0)),
    ((31, 12), (31, 20), 2, 2, 16, True, (0, -1)),
]


def _varlen_id(c):
    return "T{}-S{}-H{}Hkv{}D{}-{}-w{}_{}".format(
        "_".join(map(str, c[0])), "_".join(map(str, c[1])), *c[2:5], "causal" if c[5] else "full", *c[6]
    )


def _run_varlen(case, dtype, seed):
    lq, lk, h, hkv, d, causal, window = case
    cq, ck, mq, mk = _cu(lq), _cu(lk), max(lq), max(lk)
    q, k, v, grad_out, grad_lse = _inputs((sum(lq), h, d), (sum(lk), hkv, d), (h, sum(lq)), dtype, seed)
    scale = 1.0 / math.sqrt(d)
    out, lse = _varlen("fwd")(q, k, v, cq, ck, mq, mk, causal, scale, *window)
    grads = _varlen("bwd")(grad_out, q, k, v, out, lse, grad_lse, cq, ck, mq, mk, causal, scale, *window)

    def fn(q, k, v):
        return reference_varlen(
            q, k, v, cq, ck, mq, mk, causal=causal, window_size=window, scale=scale, return_lse=True
        )

    _compare((out, lse, *grads), fn, q, k, v, grad_out, grad_lse)


@pytest.mark.parametrize("case", VARLEN, ids=_varlen_id)
def test_varlen_matches_reference(case):
    _run_varlen(case, torch.float32, seed=sum(case[0]) + sum(case[1]))


def test_varlen_float16():
    _run_varlen(((29, 0, 17), (40, 3, 17), 4, 2, 64, True, (6, -1)), F16, seed=9)


def test_varlen_equals_dense_per_sequence():
    # a pack is its sequences: each one's results equal the dense op on it alone (the same tiles: bitwise)
    lq, lk, h, d = (19, 7), (23, 30), 2, 16
    q, k, v, grad_out, grad_lse = _inputs((sum(lq), h, d), (sum(lk), 1, d), (h, sum(lq)), torch.float32, seed=2)
    cq, ck = _cu(lq), _cu(lk)
    out, lse = _varlen("fwd")(q, k, v, cq, ck, 23, 30, True, 0.25, 5, -1)
    dq, dk, dv = _varlen("bwd")(grad_out, q, k, v, out, lse, grad_lse, cq, ck, 23, 30, True, 0.25, 5, -1)
    for b in range(2):
        rq, rk = slice(cq[b].item(), cq[b + 1].item()), slice(ck[b].item(), ck[b + 1].item())
        qb, kb, vb, gb = (x.transpose(0, 1).unsqueeze(0) for x in (q[rq], k[rk], v[rk], grad_out[rq]))
        ob, lb = OPS.attention_triton_fwd(qb, kb, vb, True, 0.25, 5, -1, None, None)
        gl = grad_lse[:, rq].unsqueeze(0).contiguous()
        dqb, dkb, dvb = OPS.attention_triton_bwd(gb, qb, kb, vb, ob, lb, gl, True, 0.25, 5, -1, None, None)
        for x, y in ((out[rq], ob), (dq[rq], dqb), (dk[rk], dkb), (dv[rk], dvb)):
            torch.testing.assert_close(x, y[0].transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(lse[:, rq], lb[0], rtol=0, atol=0)


# --- decode: window_left and key_lo ---------------------------------------------------------------------


# (Tnew, lengths L_b, window_left, key_lo or None, with new keys)
DECODE = [
    (1, (50, 89), 5, None, True),
    (3, (50, 80), 0, None, True),
    (1, (60, 90), -1, (7, 61), False),
    (3, (50, 80), 20, (7, 79), True),
    (2, (40, 9), 11, (45, 0), True),  # row 0: key_lo past every position (zeros)
]


@pytest.mark.parametrize("dtype", (torch.float32, F16), ids=str)
@pytest.mark.parametrize("case", DECODE, ids=lambda c: f"T{c[0]}-L{c[1]}-w{c[2]}-lo{c[3]}-new{c[4]}")
def test_decode_window_and_key_lo(case, dtype):
    tnew, lens, left, key_lo, new = case
    b, h, hkv, smax, d = 2, 4, 2, 93, 16
    q = utils.randn((b, h, tnew, d), dtype, DEVICE, seed=1)
    kc, vc = (utils.randn((b, hkv, smax, d), dtype, DEVICE, seed=s) for s in (2, 3))
    kn, vn = (utils.randn((b, hkv, tnew, d), dtype, DEVICE, seed=s) if new else None for s in (4, 5))
    lens = torch.tensor(lens, dtype=I32, device=DEVICE)
    key_lo = None if key_lo is None else torch.tensor(key_lo, dtype=I32, device=DEVICE)
    scale = 1.0 / math.sqrt(d)
    got = OPS.kv_decode_triton(q, kc.clone(), vc.clone(), lens, kn, vn, scale, left, key_lo)
    args64 = (
        [None if x is None else x.double() for x in (q, kc, vc)]
        + [lens]
        + [None if x is None else x.double() for x in (kn, vn)]
    )
    truth = reference_decode(*args64, scale, window_size=(left, -1), key_lo=key_lo)
    same = reference_decode(q, kc.clone(), vc.clone(), lens, kn, vn, scale, window_size=(left, -1), key_lo=key_lo)
    assert_close_rule(got, truth, same)
    if key_lo is not None and int(key_lo[0]) >= int(lens[0]) + (tnew if new else 0):
        assert not bool(got[0].any())
