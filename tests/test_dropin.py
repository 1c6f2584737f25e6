"""genkern.functional.scaled_dot_product_attention as a drop-in for torch's, and genkern.patch/unpatch/patched.

Every call the kernel cannot take (masks that are not a padding pattern, dropout, is_causal with T != S, inputs
that are not 4-d, head dims the kernels lack, an sdpa_kernel context without FLASH_ATTENTION) must give exactly
torch's own results, also after torch's name has been replaced by the drop-in (the fallback must not find itself);
the kernel counter (utils.KernelCalls) proves the kernel ran where it should and nowhere else. Calls that run on
the kernel, with no mask or with a padding-pattern mask (span_attention), are held to the rule of DESIGN.md
(utils.assert_close_rule against torch's float64 result).
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import genkern
import utils
from genkern import functional as gf
from genkern import patching
from genkern.ops import attention as attention_op
from utils import assert_close_rule

TORCH_SDPA = gf._TORCH_SDPA  # torch's own function, as the drop-in holds it


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


@pytest.fixture(autouse=True)
def _leave_torch_alone():
    """No test may leave torch patched for the next one."""
    before = F.scaled_dot_product_attention
    yield
    patching.unpatch()
    F.scaled_dot_product_attention = before


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach the C++ attention kernel."""
    utils.require_impl("cpp")
    monkeypatch.delenv("GENKERN_IMPL", raising=False)
    return utils.KernelCalls(monkeypatch, attention_op.ATTENTION, "cpp")


def _qkv(lead_q, lead_k, lq, lk, d, dtype=torch.float32, *, dv=None, seed=0):
    q = utils.randn((*lead_q, lq, d), dtype, seed=seed)
    k = utils.randn((*lead_k, lk, d), dtype, seed=seed + 1)
    v = utils.randn((*lead_k, lk, dv or d), dtype, seed=seed + 2)
    return q, k, v


def _run(fn, inputs, kw, g_seed, g_dtype=None):
    """(out, grads of q, k, v) of fn on fresh leaves, with a fixed random grad_out drawn in g_dtype."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves, **kw)
    g_out = utils.randn(out.shape, g_dtype or out.dtype, seed=g_seed).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, g_out)


def _mask(kind, lq, lk, dtype, seed):
    """Masks torch's function takes that are not a padding pattern (or, for 3-/5-d inputs, that are one)."""
    if kind == "bool":  # rows with holes
        m = torch.rand(lq, lk, generator=torch.Generator().manual_seed(seed)) > 0.5
        m[:, 0] = True  # every query sees a key
        return m
    if kind == "per-head":  # right padding that differs between heads
        m = torch.ones(2, 4, 1, lk, dtype=torch.bool)
        m[1, 1:, :, lk // 2 :] = False
        return m
    if kind == "bias":  # a padding pattern plus one finite value that is not 0
        m = _additive(_pattern("right", 2, lq, lk), dtype)
        m[0, 0, 0, 1] = 0.5
        return m
    if kind == "finfo-min":  # padding written with the dtype's lowest finite value, not -inf: a bias to torch
        return _pattern("right", 2, lq, lk).logical_not() * torch.finfo(dtype).min
    if kind == "window":
        return _pattern("window", 2, lq, lk)
    return utils.randn((2, 1, lq, lk), dtype, seed=seed + 3)  # additive


def _noncontiguous(q, k, v):
    """(B, L, H, E) storage seen as (B, H, L, E), as attention modules build it."""
    return tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))


def _fallback_case(cid, lead=((2, 4), (2, 4)), lq=17, lk=33, d=32, mask=None, noncontig=False, **kw):
    return pytest.param(lead, lq, lk, d, mask, noncontig, kw, id=cid)


