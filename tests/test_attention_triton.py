"""The Triton FlashAttention-2 launchers (genkern.triton.attention) against the float64 reference.

Without a GPU they run under the Triton interpreter on CPU tensors (float32, float16; sizes kept
small, the interpreter is slow). "Correct" is the rule of DESIGN.md (utils.assert_close_rule):
error vs float64 at most 2x the error of plain PyTorch in the same dtype plus a small floor, for
out, lse, dq, dk, dv. The loss backpropagated is sum(out * grad_out) + sum(lse * grad_lse) over
the rows that see a key (grad_lse None: the first term only).
"""

from __future__ import annotations

import math

import pytest
import torch

import utils
from genkern.reference.attention import attention as reference
from utils import assert_close_rule

pytest.importorskip("triton")
from genkern.triton import attention as tri  # noqa: E402  (after conftest sets TRITON_INTERPRET)

DEVICE = utils.impl_device("triton")
DTYPES = utils.impl_dtypes("triton")

# (B, H, Hkv, T, S, D): T, S in {1, 17, 113} and T != S both ways; GQA (4 -> 2), MQA (-> 1).
SHAPES = [
    (1, 2, 2, 1, 1, 16),
    (1, 4, 2, 1, 17, 40),  # one new token over a cache
    (2, 2, 2, 17, 17, 16),
    (1, 4, 2, 17, 113, 40),  # T < S
    (1, 4, 1, 113, 17, 64),  # T > S: causal rows 0..95 see no key
    (1, 2, 1, 113, 113, 64),
]


def _sid(shape):
    return "B{}H{}Hkv{}T{}S{}D{}".format(*shape)


def _inputs(shape, dtype, seed):
    b, h, hkv, t, s, d = shape
    q = utils.randn((b, h, t, d), dtype, DEVICE, seed=seed)
    k = utils.randn((b, hkv, s, d), dtype, DEVICE, seed=seed + 1)
    v = utils.randn((b, hkv, s, d), dtype, DEVICE, seed=seed + 2)
    grad_out = utils.randn((b, h, t, d), dtype, DEVICE, seed=seed + 3)
    grad_lse = utils.randn((b, h, t), torch.float32, DEVICE, seed=seed + 4)
    return q, k, v, grad_out, grad_lse


def _plain(q, k, v, grad_out, grad_lse, causal, scale):
    """(out, lse, dq, dk, dv) of the reference by autograd, in q's dtype (float64 for the truth)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference(q, k, v, causal=causal, scale=scale, return_lse=True)
    loss = (out.double() * grad_out.double()).sum()
    if grad_lse is not None:
        seen = torch.isfinite(lse)  # -inf rows: no key, no gradient (the kernels' contract)
        loss = loss + (lse.double() * grad_lse.double())[seen].sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def check(q, k, v, grad_out, grad_lse, causal, scale=None):
    """Runs both launchers and checks all five results against the reference."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, lse = tri.attention_forward(q, k, v, causal, scale)
    dq, dk, dv = tri.attention_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale)
    got = (out, lse, dq, dk, dv)
    truth = _plain(*utils.to64(q, k, v, grad_out), grad_lse, causal, scale)
    same = _plain(q, k, v, grad_out, grad_lse, causal, scale)
    for name, g, t, s, like in zip(("out", "lse", "dq", "dk", "dv"), got, truth, same, (q, lse, q, k, v)):
        assert g.shape == like.shape and g.dtype == like.dtype, name
        assert_close_rule(g, t, s.to(g.dtype), name=name)
    for name, g in zip(("dq", "dk", "dv"), (dq, dk, dv)):
        assert bool(torch.isfinite(g).all()), name
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
def test_matches_reference(shape, causal, dtype):
    q, k, v, grad_out, grad_lse = _inputs(shape, dtype, seed=sum(shape))
    # grad_lse given or not, alternating over the shapes (both paths run in every dtype)
    check(q, k, v, grad_out, grad_lse if SHAPES.index(shape) % 2 else None, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_that_see_no_key(dtype):
    # causal, T > S: queries 0..T-S-1 see no key; out 0, lse -inf, dq 0, no effect on dk, dv
    q, k, v, grad_out, grad_lse = _inputs((1, 2, 1, 40, 7, 24), dtype, seed=7)
    out, lse, dq, dk, dv = check(q, k, v, grad_out, grad_lse, True)
    assert bool((out[:, :, :33] == 0).all()) and bool((dq[:, :, :33] == 0).all())
    assert bool((lse[:, :, :33] == float("-inf")).all()) and bool(torch.isfinite(lse[:, :, 33:]).all())
    # the unseen rows' q and grad_out do not reach dk, dv
    q2, go2 = q.clone(), grad_out.clone()
    q2[:, :, :33], go2[:, :, :33] = 1e3, -7.0
    scale = 1.0 / math.sqrt(24)
    dk1, dv1 = tri.attention_backward(grad_out, q, k, v, out, lse, grad_lse, True, scale)[1:]
    dk2, dv2 = tri.attention_backward(go2, q2, k, v, out, lse, grad_lse, True, scale)[1:]
    torch.testing.assert_close(dk2, dk1, rtol=0, atol=0)
    torch.testing.assert_close(dv2, dv1, rtol=0, atol=0)


def _strided(t, layout):
    """The same values in another layout: "bthd" a (B, T, H, D) buffer seen as (B, H, T, D);
    "pad" rows of D + 4 elements (a stride that is not a multiple of 8: the launcher copies)."""
    if layout == "bthd":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] + 4, dtype=t.dtype, device=t.device)
    buf[..., : t.shape[-1]] = t
    return buf[..., : t.shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["bthd", "pad"])
