"""genkern.flash_attention, genkern.functional.scaled_dot_product_attention and
genkern.nn.CausalSelfAttention against the float64 reference.

"Correct" is the rule of DESIGN.md (utils.assert_close_rule): the error vs the
float64 reference (genkern.reference.attention on float64 copies) is at most 2x the
error of the plain-PyTorch computation in the same dtype (the reference on the same
inputs), plus a small floor; float32/float64 results must also be within
utils.ABS_TOL of the float64 reference. Gradients are those of a random grad_out
(and grad_lse) through torch.autograd.grad.

impl="torch" is the reference itself, so it is never held to that rule (it would
compare the reference with itself). The reference is held instead to `loop_attention`,
the same math written out independently in float64 one query at a time, within
utils.ABS_TOL; the torch impl's own tests check what the reference does not already
assume: that it is the reference (dispatch), the input checks, and the module's wiring.

Low-precision floors (utils.FLOOR, relative to max(1, max |reference|)): 1e-3 for
float16 and 8e-3 for bfloat16, i.e. about one unit in the last place at magnitude 1
(2^-10 and 2^-7). A kernel that computes in float32 and rounds its result once is off
by half of that; the other half covers the backward reading the rounded out.
"""

from __future__ import annotations

import math
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F

import genkern
import utils
from genkern import _dispatch
from genkern.ops import attention as attention_op
from genkern.reference import attention as reference
from utils import assert_close_rule

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
B = 2
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # (H, Hkv)


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_qkv(t, s, d, heads="gqa", dtype=F32, device="cpu", *, b=B, seed=0):
    """Random q (b, H, t, d), k and v (b, Hkv, s, d); q is scaled up so softmax rows are
    peaked and the running max of the kernels changes between key blocks."""
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    q = utils.randn((b, h, t, d), dtype, device, seed=seed, scale=2.0)
    k = utils.randn((b, hkv, s, d), dtype, device, seed=seed + 1)
    v = utils.randn((b, hkv, s, d), dtype, device, seed=seed + 2)
    return q, k, v