FALLBACK_CASES = [
    _fallback_case("bool-mask", mask="bool"),
    _fallback_case("additive-mask", mask="float"),
    _fallback_case("per-head-mask", mask="per-head"),
    _fallback_case("bias-mask", mask="bias"),
    _fallback_case("finfo-min-mask", mask="finfo-min"),
    _fallback_case("window-mask-3d", lead=((8,), (8,)), mask="window"),
    _fallback_case("window-mask-5d", lead=((2, 3, 4), (2, 3, 4)), mask="window"),
    _fallback_case("window-mask-head-dim-12", d=12, mask="window"),
    _fallback_case("additive-mask-scale", mask="float", scale=0.3),
    _fallback_case("mask-gqa", lead=((2, 4), (2, 2)), mask="bool", enable_gqa=True),
    _fallback_case("mask-noncontiguous", mask="float", noncontig=True),
    _fallback_case("causal-L17-S33", is_causal=True),
    _fallback_case("causal-L33-S17", lq=33, lk=17, is_causal=True),
    _fallback_case("causal-L17-S33-gqa", lead=((2, 4), (2, 1)), is_causal=True, enable_gqa=True),
    _fallback_case("2d", lead=((), ())),
    _fallback_case("3d", lead=((8,), (8,))),
    _fallback_case("3d-causal-square", lead=((8,), (8,)), lq=33, lk=33, is_causal=True),
    _fallback_case("5d", lead=((2, 3, 4), (2, 3, 4))),
    _fallback_case("head-dim-12", d=12),
    _fallback_case("value-dim-differs", value_dim=24),
]


@pytest.mark.parametrize("how", ("call", "replaced-by-hand", "patched"))
@pytest.mark.parametrize("lead,lq,lk,d,mask,noncontig,kw", FALLBACK_CASES)
def test_fallback_equals_torch(lead, lq, lk, d, mask, noncontig, kw, how, spy, monkeypatch):
    kw = dict(kw)
    seed = _seed("fallback", lead, lq, lk, d, mask)
    q, k, v = _qkv(*lead, lq, lk, d, dv=kw.pop("value_dim", None), seed=seed)
    if noncontig:
        q, k, v = _noncontiguous(q, k, v)
    if mask is not None:
        kw["attn_mask"] = _mask(mask, lq, lk, q.dtype, seed)
    if how == "replaced-by-hand":  # the way of adopting a drop-in
        monkeypatch.setattr(F, "scaled_dot_product_attention", gf.scaled_dot_product_attention)
    elif how == "patched":
        genkern.patch()
    fn = gf.scaled_dot_product_attention if how == "call" else F.scaled_dot_product_attention
    out, grads = _run(fn, (q, k, v), kw, seed + 5)
    assert spy.calls == 0, "the kernel ran on a call it cannot take"
    want, want_grads = _run(TORCH_SDPA, (q, k, v), kw, seed + 5)
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def _kernel_case(cid, heads=(4, 4), lq=33, lk=33, d=32, dtype=torch.float32, noncontig=False, **kw):
    return pytest.param(heads, lq, lk, d, dtype, noncontig, kw, id=cid)


KERNEL_CASES = [
    _kernel_case("full-L17-S33", lq=17),
    _kernel_case("causal-square", is_causal=True),
    _kernel_case("gqa-causal", heads=(4, 2), is_causal=True, enable_gqa=True),
    _kernel_case("mqa", heads=(4, 1), lq=17, enable_gqa=True),
    _kernel_case("scale", lq=17, scale=0.3),
    _kernel_case("noncontiguous-causal", noncontig=True, is_causal=True),
    _kernel_case("float64-causal", dtype=torch.float64, is_causal=True),
    _kernel_case("bfloat16-causal", dtype=torch.bfloat16, is_causal=True),
]


@pytest.mark.parametrize("heads,lq,lk,d,dtype,noncontig,kw", KERNEL_CASES)
def test_patched_kernel_calls(heads, lq, lk, d, dtype, noncontig, kw, spy):
    seed = _seed("kernel", heads, lq, lk, d, dtype)
    inputs = _qkv((2, heads[0]), (2, heads[1]), lq, lk, d, dtype, seed=seed)
    if noncontig:
        inputs = _noncontiguous(*inputs)
    with genkern.patched():
        out, grads = _run(F.scaled_dot_product_attention, inputs, kw, seed + 5)
    assert spy.calls == 1, f"expected the kernel to run once, it ran {spy.calls} time(s)"
    same, same_grads = _run(TORCH_SDPA, inputs, kw, seed + 5)
    want64, want64_grads = _run(TORCH_SDPA, [x.double() for x in inputs], kw, seed + 5, g_dtype=dtype)
    assert_close_rule(out, want64, same, name="out")
    for name, g, w64, ws in zip(("dq", "dk", "dv"), grads, want64_grads, same_grads):
        assert_close_rule(g, w64, ws, name=name)


# --- masks that are a padding pattern: span_attention -------------------------------------------