def test_non_contiguous_inputs(layout, dtype):
    q, k, v, grad_out, grad_lse = _inputs((2, 4, 2, 19, 23, 40), dtype, seed=11)
    ref = tri.attention_forward(q, k, v, True, 0.3)
    ref_grads = tri.attention_backward(grad_out, q, k, v, *ref, grad_lse, True, 0.3)
    qs, ks, vs, gs = (_strided(t, layout) for t in (q, k, v, grad_out))
    assert not any(t.is_contiguous() for t in (qs, ks, vs, gs))
    got = tri.attention_forward(qs, ks, vs, True, 0.3)
    got_grads = tri.attention_backward(gs, qs, ks, vs, _strided(got[0], layout), got[1], grad_lse, True, 0.3)
    for a, b in zip(got + got_grads, ref + ref_grads):  # same math, same order: bitwise equal
        assert a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_kv_packed_views_and_expanded_grad():
    # k, v as views into one (B, S, 2, Hkv, D) buffer; grad_out a stride-0 expand along T
    b, h, hkv, t, s, d = 1, 4, 2, 9, 21, 32
    kv = utils.randn((b, s, 2, hkv, d), torch.float32, DEVICE, seed=5)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q = utils.randn((b, h, t, d), torch.float32, DEVICE, seed=6)
    grad_out = utils.randn((b, h, 1, d), torch.float32, DEVICE, seed=8).expand(b, h, t, d)
    check(q, k, v, grad_out, None, False, scale=0.25)


def test_empty_and_keyless():
    q = torch.randn(2, 2, 0, 16, device=DEVICE)
    k = torch.randn(2, 1, 5, 16, device=DEVICE)
    out, lse = tri.attention_forward(q, k, k, True, 0.25)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0)
    grads = tri.attention_backward(out, q, k, k, out, lse, None, True, 0.25)
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape] and not bool(grads[1].any())
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    k = torch.randn(1, 2, 0, 16, device=DEVICE)
    out, lse = tri.attention_forward(q, k, k, False, 0.25)
    assert not bool(out.any()) and bool((lse == float("-inf")).all())


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(d=12), "head dim"),
        (dict(d=264), "head dim"),
        (dict(d=36), "head dim"),
        (dict(hkv=3), "H % Hkv"),
        (dict(dtype=torch.float64), "float16, bfloat16 or float32"),
    ],
)
def test_bad_input(bad, match):
    d, hkv, dtype = bad.get("d", 16), bad.get("hkv", 2), bad.get("dtype", torch.float32)
    q = torch.randn(1, 4, 3, d, dtype=dtype, device=DEVICE)
    k = torch.randn(1, hkv, 3, d, dtype=dtype, device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        tri.attention_forward(q, k, k, True, 0.5)


def test_bad_backward_input():
    q = torch.randn(1, 2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="lse"):
        tri.attention_backward(q, q, q, q, q, torch.zeros(1, 2, 3, dtype=torch.float16, device=DEVICE), None, True, 0.5)
    with pytest.raises(ValueError, match="grad_out"):
        tri.attention_backward(q[:, :1], q, q, q, q, torch.zeros(1, 2, 3, device=DEVICE), None, True, 0.5)


# --- on a GPU: the autotuned, compiled kernels at model sizes -------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [16, 40, 64, 96, 128, 200, 256])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_head_dims(d, causal, dtype):
    q, k, v, grad_out, grad_lse = _inputs((2, 8, 2, 300, 517, d), dtype, seed=d)
    check(q, k, v, grad_out, grad_lse, causal)
    q, k, v, grad_out, grad_lse = _inputs((1, 4, 4, 517, 300, d), dtype, seed=d + 1)
    check(q, k, v, grad_out, None, causal)