def check(impl, q, k, v, *, causal, scale=None, grads=True, lse_grad=False, out_grad=True, seed=0, grad_out=None):
    """Runs the op (forward and, with grads, backward) and checks out, lse, dq, dk, dv
    against the float64 reference. Returns the op's (out, lse, grads)."""
    b, h, t, d = q.shape
    s = k.shape[2]
    leaves = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    out, lse = genkern.flash_attention(*leaves, causal=causal, scale=scale, return_lse=True, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device and out.is_contiguous()
    assert lse.shape == (b, h, t) and lse.dtype == F32

    leaves64 = [x.detach().double().requires_grad_(grads) for x in (q, k, v)]
    leaves_same = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    out64, lse64 = reference.attention(*leaves64, causal, scale, True)
    out_same, lse_same = reference.attention(*leaves_same, causal, scale, True)
    assert_close_rule(out, out64, out_same, name="out")
    # lse is float32 whatever q's dtype: from float16/bfloat16 inputs only the rule applies.
    assert_close_rule(lse, lse64, lse_same, name="lse", absolute=q.dtype in (F32, F64))

    empty = t - s if causal and t > s else 0  # rows that see no key
    if empty:
        assert bool((out[:, :, :empty] == 0).all()), "a query that sees no key must get out = 0"
        assert bool((lse[:, :, :empty] == -math.inf).all()), "a query that sees no key must get lse = -inf"
    if not grads:
        return out, lse, None

    g_out = utils.randn(out.shape, q.dtype, q.device, seed=seed + 10) if grad_out is None else grad_out
    g_lse = utils.randn(lse.shape, F32, q.device, seed=seed + 11)
    pick = lambda o, lse_: ([o] if out_grad else []) + ([lse_] if lse_grad else [])  # noqa: E731
    upstream = pick(g_out, g_lse)
    # Without out in the loss, v does not reach lse: its gradient is zero (None from the
    # torch impl and the reference, whose graphs do not reach v).
    got = torch.autograd.grad(pick(out, lse), leaves, upstream, allow_unused=True, materialize_grads=True)
    want64 = torch.autograd.grad(
        pick(out64, lse64),
        leaves64,
        pick(g_out.double(), g_lse),  # lse64 is float32
        allow_unused=True,
        materialize_grads=True,
    )
    want_same = torch.autograd.grad(
        pick(out_same, lse_same), leaves_same, upstream, allow_unused=True, materialize_grads=True
    )
    extra = {"dk": _one_key_dk_allowance(q, v, g_out, causal, scale)} if s == 1 and out_grad else {}
    for name, g, w64, ws, x in zip(("dq", "dk", "dv"), got, want64, want_same, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        assert_close_rule(g, w64, ws, name=name, extra_atol=extra.get(name))
    if empty:
        assert bool((got[0][:, :, :empty] == 0).all()), "dq of a query that sees no key must be 0"
    return out, lse, got


def _one_key_dk_allowance(q, v, g_out, causal, scale):
    """The rounding allowed in dk when S == 1.

    With one key every query's weight on it is 1 and O_i = v, so the out part of dk,
    scale * sum_i (dO_i . v - dO_i . O_i) q_i, is 0 exactly: the reference computes 0,
    while a kernel using delta_i = rowsum(dO_i * O_i) (FlashAttention-2) gets the
    rounding of that cancellation. A floor relative to max |dk| = 0 cannot hold it; this
    is the floor relative to the magnitude of the cancelling terms instead.
    """
    b, h, t, d = q.shape
    hkv = v.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, v64, g64 = (x.detach().double().abs().cpu() for x in (q, v, g_out))
    sees = reference.causal_mask(t, 1)[:, 0] if causal else torch.ones(t, dtype=torch.bool)  # (T,)
    dots = (g64 * v64.repeat_interleave(h // hkv, dim=1)).sum(-1, keepdim=True)  # (B, H, T, 1)
    terms = 2 * dots * q64 * sees.view(t, 1)  # (B, H, T, D)
    mag = scale * terms.reshape(b, hkv, h // hkv, t, d).sum(dim=(2, 3)).unsqueeze(2)  # (B, Hkv, 1, D)
    return utils.FLOOR[F64 if q.dtype == F64 else F32] * mag


# --- values and gradients ---------------------------------------------------------------

# (T, S, D, heads): every T and S of {1, 17, 113, 256, 1025} square and against other
# lengths both ways (T > S with causal leaves the first T - S queries without a key),
# every D of {16, 40, 64, 128}, grouped-query, multi-query and multi-head.
CASES = [
    (1, 1, 64, "gqa"),
    (17, 17, 40, "mqa"),
    (113, 113, 16, "gqa"),
    (256, 256, 128, "mqa"),
    (1025, 1025, 64, "gqa"),
    (1, 1025, 128, "mqa"),
    (17, 256, 16, "gqa"),
    (113, 1025, 40, "mqa"),
    (256, 17, 64, "gqa"),
    (17, 1, 128, "mha"),
    (113, 1, 40, "gqa"),
    (1025, 113, 16, "mqa"),
    (256, 113, 40, "mha"),
]


def _case_id(t, s, d, heads):
    return f"T{t}-S{s}-D{d}-{heads}"


def _main_params():
    out = []
    for t, s, d, heads in CASES:
        for impl, dtype in (("cpp", F32), ("cpp", F64)):
            out.append(pytest.param(impl, dtype, t, s, d, heads, id=f"{impl}-{_dt(dtype)}-{_case_id(t, s, d, heads)}"))
    return out


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("impl,dtype,t,s,d,heads", _main_params())
def test_values_and_grads(impl, dtype, t, s, d, heads, causal):
    seed = _seed(t, s, d, heads, causal)
    q, k, v = make_qkv(t, s, d, heads, dtype, seed=seed)
    check(impl, q, k, v, causal=causal, seed=seed)


LOW_PRECISION_CASES = [
    (17, 17, 40, "gqa"),
    (113, 256, 128, "mqa"),
    (256, 113, 16, "gqa"),
    (1025, 1025, 64, "gqa"),
    (1, 113, 128, "mha"),
]


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("t,s,d,heads", LOW_PRECISION_CASES, ids=[_case_id(*c) for c in LOW_PRECISION_CASES])
@pytest.mark.parametrize("impl,dtype", [("cpp", F16), ("cpp", BF16)], ids=("cpp-float16", "cpp-bfloat16"))
def test_low_precision(impl, dtype, t, s, d, heads, causal):
    seed = _seed(t, s, d, heads, causal, "lp")
    q, k, v = make_qkv(t, s, d, heads, dtype, seed=seed)
    check(impl, q, k, v, causal=causal, seed=seed)


@pytest.mark.parametrize("scale", (0.05, 1.0, 3))
@pytest.mark.parametrize("impl,dtype", [("cpp", F32), ("cpp", F64)], ids=("cpp-float32", "cpp-float64"))
def test_scale(impl, dtype, scale):
    seed = _seed("scale", scale)
    q, k, v = make_qkv(40, 70, 32, "gqa", dtype, seed=seed)
    check(impl, q, k, v, causal=True, scale=scale, seed=seed)


LSE_CASES = [
    (17, 17, 40, "gqa", False),
    (17, 17, 40, "gqa", True),
    (1, 256, 64, "mqa", True),
    (113, 17, 16, "gqa", True),
    (100, 130, 64, "mqa", False),
]


@pytest.mark.parametrize("out_grad", (True, False), ids=("out_and_lse", "lse_only"))
@pytest.mark.parametrize(
    "t,s,d,heads,causal", LSE_CASES, ids=[_case_id(*c[:4]) + ("-causal" if c[4] else "-full") for c in LSE_CASES]
)
@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params(("cpp",), dtypes=(F32, F64, BF16)))
def test_lse_gradient(impl, dtype, t, s, d, heads, causal, out_grad):
    # The loss uses lse too (lse_only: only lse), so grad_lse reaches the backward.
    seed = _seed("lse", t, s, d, heads, causal)
    q, k, v = make_qkv(t, s, d, heads, dtype, seed=seed)
    check(impl, q, k, v, causal=causal, lse_grad=True, out_grad=out_grad, seed=seed)


def test_empty_rows_have_finite_zero_grads():
    # T > S, causal: queries 0..T-S-1 see no key. Their out is 0, lse -inf, dq 0, and
    # they add nothing to dk/dv (the grad_lse on those rows must not leak NaN in).
    utils.require_impl("cpp")
    q, k, v = make_qkv(40, 9, 16, "gqa", F32, seed=3)
    _, _, (dq, dk, dv) = check("cpp", q, k, v, causal=True, lse_grad=True, seed=3)
    assert all(bool(torch.isfinite(g).all()) for g in (dq, dk, dv))
    assert bool((dq[:, :, :31] == 0).all()) and bool((dq[:, :, 31:] != 0).any())


@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_empty_batch(impl):
    q, k, v = make_qkv(5, 7, 16, "gqa", F32, b=0)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out, lse = genkern.flash_attention(*leaves, return_lse=True, impl=impl)
    assert out.shape == (0, 4, 5, 16) and lse.shape == (0, 4, 5)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert [g.shape for g in grads] == [x.shape for x in leaves]


# --- the reference against a float64 formula written out per query ----------------------


def loop_attention(q, k, v, causal, scale=None):
    """out (B, H, T, D) and lse (B, H, T), float64, written out one query at a time and
    independently of genkern.reference: query i of head h reads KV head h // (H // Hkv);
    with causal it sees keys j = 0 .. i + S - T (the bottom-right rule), without it all S
    keys; softmax as exp / sum. A query that sees no key gets out 0 and lse -inf.
    Differentiable: autograd through it gives the float64 gradients."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    outs, lses = [], []
    for bi in range(b):
        for hi in range(h):
            c = hi // (h // hkv)
            for i in range(t):
                n = i + s - t + 1 if causal else s  # query i sees keys 0 .. n - 1
                if n <= 0:
                    outs.append(q.new_zeros(d))
                    lses.append(q.new_tensor(-math.inf))
                    continue
                x = (k[bi, c, :n] * q[bi, hi, i]).sum(-1) * scale  # (n,) scores
                m = x.max().detach()  # the shift changes no value: kept out of the gradient
                e = torch.exp(x - m)
                outs.append((e.unsqueeze(-1) * v[bi, c, :n]).sum(0) / e.sum())
                lses.append(m + torch.log(e.sum()))
    return torch.stack(outs).view(b, h, t, d), torch.stack(lses).view(b, h, t)


def assert_near(got, want64, name):
    """|got - want64| <= utils.ABS_TOL[got.dtype] * max(1, max |want64|) where want64 is
    finite, and the same value where it is not (lse -inf)."""
    got64 = got.detach().double()
    assert got64.shape == want64.shape, f"{name}: shape {tuple(got64.shape)} != {tuple(want64.shape)}"
    fin = torch.isfinite(want64)
    assert torch.equal(got64[~fin], want64[~fin]), f"{name}: {got64[~fin][:5].tolist()} where -inf is due"
    if not bool(fin.any()):
        return
    tol = utils.ABS_TOL[got.dtype] * max(1.0, want64[fin].abs().max().item())
    err = (got64[fin] - want64[fin]).abs().max().item()
    assert err <= tol, f"{name} ({got.dtype}): max error {err:.3e} > {tol:.3e}"


def check_reference(q, k, v, *, causal, scale=None, seed=0):
    """genkern.reference.attention against loop_attention: out, lse (float32 whatever q's
    dtype) and the gradients of a random grad_out and grad_lse, plus the empty rows."""
    t, s = q.shape[2], k.shape[2]
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = reference.attention(*leaves, causal, scale, True)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out64, lse64 = loop_attention(*leaves64, causal, scale)
    assert out.dtype == q.dtype and lse.dtype == F32
    assert_near(out, out64, "out")
    assert_near(lse, lse64, "lse")
    g_out = utils.randn(out.shape, q.dtype, seed=seed + 10)
    g_lse = utils.randn(lse.shape, F32, seed=seed + 11)
    got = torch.autograd.grad((out, lse), leaves, (g_out, g_lse))
    want = torch.autograd.grad((out64, lse64), leaves64, (g_out.double(), g_lse.double()))
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype
        assert_near(g, w, name)
    empty = t - s if causal and t > s else 0
    assert bool((out[:, :, :empty] == 0).all()) and bool((lse[:, :, :empty] == -math.inf).all())
    assert bool((got[0][:, :, :empty] == 0).all()), "dq of a query that sees no key must be 0"


# (T, S): one query, T < S, T = S, T > S (causal: the first T - S queries see no key), one key.
REF_SHAPES = [(1, 9), (5, 9), (9, 9), (9, 5), (4, 1)]


@pytest.mark.parametrize("heads", ("mha", "gqa", "mqa"))
@pytest.mark.parametrize("t,s", REF_SHAPES, ids=[f"T{t}-S{s}" for t, s in REF_SHAPES])
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("dtype", (F64, F32), ids=_dt)
def test_reference_matches_loop(dtype, causal, t, s, heads):
    seed = _seed("ref", t, s, heads, causal)
    check_reference(*make_qkv(t, s, 16, heads, dtype, seed=seed), causal=causal, seed=seed)


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("scale", (0.05, 1.0, 3))
def test_reference_scale(scale, causal):
    seed = _seed("ref-scale", scale)
    check_reference(*make_qkv(7, 11, 24, (6, 2), F64, seed=seed), causal=causal, scale=scale, seed=seed)


def test_reference_grouped_heads_read_their_kv_head():
    # Query head h reads KV head h // (H // Hkv): with KV head c's values all equal to c,
    # every output of query head h is exactly h // G.
    q, k, _ = make_qkv(5, 7, 16, (6, 3), F64, seed=7)
    v = torch.arange(3, dtype=F64).view(1, 3, 1, 1).expand(B, 3, 7, 16)
    out = reference.attention(q, k, v, causal=True)
    want = (torch.arange(6, dtype=F64) // 2).view(1, 6, 1, 1).expand(out.shape)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", (F16, BF16, F32, F64), ids=_dt)
def test_reference_empty_rows_in_every_dtype(dtype):
    # T > S, causal: out 0 and lse -inf (not NaN) on the first T - S rows, and gradients
    # that are finite everywhere and 0 in dq there, in low precision too.
    q, k, v = (x.requires_grad_() for x in make_qkv(9, 4, 16, "gqa", dtype, seed=8))
    out, lse = reference.attention(q, k, v, True, None, True)
    assert out.dtype == dtype and lse.dtype == F32
    assert bool((out[:, :, :5] == 0).all()) and bool((lse[:, :, :5] == -math.inf).all())
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[:, :, 5:]).all())
    grads = torch.autograd.grad((out, lse), (q, k, v), (torch.ones_like(out), torch.ones_like(lse)))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert bool((grads[0][:, :, :5] == 0).all()) and bool((grads[0][:, :, 5:] != 0).any())


@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("dtype", (F16, BF16, F32, F64), ids=_dt)
def test_torch_impl_is_the_reference(dtype, causal):
    # Dispatch: impl="torch" returns the reference's results bit for bit, out in q's
    # dtype and contiguous, lse float32, with the defaults causal=True, scale=1/sqrt(D).
    q, k, v = make_qkv(9, 5, 16, "gqa", dtype, seed=_seed("is-ref", causal))
    out, lse = genkern.flash_attention(q, k, v, causal=causal, return_lse=True, impl="torch")
    want, want_lse = reference.attention(q, k, v, causal, None, True)
    assert out.dtype == dtype and out.is_contiguous() and lse.dtype == F32 and lse.shape == q.shape[:3]
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    if causal:
        assert torch.equal(genkern.flash_attention(q, k, v, impl="torch"), want)


# --- layouts ------------------------------------------------------------------------------


def _layouts(q, k, v, layout):
    """Views with q's, k's and v's values in a non-contiguous layout."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if layout == "bthd":  # (B, T, H, D) storage, as a projection produces it
        return [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    if layout == "slices":  # every other key of a longer buffer; rows of a wider buffer
        kb = torch.zeros(b, hkv, 2 * s, d, dtype=k.dtype)
        kb[:, :, ::2] = k
        vb = torch.zeros(b, hkv, s, 3 * d, dtype=v.dtype)
        vb[..., d : 2 * d] = v
        qb = torch.zeros(b, 2 * h, t, d, dtype=q.dtype)
        qb[:, 1::2] = q
        return qb[:, 1::2], kb[:, :, ::2], vb[..., d : 2 * d]
    if layout == "d_strided":  # the head dim is not the unit stride
        return [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v)]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ("bthd", "slices", "d_strided"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params(("cpp",), dtypes=(F32, BF16)))
def test_noncontiguous(impl, dtype, causal, layout):
    seed = _seed("nc", layout, causal)
    q, k, v = make_qkv(70, 90, 24, "gqa", dtype, seed=seed)
    g_out = utils.randn(q.shape, dtype, seed=seed + 10)
    qn, kn, vn = _layouts(q, k, v, layout)
    assert not any(x.is_contiguous() for x in (qn, kn, vn))
    assert all(torch.equal(a, b) for a, b in ((q, qn), (k, kn), (v, vn)))
    g_out_n = g_out.transpose(0, 1).contiguous().transpose(0, 1)  # grad_out non-contiguous too
    assert not g_out_n.is_contiguous()
    res = check(impl, q, k, v, causal=causal, lse_grad=True, seed=seed, grad_out=g_out)
    res_n = check(impl, qn, kn, vn, causal=causal, lse_grad=True, seed=seed, grad_out=g_out_n)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), res[:2] + tuple(res[2]), res_n[:2] + tuple(res_n[2])):
        # Summation order may differ with the layout: float32 rounding, or one bfloat16 ulp.
        tol = dict(rtol=2**-7, atol=0) if a.dtype == BF16 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, a, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_kv_expanded_over_heads():
    # A stride-0 head dim: every KV head reads one buffer.
    utils.require_impl("cpp")
    q, k, v = make_qkv(33, 50, 16, "gqa", F32, seed=4)
    k, v = k[:, :1].expand(k.shape), v[:, :1].expand(v.shape)
    check("cpp", q, k, v, causal=True, lse_grad=True, seed=4)


# --- triton under the interpreter (slow: a few small cases) -------------------------------

TRITON_CASES = [
    pytest.param("triton", F32, 20, 33, 16, "gqa", True, True, id="triton-float32-T20-S33-D16-gqa-causal-grads"),
    pytest.param("triton", F16, 33, 20, 32, "mqa", True, False, id="triton-float16-T33-S20-D32-mqa-causal"),
    pytest.param("triton", F32, 17, 17, 24, "gqa", False, False, id="triton-float32-T17-S17-D24-gqa-full"),
]


@pytest.mark.parametrize("impl,dtype,t,s,d,heads,causal,grads", TRITON_CASES)
def test_triton(impl, dtype, t, s, d, heads, causal, grads):
    seed = _seed("triton", t, s, d, heads)
    q, k, v = make_qkv(t, s, d, heads, dtype, utils.impl_device(impl), seed=seed)
    check(impl, q, k, v, causal=causal, grads=grads, lse_grad=grads, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize(
    "t,s,d,heads",
    [(1025, 1025, 128, "gqa"), (113, 1025, 64, "mqa"), (1025, 113, 40, "gqa")],
    ids=("T1025-S1025-D128-gqa", "T113-S1025-D64-mqa", "T1025-S113-D40-gqa"),
)
@pytest.mark.parametrize("dtype", (F32, F16, BF16), ids=_dt)
def test_gpu_triton(dtype, t, s, d, heads, causal):
    utils.require_impl("triton")
    seed = _seed("gpu", t, s, d, heads, causal)
    q, k, v = make_qkv(t, s, d, heads, dtype, "cuda", seed=seed)
    check("triton", q, k, v, causal=causal, lse_grad=True, seed=seed)


# --- gradcheck, opcheck, torch.compile ------------------------------------------------------


@pytest.mark.parametrize(
    "t,s,causal,scale",
    [(5, 7, False, None), (5, 7, True, None), (7, 5, True, 0.7)],
    ids=("T5-S7-full", "T5-S7-causal", "T7-S5-causal-scale"),
)
@pytest.mark.parametrize("impl", ("cpp",))
def test_gradcheck(impl, t, s, causal, scale):
    # lse is float32 even for float64 inputs, too coarse for finite differences: it is
    # checked against the float64 reference in test_lse_gradient instead.
    q, k, v = (x.requires_grad_() for x in make_qkv(t, s, 16, "gqa", F64, b=1, seed=_seed("gc", t, s)))

    def fn(q, k, v):
        return genkern.flash_attention(q, k, v, causal=causal, scale=scale, impl=impl)

    # fast_mode checks a random projection u^T J w of the Jacobian instead of every entry
    # (the full Jacobian costs thousands of calls). The projection of unit vectors is
    # small, so the default atol=1e-5 would pass a 1% error in dk: float64 finite
    # differences are good to ~1e-10 here, and these bounds catch a 0.1% error.
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True, atol=1e-8, rtol=1e-5)


def test_gradcheck_full_jacobian():
    utils.require_impl("cpp")
    q, k, v = (x.requires_grad_() for x in make_qkv(3, 4, 16, (2, 1), F64, b=1, seed=_seed("gc-full")))

    def fn(q, k, v):
        return genkern.flash_attention(q, k, v, causal=True, impl="cpp")

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_double_backward_is_refused():
    # The backward kernels carry no graph: a second derivative would silently be zero,
    # so create_graph=True must raise. First-order gradients stay available.
    utils.require_impl("cpp")
    q, k, v = (x.requires_grad_() for x in make_qkv(5, 7, 16, "gqa", F64, seed=6))
    out = genkern.flash_attention(q, k, v, impl="cpp")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q)
    (dq_ref,) = torch.autograd.grad(reference.attention(q, k, v, True).pow(2).sum(), q)
    torch.testing.assert_close(dq, dq_ref, rtol=1e-5, atol=1e-6)


def _opcheck_samples(requires_grad):
    fwd = []
    for i, (t, s, d, heads, causal, dtype) in enumerate(
        [
            (5, 7, 16, "gqa", True, F32),
            (7, 5, 16, "mqa", True, F32),
            (5, 7, 24, "mha", False, F64),
            (9, 9, 16, "gqa", True, F16),
            (3, 8, 32, "gqa", False, BF16),
        ]
    ):
        q, k, v = make_qkv(t, s, d, heads, dtype, seed=100 + i)
        if i == 1:
            q = q.transpose(1, 2).contiguous().transpose(1, 2)  # a (B, T, H, D) layout
        fwd.append(
            (
                q.requires_grad_(requires_grad),
                k.requires_grad_(requires_grad),
                v.requires_grad_(requires_grad),
                causal,
                1.0 / math.sqrt(d),
            )
        )
    return fwd


def test_opcheck():
    utils.require_impl("cpp")
    fwd, bwd = torch.ops.genkern.attention_cpp_fwd.default, torch.ops.genkern.attention_cpp_bwd.default
    for args in _opcheck_samples(True) + _opcheck_samples(False)[:2]:
        torch.library.opcheck(fwd, args)
    for i, (q, k, v, causal, scale) in enumerate(_opcheck_samples(False)):
        out, lse = fwd(q, k, v, causal, scale)
        g_out = utils.randn(out.shape, out.dtype, seed=200 + i)
        g_lse = utils.randn(lse.shape, F32, seed=300 + i)
        for grad_lse in (g_lse, None) if i < 2 else (g_lse,):
            torch.library.opcheck(bwd, (g_out, q, k, v, out, lse, grad_lse, causal, scale))


def test_torch_compile_fullgraph_cpp():
    utils.require_impl("cpp")
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    def fn(q, k, v):
        out, lse = genkern.flash_attention(q, k, v, causal=True, return_lse=True, impl="cpp")
        return out.sin(), lse * 0.5

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    q, k, v = make_qkv(19, 40, 32, "gqa", F32, seed=9)
    g_out, g_lse = utils.randn(q.shape, seed=10), utils.randn(q.shape[:3], seed=11)
    results = []
    for run in (fn, compiled):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = run(*leaves)
        grads = torch.autograd.grad(out, leaves, (g_out, g_lse))
        results.append(out + grads)
    assert any("attention_cpp_fwd" in g for g in graphs), "the compiled graph does not call the C++ kernel"
    for name, e, c in zip(("out", "lse", "dq", "dk", "dv"), *results):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


# --- genkern.functional.scaled_dot_product_attention ---------------------------------------


def _sdpa_case(cid, lq, lk, d=64, heads=(4, 4), dtype=F32, fast=True, mask=None, **kw):
    return pytest.param(lq, lk, d, heads, dtype, mask, kw, fast, id=cid)


SDPA_CASES = [
    _sdpa_case("full-L17-S33", 17, 33),
    _sdpa_case("full-L33-S17", 33, 17, d=40),
    _sdpa_case("causal-square", 33, 33, is_causal=True),
    _sdpa_case("causal-L17-S33-top-left", 17, 33, is_causal=True, fast=False),
    _sdpa_case("causal-L33-S17-top-left", 33, 17, is_causal=True, fast=False),
    _sdpa_case("gqa", 17, 33, heads=(4, 2), enable_gqa=True),
    _sdpa_case("mqa-causal-square", 33, 33, d=40, heads=(4, 1), enable_gqa=True, is_causal=True),
    _sdpa_case("scale", 17, 33, scale=0.3),
    _sdpa_case("dropout-0", 17, 33, dropout_p=0.0),
    _sdpa_case("bool-mask", 17, 33, mask="bool", fast=False),
    _sdpa_case("float-mask", 17, 33, mask="float", fast=False),
    _sdpa_case("3d", 17, 33, heads=None, fast=False),
    _sdpa_case("head-dim-12", 17, 33, d=12, fast=False),
    _sdpa_case("value-dim-differs", 17, 33, fast=False, value_dim=32),
    _sdpa_case("float64", 17, 33, dtype=F64, is_causal=False),
    _sdpa_case("float16-causal-square", 33, 33, dtype=F16, is_causal=True),
    _sdpa_case("bfloat16", 17, 33, dtype=BF16),
]


def _sdpa_inputs(lq, lk, d, heads, dtype, mask, kw, seed):
    kw = dict(kw)
    dv = kw.pop("value_dim", d)
    h, hkv = heads if heads is not None else (None, None)
    lead_q, lead_k = ((2, h), (2, hkv)) if heads is not None else ((8,), (8,))
    q = utils.randn((*lead_q, lq, d), dtype, seed=seed)
    k = utils.randn((*lead_k, lk, d), dtype, seed=seed + 1)
    v = utils.randn((*lead_k, lk, dv), dtype, seed=seed + 2)
    if mask == "bool":
        kw["attn_mask"] = torch.rand(lq, lk, generator=torch.Generator().manual_seed(seed)) > 0.5
        kw["attn_mask"][:, 0] = True  # every query sees a key
    elif mask == "float":
        kw["attn_mask"] = utils.randn((2, 1, lq, lk), dtype, seed=seed + 3)
    return (q, k, v), kw


def _KernelSpy(monkeypatch):
    """Counts the calls that reach the C++ kernel through genkern.flash_attention."""
    return utils.KernelCalls(monkeypatch, attention_op.ATTENTION, "cpp")


@pytest.mark.parametrize("lq,lk,d,heads,dtype,mask,kw,fast", SDPA_CASES)
def test_functional_sdpa(lq, lk, d, heads, dtype, mask, kw, fast, monkeypatch):
    utils.require_impl("cpp")
    monkeypatch.delenv("GENKERN_IMPL", raising=False)
    spy = _KernelSpy(monkeypatch)
    seed = _seed("sdpa", lq, lk, d)
    inputs, kw = _sdpa_inputs(lq, lk, d, heads, dtype, mask, kw, seed)
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = genkern.functional.scaled_dot_product_attention(*leaves, **kw)
    assert spy.calls == int(fast), f"expected the kernel to run {int(fast)} time(s), it ran {spy.calls}"
    g_out = utils.randn(out.shape, dtype, seed=seed + 5)
    grads = torch.autograd.grad(out, leaves, g_out)

    leaves_same = [x.detach().requires_grad_() for x in inputs]
    out_same = F.scaled_dot_product_attention(*leaves_same, **kw)
    grads_same = torch.autograd.grad(out_same, leaves_same, g_out)
    if not fast:  # torch's own function ran: exactly its results
        assert torch.equal(out, out_same)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_same))
        return
    kw64 = {n: (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a) for n, a in kw.items()}
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    out64 = F.scaled_dot_product_attention(*leaves64, **kw64)
    grads64 = torch.autograd.grad(out64, leaves64, g_out.double())
    assert_close_rule(out, out64, out_same, name="out")
    for name, g, w64, ws in zip(("dq", "dk", "dv"), grads, grads64, grads_same):
        assert_close_rule(g, w64, ws, name=name)