def _spans_mask(lo, hi, lk):
    """(..., L) spans -> the boolean (..., L, S) mask allowing keys lo <= j < hi."""
    j = torch.arange(lk)
    return (j >= lo.unsqueeze(-1)) & (j < hi.unsqueeze(-1))


def _pattern(kind, b, lq, lk, seed=0):
    """A boolean padding pattern for a batch of b = 2 rows, in the shape users hand to torch's function."""
    i, j = torch.arange(lq).view(lq, 1), torch.arange(lk)
    diag = i + lk - lq  # bottom-right causal alignment, written into the mask by hand
    lens, pads = torch.tensor([lk, lk // 2 + 1]), torch.tensor([0, lk // 3 + 1])
    right = j < lens.view(b, 1, 1, 1)  # (B, 1, 1, S)
    left = j >= pads.view(b, 1, 1, 1)  # (B, 1, 1, S)
    if kind in ("right", "left"):
        return right if kind == "right" else left
    if kind == "causal-right":
        return (j <= diag) & right  # (B, 1, L, S)
    if kind == "causal-left":  # the padding queries of the left-padded row see nothing
        return (j <= diag) & left  # (B, 1, L, S)
    if kind == "window":
        return (j <= diag) & (j >= diag - 5)  # (L, S)
    if kind == "keys-2d":
        return (j < lk - 3).view(1, lk)  # (1, S): every row alike
    g = torch.Generator().manual_seed(seed)  # "spans": any span per row, some empty, as a 3-d (1, L, S) mask
    lo, hi = (torch.randint(-2, lk + 2, (1, lq), generator=g) for _ in range(2))
    return _spans_mask(lo, hi, lk)


def _additive(mask, dtype):
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))


def _pattern_case(cid, kind, heads=(4, 4), lq=33, lk=33, d=32, dtype=torch.float32, additive=False, **kw):
    return pytest.param(kind, heads, lq, lk, d, dtype, additive, kw, id=cid)


PATTERN_CASES = [
    _pattern_case("right", "right"),
    _pattern_case("left", "left", lq=17),
    _pattern_case("right-additive", "right", additive=True),
    _pattern_case("causal-right", "causal-right", lq=17),
    _pattern_case("causal-left-additive", "causal-left", additive=True),
    _pattern_case("causal-left-L33-S17", "causal-left", lq=33, lk=17),
    _pattern_case("window-2d", "window", lq=17),
    _pattern_case("keys-2d-additive", "keys-2d", additive=True),
    _pattern_case("spans-3d", "spans", lq=17),
    _pattern_case("gqa-causal-left", "causal-left", heads=(4, 2), enable_gqa=True),
    _pattern_case("mqa-spans", "spans", heads=(4, 1), enable_gqa=True),
    _pattern_case("scale-right", "right", scale=0.3),
    _pattern_case("noncontiguous-spans", "spans", noncontig=True),
    _pattern_case("float64-spans", "spans", dtype=torch.float64),
    _pattern_case("bfloat16-causal-right-additive", "causal-right", dtype=torch.bfloat16, additive=True),
]


def _pattern_inputs(kind, heads, lq, lk, d, dtype, additive, kw):
    seed = _seed("pattern", kind, heads, lq, lk, d, dtype, additive)
    inputs = _qkv((2, heads[0]), (2, heads[1]), lq, lk, d, dtype, seed=seed)
    kw = dict(kw)
    if kw.pop("noncontig", False):
        inputs = _noncontiguous(*inputs)
    mask = _pattern(kind, 2, lq, lk, seed)
    kw["attn_mask"] = _additive(mask, dtype) if additive else mask
    return inputs, kw, seed


@pytest.mark.parametrize("kind,heads,lq,lk,d,dtype,additive,kw", PATTERN_CASES)
def test_mask_spans_read_the_pattern(kind, heads, lq, lk, d, dtype, additive, kw):
    """The spans allow exactly the keys the mask allows, row by row (broadcast to (B, 1, L, S))."""
    (q, k, _), kw, _ = _pattern_inputs(kind, heads, lq, lk, d, dtype, additive, kw)
    lo, hi = gf.mask_spans(kw["attn_mask"], 2, lq, lk)
    assert lo.dtype == hi.dtype == torch.int32 and lo.shape == hi.shape == (2, lq)
    want = _pattern(kind, 2, lq, lk, _seed("pattern", kind, heads, lq, lk, d, dtype, additive))
    assert torch.equal(_spans_mask(lo, hi, lk), want.expand(2, 1, lq, lk)[:, 0])


@pytest.mark.parametrize("kind,heads,lq,lk,d,dtype,additive,kw", PATTERN_CASES)
def test_spans_give_torchs_result(kind, heads, lq, lk, d, dtype, additive, kw):
    """span_attention over the spans (the plain-PyTorch impl) is torch's function with the mask, rows that see
    nothing included (torch gives zeros there on the CPU, and zero gradients)."""
    inputs, kw, seed = _pattern_inputs(kind, heads, lq, lk, d, dtype, additive, kw)
    spans = gf.mask_spans(kw["attn_mask"], 2, lq, lk)

    def spans_fn(q, k, v, scale=None, **_):
        return attention_op.span_attention(q, k, v, *spans, scale=scale, impl="torch")

    _assert_like_torch(spans_fn, inputs, kw, seed, dtype)


@pytest.mark.parametrize("kind,heads,lq,lk,d,dtype,additive,kw", PATTERN_CASES)
def test_patched_padding_mask_runs_the_kernel(kind, heads, lq, lk, d, dtype, additive, kw, spy):
    inputs, kw, seed = _pattern_inputs(kind, heads, lq, lk, d, dtype, additive, kw)
    with genkern.patched():
        _assert_like_torch(F.scaled_dot_product_attention, inputs, kw, seed, dtype)
    assert spy.calls == 1, f"expected the kernel to run once, it ran {spy.calls} time(s)"


def _assert_like_torch(fn, inputs, kw, seed, dtype):
    out, grads = _run(fn, inputs, kw, seed + 5)
    same, same_grads = _run(TORCH_SDPA, inputs, kw, seed + 5)
    kw64 = dict(kw, attn_mask=kw["attn_mask"] if kw["attn_mask"].dtype == torch.bool else kw["attn_mask"].double())
    want64, want64_grads = _run(TORCH_SDPA, [x.double() for x in inputs], kw64, seed + 5, g_dtype=dtype)
    assert_close_rule(out, want64, same, name="out")
    for name, g, w64, ws in zip(("dq", "dk", "dv"), grads, want64_grads, same_grads):
        assert_close_rule(g, w64, ws, name=name)


def _not_patterns(lq, lk):
    right = _pattern("right", 2, lq, lk)
    holes = _pattern("causal-right", 2, lq, lk).clone()
    holes[1, 0, lq - 1, 2] = False
    nan = _additive(right, torch.float32)
    nan[0, 0, 0, 3] = float("nan")
    pos_inf = _additive(right, torch.float32).masked_fill(~right, float("inf"))
    return {
        "holes": holes,
        "per-head": right.expand(2, 4, lq, lk),
        "bias": _additive(right, torch.float32) + 0.25,
        "nan": nan,
        "+inf": pos_inf,
        "requires-grad": _additive(right, torch.float32).requires_grad_(),
        "batch-3": right[:1].expand(3, 1, lq, lk),
        "5d": right.unsqueeze(0),
        "1d": right[0, 0, 0],
        "int": right.int(),
    }


@pytest.mark.parametrize("which", list(_not_patterns(5, 7)))
def test_mask_spans_refuse_what_is_not_a_padding_pattern(which):
    assert gf.mask_spans(_not_patterns(9, 13)[which], 2, 9, 13) is None


@pytest.mark.parametrize("how", ("call", "patched"))
def test_mask_with_is_causal_is_torchs(how, spy):
    """torch's function decides what a mask with is_causal=True means (on the CPU it applies both)."""
    inputs = _qkv((2, 4), (2, 4), 17, 17, 32, seed=31)
    kw = {"attn_mask": _pattern("right", 2, 17, 17), "is_causal": True}
    fn = F.scaled_dot_product_attention if how == "patched" else gf.scaled_dot_product_attention
    with genkern.patched() if how == "patched" else contextlib.nullcontext():
        out, grads = _run(fn, inputs, kw, 33)
    want, want_grads = _run(TORCH_SDPA, inputs, kw, 33)
    assert spy.calls == 0
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_mask_that_requires_grad_runs_torch(spy):
    q, k, v = _qkv((2, 4), (2, 4), 17, 17, 32, seed=32)
    mask = _additive(_pattern("causal-right", 2, 17, 17), torch.float32)
    got_mask, want_mask = mask.clone().requires_grad_(), mask.clone().requires_grad_()
    with genkern.patched():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=got_mask)
    want = TORCH_SDPA(q, k, v, attn_mask=want_mask)
    got.pow(2).sum().backward()
    want.pow(2).sum().backward()
    assert spy.calls == 0
    assert torch.equal(got, want) and torch.equal(got_mask.grad, want_mask.grad)