def test_functional_sdpa_honours_genkern_impl_torch(monkeypatch):
    utils.require_impl("cpp")
    monkeypatch.setenv("GENKERN_IMPL", "torch")
    spy = _KernelSpy(monkeypatch)
    q, k, v = make_qkv(17, 33, 64, "mha", F32, seed=12)
    out = genkern.functional.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 0
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))


def test_functional_sdpa_gqa_needs_enable_gqa():
    # Without enable_gqa, H != Hkv is torch's error, raised the same way.
    q, k, v = make_qkv(17, 33, 64, "gqa", F32, seed=13)
    with pytest.raises(Exception) as want:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(type(want.value)) as got:
        genkern.functional.scaled_dot_product_attention(q, k, v)
    assert str(got.value) == str(want.value)


# --- genkern.nn.CausalSelfAttention ---------------------------------------------------------


def _manual_self_attention(m, x):
    """The module's forward written out with its weights and the reference."""
    b, t, _ = x.shape
    h, hkv, hd = m.n_heads, m.n_kv_heads, m.head_dim
    w_qkv, w_proj = m.qkv.weight.to(x.dtype), m.proj.weight.to(x.dtype)
    qkv = x @ w_qkv.T + (0 if m.qkv.bias is None else m.qkv.bias.to(x.dtype))
    q, k, v = qkv.split([h * hd, hkv * hd, hkv * hd], dim=-1)
    q = q.reshape(b, t, h, hd).transpose(1, 2)  # (B, H, T, hd)
    k = k.reshape(b, t, hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    v = v.reshape(b, t, hkv, hd).transpose(1, 2)
    y = reference.attention(q, k, v, causal=True).transpose(1, 2).reshape(b, t, h * hd)
    return y @ w_proj.T + (0 if m.proj.bias is None else m.proj.bias.to(x.dtype))


@pytest.mark.parametrize(
    "n_heads,n_kv_heads,bias", [(4, None, False), (4, 2, True), (4, 1, False)], ids=("mha", "gqa-bias", "mqa")
)
@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_module_matches_manual(impl, n_heads, n_kv_heads, bias):
    torch.manual_seed(0)
    m = genkern.nn.CausalSelfAttention(64, n_heads, n_kv_heads, bias=bias, impl=impl)
    x = utils.randn((2, 37, 64), seed=1)
    y = m(x)
    assert y.shape == x.shape
    assert_close_rule(y, _manual_self_attention(m, x.double()), _manual_self_attention(m, x), name="y")


@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_module_is_causal(impl):
    torch.manual_seed(0)
    m = genkern.nn.CausalSelfAttention(96, 6, 2, impl=impl)
    x = utils.randn((2, 30, 96), seed=2)
    y = m(x)
    for t in (0, 13, 28):
        x2 = x.clone()
        x2[:, t + 1 :] += utils.randn(x2[:, t + 1 :].shape, seed=3 + t)
        y2 = m(x2)
        assert torch.equal(y2[:, : t + 1], y[:, : t + 1]), f"output {t} changed with tokens after it"
        assert not torch.equal(y2[:, t + 1 :], y[:, t + 1 :])


def test_module_cpp_matches_torch():
    utils.require_impl("cpp")
    torch.manual_seed(0)
    m = genkern.nn.CausalSelfAttention(128, 8, 2, bias=True, impl="cpp")
    x = utils.randn((3, 50, 128), seed=4)
    results = []
    for impl in ("cpp", "torch"):
        m.impl = impl
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(utils.randn(y.shape, seed=5))
        results.append([y, xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(dim=10, n_heads=3), "dim=10"),
        (dict(dim=0, n_heads=1), "dim=0"),
        (dict(dim=16, n_heads=0), "n_heads=0"),
        (dict(dim=16, n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
        (dict(dim=16, n_heads=4, n_kv_heads=0), "n_kv_heads=0"),
        (dict(dim=16, n_heads=2, n_kv_heads=4), "n_kv_heads=4"),
    ],
    ids=("dim-not-multiple", "dim-0", "heads-0", "kv-heads-not-divisor", "kv-heads-0", "kv-heads-more"),
)
def test_module_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        genkern.nn.CausalSelfAttention(**kw)


def test_module_bad_input():
    m = genkern.nn.CausalSelfAttention(16, 2, impl="torch")
    with pytest.raises(ValueError, match=r"^x must be \(B, T, dim=16\)"):
        m(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"^x must be"):
        m(torch.randn(5, 16))


# --- bad input ------------------------------------------------------------------------------


def _bad_cases():
    r = lambda *s: torch.randn(*s)  # noqa: E731
    kv = lambda *s: dict(k=r(*s), v=r(*s))  # noqa: E731
    i64 = torch.ones(2, 4, 5, 16, dtype=torch.int64)
    return [
        ("q-3d", dict(q=r(4, 5, 16)), ValueError, r"^q must be 4-d"),
        ("k-5d", kv(2, 2, 7, 16, 1), ValueError, r"^k must be 4-d"),
        ("v-3d", dict(v=r(2, 7, 16)), ValueError, r"^v must be 4-d"),
        ("k-v-shapes", dict(v=r(2, 2, 8, 16)), ValueError, r"^k and v must have one shape"),
        ("heads-not-multiple", kv(2, 3, 7, 16), ValueError, r"H=4 must be a multiple of k's heads Hkv=3"),
        ("kv-heads-0", kv(2, 0, 7, 16), ValueError, r"Hkv=0"),
        ("batch", kv(1, 2, 7, 16), ValueError, r"^k must be \(B=2, Hkv, S, D=16\)"),
        ("head-dim", kv(2, 2, 7, 24), ValueError, r"^k must be \(B=2, Hkv, S, D=16\)"),
        ("T-0", dict(q=r(2, 4, 0, 16)), ValueError, r"T, S, D >= 1"),
        ("S-0", kv(2, 2, 0, 16), ValueError, r"T, S, D >= 1"),
        ("q-int", dict(q=i64), TypeError, r"^q must be float16, bfloat16, float32 or float64"),
        ("k-int", dict(k=i64[:, :2], v=i64[:, :2]), TypeError, r"^k must be float16"),
        ("v-bool", dict(v=torch.ones(2, 2, 7, 16, dtype=torch.bool)), TypeError, r"^v must be float16"),
        ("k-float64", dict(k=r(2, 2, 7, 16).double()), TypeError, r"^k has dtype torch.float64 but q has"),
        ("v-float16", dict(v=r(2, 2, 7, 16).half()), TypeError, r"^v has dtype torch.float16"),
        ("k-device", dict(k=torch.empty(2, 2, 7, 16, device="meta")), ValueError, r"^k is on meta"),
        ("q-list", dict(q=[[0.0]]), TypeError, r"^q must be a torch.Tensor"),
        ("scale-inf", dict(scale=math.inf), ValueError, r"^scale must be finite"),
        ("scale-nan", dict(scale=math.nan), ValueError, r"^scale must be finite"),
        ("scale-tensor", dict(scale=torch.tensor(0.5)), TypeError, r"^scale must be a Python float"),
        ("scale-str", dict(scale="0.5"), TypeError, r"^scale must be a Python float"),
        ("scale-bool", dict(scale=True), TypeError, r"^scale must be a Python float"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("impl", utils.IMPLS)
def test_bad_input(impl, case):
    _, kw, exc, match = case
    args = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16), scale=None)
    args.update(kw)
    with pytest.raises(exc, match=match):
        genkern.flash_attention(args["q"], args["k"], args["v"], scale=args["scale"], impl=impl)


@pytest.mark.parametrize("d", (8, 12, 22, 260, 264))
@pytest.mark.parametrize("impl", ("cpp", "triton"))
def test_unsupported_head_dim_explicit(impl, d):
    q, k, v = make_qkv(5, 7, d, "gqa", F32, utils.impl_device(impl), seed=d)
    with pytest.raises(ValueError, match=rf"impl='{impl}' does not take .* head dim {d} "):
        genkern.flash_attention(q, k, v, impl=impl)


@pytest.mark.parametrize("d", (12, 264))
def test_unsupported_head_dim_auto_falls_back(d, monkeypatch):
    utils.require_impl("cpp")
    monkeypatch.delenv("GENKERN_IMPL", raising=False)
    monkeypatch.setattr(_dispatch, "_warned", set())  # "once per process": start from none said
    q, k, v = make_qkv(5, 7, d, "gqa", F32, seed=d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [genkern.flash_attention(q, k, v) for _ in range(2)]
    said = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert f"head dim {d}" in str(said[0].message) and "plain-PyTorch" in str(said[0].message)
    want = reference.attention(q, k, v, True)
    assert all(torch.equal(o, want) for o in outs)


def test_unsupported_head_dim_genkern_impl_cpp_raises(monkeypatch):
    utils.require_impl("cpp")
    monkeypatch.setenv("GENKERN_IMPL", "cpp")  # explicit, though the op says "auto"
    q, k, v = make_qkv(5, 7, 12, "gqa", F32, seed=1)
    with pytest.raises(ValueError, match="head dim 12"):
        genkern.flash_attention(q, k, v)


def test_bogus_impl():
    q, k, v = make_qkv(5, 7, 16, "gqa", F32)
    with pytest.raises(ValueError, match="impl"):
        genkern.flash_attention(q, k, v, impl="bogus")


def test_cpp_on_meta_unavailable():
    utils.require_impl("cpp")
    q = torch.empty(2, 4, 5, 16, device="meta")
    k = torch.empty(2, 2, 7, 16, device="meta")
    with pytest.raises(genkern.ImplUnavailableError, match="CPU"):
        genkern.flash_attention(q, k, k, impl="cpp")


def _raw_fwd_cases():
    q, k, v = make_qkv(5, 7, 16, "gqa", F32, seed=1)
    return [
        ("q-3d", (q[0], k, v), ValueError, r"^q must be 4-d"),
        ("heads-not-multiple", (q, k[:, :1].repeat(1, 3, 1, 1), v[:, :1].repeat(1, 3, 1, 1)), ValueError, r"Hkv=3"),
        ("batch", (q, k[:1], v[:1]), ValueError, r"^k must be \(B=2"),
        ("head-dim", (q, k[..., :8], v[..., :8]), ValueError, r"^k must be \(B=2, Hkv, S, D=16\)"),
        ("v-shape", (q, k, v[:, :, :6]), ValueError, r"^v has shape"),
        ("k-dtype", (q, k.double(), v.double()), TypeError, r"^k has dtype"),
        ("v-dtype", (q, k, v.double()), TypeError, r"^v has dtype"),
        ("q-int", (q.long(), k.long(), v.long()), TypeError, r"^q"),
    ]


def _raw_bwd_cases():
    q, k, v = make_qkv(5, 7, 16, "gqa", F32, seed=2)
    out = torch.randn(q.shape)
    lse = torch.randn(q.shape[:3])
    g = torch.randn(q.shape)
    base = dict(grad_out=g, q=q, k=k, v=v, out=out, lse=lse, grad_lse=None)
    bad = [
        ("lse-shape", dict(lse=lse[:, :, :4]), ValueError, r"^lse must have shape \(B, H, T\)"),
        ("lse-rank", dict(lse=lse.unsqueeze(-1)), ValueError, r"^lse must have shape"),
        ("lse-dtype", dict(lse=lse.double()), TypeError, r"^lse must be float32"),
        ("grad_lse-shape", dict(grad_lse=lse[:1]), ValueError, r"^grad_lse must have shape"),
        ("grad_out-shape", dict(grad_out=g[:, :, :4]), ValueError, r"^grad_out has shape"),
        ("grad_out-dtype", dict(grad_out=g.double()), TypeError, r"^grad_out has dtype"),
        ("out-shape", dict(out=out[:, :2]), ValueError, r"^out has shape"),
        (
            "heads-not-multiple",
            dict(k=k[:, :1].repeat(1, 3, 1, 1), v=v[:, :1].repeat(1, 3, 1, 1)),
            ValueError,
            r"Hkv=3",
        ),
        ("k-3d", dict(k=k[0]), ValueError, r"^k must be 4-d"),
    ]
    return [(cid, {**base, **kw}, exc, match) for cid, kw, exc, match in bad]


RAW_FWD_CASES, RAW_BWD_CASES = _raw_fwd_cases(), _raw_bwd_cases()


@pytest.mark.parametrize("case", RAW_FWD_CASES, ids=[c[0] for c in RAW_FWD_CASES])
def test_raw_fwd_op_checks_arguments(case):
    # torch.ops.genkern.* are public too: the C++ kernels check before touching memory.
    utils.require_impl("cpp")
    _, args, exc, match = case
    with pytest.raises(exc, match=match):
        torch.ops.genkern.attention_cpp_fwd(*args, True, 0.25)


@pytest.mark.parametrize("case", RAW_BWD_CASES, ids=[c[0] for c in RAW_BWD_CASES])
def test_raw_bwd_op_checks_arguments(case):
    utils.require_impl("cpp")
    _, a, exc, match = case
    with pytest.raises(exc, match=match):
        torch.ops.genkern.attention_cpp_bwd(
            a["grad_out"], a["q"], a["k"], a["v"], a["out"], a["lse"], a["grad_lse"], True, 0.25
        )