@pytest.mark.parametrize("mask", (None, "causal-right"))
@pytest.mark.parametrize("p", (0.3, 1.0))
def test_patched_dropout_is_torchs_under_the_same_seed(p, mask, spy):
    q, k, v = _qkv((2, 4), (2, 4), 17, 33, 32, seed=7)
    kw = {"dropout_p": p, "attn_mask": None if mask is None else _pattern(mask, 2, 17, 33)}
    with genkern.patched():
        torch.manual_seed(123)
        out, grads = _run(F.scaled_dot_product_attention, (q, k, v), kw, 11)
    torch.manual_seed(123)
    want, want_grads = _run(TORCH_SDPA, (q, k, v), kw, 11)
    assert spy.calls == 0
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))


# --- torch.nn.attention.sdpa_kernel: genkern stands in for the FlashAttention backend ------------


@pytest.mark.parametrize("patched", (False, True))
def test_sdpa_kernel_math_runs_torch_and_double_backward_works(patched, spy):
    q, k, v = (x.double() for x in _qkv((2, 4), (2, 2), 17, 17, 16, seed=21))
    fn = F.scaled_dot_product_attention if patched else gf.scaled_dot_product_attention
    kw = {"is_causal": True, "enable_gqa": True}
    with genkern.patched() if patched else contextlib.nullcontext(), sdpa_kernel(SDPBackend.MATH):
        out, (dq, dk, dv) = _double_backward(fn, (q, k, v), kw)
    assert spy.calls == 0, "the kernel ran inside sdpa_kernel(SDPBackend.MATH)"
    with sdpa_kernel(SDPBackend.MATH):
        want, want_grads = _double_backward(TORCH_SDPA, (q, k, v), kw)
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), want_grads))


def _double_backward(fn, inputs, kw):
    """out and the gradient of |d(out^2)/dq|^2 (a second derivative) with respect to q, k, v."""
    q, k, v = (x.detach().requires_grad_() for x in inputs)
    out = fn(q, k, v, **kw)
    (dq,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    return out, torch.autograd.grad(dq.pow(2).sum(), (q, k, v))


@pytest.mark.parametrize("patched", (False, True))
def test_sdpa_kernel_without_a_viable_backend_raises_like_torch(patched, spy):
    q, k, v = _qkv((2, 4), (2, 4), 17, 17, 32, seed=22)
    fn = F.scaled_dot_product_attention if patched else gf.scaled_dot_product_attention
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):  # no CPU kernel for it, and no math path
        with pytest.raises(Exception) as want:
            TORCH_SDPA(q, k, v)
        with genkern.patched() if patched else contextlib.nullcontext(), pytest.raises(type(want.value)) as got:
            fn(q, k, v)
    assert "No viable backend" in str(want.value)
    assert str(got.value) == str(want.value)
    assert spy.calls == 0


@pytest.mark.parametrize("backends", ([SDPBackend.FLASH_ATTENTION], [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]))
def test_sdpa_kernel_allowing_flash_runs_the_kernel(backends, spy):
    q, k, v = _qkv((2, 4), (2, 4), 17, 17, 32, seed=23)
    with sdpa_kernel(backends), genkern.patched():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert spy.calls == 1
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True))


def test_sdpa_kernel_state_is_read_per_call(spy):
    q, k, v = _qkv((1, 2), (1, 2), 9, 9, 16, seed=24)
    gf.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.MATH):
        gf.scaled_dot_product_attention(q, k, v)
    gf.scaled_dot_product_attention(q, k, v)
    assert spy.calls == 2


# --- genkern.patch / unpatch / patched ----------------------------------------------------------


def _other_sdpa(*args, **kwargs):
    """A function someone else put in torch's place before genkern was asked to patch."""
    return TORCH_SDPA(*args, **kwargs)


def test_exported():
    assert {"patch", "unpatch", "patched"} <= set(genkern.__all__)
    assert genkern.patch is patching.patch and genkern.unpatch is patching.unpatch


def test_patch_is_idempotent_and_unpatch_restores_what_was_there(monkeypatch):
    monkeypatch.setattr(F, "scaled_dot_product_attention", _other_sdpa)
    genkern.patch()
    genkern.patch()
    assert F.scaled_dot_product_attention is gf.scaled_dot_product_attention
    assert torch.nn.functional.scaled_dot_product_attention is gf.scaled_dot_product_attention
    genkern.unpatch()
    assert F.scaled_dot_product_attention is _other_sdpa
    genkern.unpatch()  # not patched: nothing to do
    assert F.scaled_dot_product_attention is _other_sdpa


def test_unpatch_restores_torchs_own():
    before = F.scaled_dot_product_attention
    genkern.patch()
    genkern.unpatch()
    assert F.scaled_dot_product_attention is before
    assert torch._C._nn.scaled_dot_product_attention is TORCH_SDPA  # torch's binding is never touched


def test_patched_contexts_nest():
    before = F.scaled_dot_product_attention
    with genkern.patched():
        with genkern.patched():
            assert F.scaled_dot_product_attention is gf.scaled_dot_product_attention
        assert F.scaled_dot_product_attention is gf.scaled_dot_product_attention  # the outer one still holds
    assert F.scaled_dot_product_attention is before


def test_patched_inside_patch_leaves_the_patch():
    before = F.scaled_dot_product_attention
    genkern.patch()
    with genkern.patched():
        pass
    assert F.scaled_dot_product_attention is gf.scaled_dot_product_attention
    genkern.unpatch()
    assert F.scaled_dot_product_attention is before


def test_patched_restores_on_error():
    before = F.scaled_dot_product_attention
    with pytest.raises(KeyError), genkern.patched():
        raise KeyError("inside")
    assert F.scaled_dot_product_attention is before


def test_unpatch_keeps_a_later_replacement(monkeypatch):
    genkern.patch()
    monkeypatch.setattr(F, "scaled_dot_product_attention", _other_sdpa)  # someone wraps after genkern
    genkern.unpatch()
    assert F.scaled_dot_product_attention is _other_sdpa
    assert not patching.is_patched()


# --- a nanoGPT-style model under genkern.patched() ----------------------------------------------


class _CausalSelfAttention(torch.nn.Module):
    """nanoGPT's attention: one projection to q, k, v and torch's function looked up by name at call time."""

    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = torch.nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = torch.nn.Linear(n_embd, n_embd)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        # (B, T, C) -> (B, nh, T, hs), non-contiguous as in nanoGPT
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))  # (B, nh, T, hs) -> (B, T, C)


class _TinyGPT(torch.nn.Module):
    def __init__(self, vocab=50, n_embd=64, n_head=4, n_layer=2, block=32):
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, n_embd), torch.nn.Embedding(block, n_embd)
        self.blocks = torch.nn.ModuleList()
        for _ in range(n_layer):
            mlp = torch.nn.Sequential(
                torch.nn.Linear(n_embd, 4 * n_embd), torch.nn.GELU(), torch.nn.Linear(4 * n_embd, n_embd)
            )
            attn = _CausalSelfAttention(n_embd, n_head)
            self.blocks.append(torch.nn.ModuleList([torch.nn.LayerNorm(n_embd), attn, torch.nn.LayerNorm(n_embd), mlp]))
        self.ln_f, self.lm_head = torch.nn.LayerNorm(n_embd), torch.nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for ln1, attn, ln2, mlp in self.blocks:
            x = x + attn(ln1(x))
            x = x + mlp(ln2(x))
        return self.lm_head(self.ln_f(x))


def _logits_and_grads(model, idx):
    model.zero_grad()
    logits = model(idx)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_nanogpt_style_model_under_patched(spy):
    torch.manual_seed(0)
    model = _TinyGPT().double()
    idx = torch.randint(0, 50, (3, 29), generator=torch.Generator().manual_seed(1))
    want, want_grads = _logits_and_grads(model, idx)
    assert spy.calls == 0
    with genkern.patched():
        got, got_grads = _logits_and_grads(model, idx)
    assert spy.calls == len(model.blocks)
    torch.testing.assert_close(got, want)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], msg=lambda m, name=name: f"{name}: {m}")
