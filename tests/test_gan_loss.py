"""genkern.discriminator_loss / genkern.generator_loss against the float64 reference, every impl.

The spec is genkern/reference/gan_loss.py. "Correct" is the rule of DESIGN.md
(utils.assert_close_rule): error vs the float64 reference at most 2x the error of the
plain-PyTorch computation in the same dtype, plus a small floor; float32/float64 also
within utils.ABS_TOL. Gradients are compared with the autograd of the float64 reference.
Upstream gradients are never ones: for "mean" the upstream scale is ~ the number of
logits (as a loss scaler's would be), so the compared gradients are O(1) and the rule's
floor does not hide their error.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
import zlib

import pytest
import torch

import genkern
import utils
from genkern.reference import gan_loss as reference
from genkern.reference.gan_loss import KINDS, LABEL_KINDS, REDUCTIONS
from utils import KERNEL_IMPLS, assert_close_rule, assert_matches_formula, impl_device, impl_dtype_params

# (loss, kind, real_label): every kind of both losses, and one-sided label smoothing.
LOSS_CASES = [("d", k, 1.0) for k in KINDS] + [("d", k, 0.9) for k in LABEL_KINDS] + [("g", k, 1.0) for k in KINDS]
LOSS_IDS = [f"{loss}-{kind}" + ("" if label == 1.0 else f"-label{label}") for loss, kind, label in LOSS_CASES]
LOSS_PARAMS = pytest.mark.parametrize("loss,kind,label", LOSS_CASES, ids=LOSS_IDS)

# Shapes with B in {1, 3, 64, 1025}: (B,), (B, 1), (B, 1, H, W). Real and fake of one shape ...
SAME_SHAPES = [
    (1,),
    (3,),
    (64,),
    (1025,),
    (1, 1),
    (3, 1),
    (64, 1),
    (1025, 1),
    (1, 1, 5, 7),
    (3, 1, 4, 4),
    (64, 1, 2, 3),
    (1025, 1, 2, 2),
    (2, 1, 30, 30),
]
# ... and of different numbers of elements (mean and sum only).
DIFF_SHAPES = [
    ((3,), (64,)),
    ((64, 1), (3, 1)),
    ((1,), (1025, 1)),
    ((1025,), (1,)),
    ((64, 1), (2, 1, 5, 5)),
    ((3, 1, 4, 4), (64,)),
    ((1, 1, 5, 7), (1025, 1, 2, 2)),
]
INTERPRETER_MAX_NUMEL = 2048  # the Triton interpreter is slow: larger shapes run on CPU impls / the GPU only


def _sid(shape):
    return "x".join(map(str, shape))


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def make_logits(shape, dtype, device="cpu", *, seed, scale=2.0):
    """N(0, scale^2) logits, never within 0.05 of the hinge kinks +-1 (see test_hinge_kink)."""
    x = utils.randn(shape, torch.float64, seed=seed, scale=scale)
    near_kink = ((x - 1).abs() < 0.05) | ((x + 1).abs() < 0.05)
    return torch.where(near_kink, x + 0.1, x).to(dtype).to(device)


def _uses_real(loss, kind):
    return loss == "d" or kind == "relativistic"


def _op(impl, loss, kind, reduction, real, fake, real_label=1.0):
    if loss == "d":
        return genkern.discriminator_loss(real, fake, kind, reduction=reduction, real_label=real_label, impl=impl)
    return genkern.generator_loss(fake, kind, real_logits=real, reduction=reduction, impl=impl)


def _reference(loss, kind, reduction, real, fake, real_label=1.0):
    if loss == "d":
        return reference.discriminator_loss(real, fake, kind, reduction=reduction, real_label=real_label)
    return reference.generator_loss(
        fake, kind, real_logits=real if kind == "relativistic" else None, reduction=reduction
    )


def _upstream(out, real, fake, reduction, seed):
    """A non-ones upstream gradient: ~numel for mean (O(1) gradients), 0.75 for sum, N(0,1) for none."""
    if reduction == "mean":
        return torch.tensor(0.75 * max(real.numel(), fake.numel()), dtype=out.dtype, device=out.device)
    if reduction == "sum":
        return torch.tensor(0.75, dtype=out.dtype, device=out.device)
    g = utils.randn(out.shape, torch.float64, seed=seed)
    return torch.where(g.abs() < 0.05, 0.5, g).to(out.dtype).to(out.device)  # never zero


def check(impl, loss, kind, reduction, real, fake, *, real_label=1.0, grads=True, upstream=None, seed=0, where=""):
    """One forward (and backward) of the op, checked against the reference; returns the loss."""
    where = where or f"{loss} {kind} {reduction} real {tuple(real.shape)} fake {tuple(fake.shape)}"
    uses_real = _uses_real(loss, kind)
    r, f = real.detach().requires_grad_(grads), fake.detach().requires_grad_(grads)
    out = _op(impl, loss, kind, reduction, r, f, real_label)
    want_shape = fake.shape if reduction == "none" else torch.Size([])
    assert out.shape == want_shape, f"{where}: loss shape {tuple(out.shape)} != {tuple(want_shape)}"
    assert out.device == fake.device, f"{where}: loss on {out.device}"

    r64, f64 = utils.to64(r, f)
    rs, fs = (t.detach().clone().requires_grad_(grads) for t in (r, f))
    ref64 = _reference(loss, kind, reduction, r64, f64, real_label)
    same = _reference(loss, kind, reduction, rs, fs, real_label)
    assert_close_rule(out, ref64, same, name=f"{where}: loss")
    if not grads:
        return out

    g = _upstream(out, r, f, reduction, seed + 1) if upstream is None else upstream
    got = torch.autograd.grad(out, (r, f), g, allow_unused=True)
    want64 = torch.autograd.grad(ref64, (r64, f64), g.double(), allow_unused=True)
    want_same = torch.autograd.grad(same, (rs, fs), g, allow_unused=True)
    for name, gt, w64, ws, x in zip(("real", "fake"), got, want64, want_same, (r, f)):
        if name == "real" and not uses_real:
            assert gt is None or not bool(gt.any()), f"{where}: a gradient for unused real logits"
            continue
        assert gt is not None, f"{where}: no gradient for the {name} logits"
        assert gt.device == x.device
        assert_close_rule(gt, w64, ws, name=f"{where}: grad {name}")
    return out


def _shape_params(pairs):
    """(impl, dtype, real_shape, fake_shape) params, the interpreter's only up to INTERPRETER_MAX_NUMEL."""
    out = []
    for p in impl_dtype_params(KERNEL_IMPLS):
        impl, dtype = p.values
        for rs, fs in pairs:
            if utils.interpreted(impl) and max(math.prod(rs), math.prod(fs)) > INTERPRETER_MAX_NUMEL:
                continue
            out.append(pytest.param(impl, dtype, rs, fs, id=f"{p.id}-{_sid(rs)}-{_sid(fs)}"))
    return out


# --- values and gradients ---------------------------------------------------------------


@pytest.mark.parametrize("reduction,shapes", [(r, "same") for r in REDUCTIONS] + [("mean", "diff"), ("sum", "diff")])
@LOSS_PARAMS
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS))
def test_values_and_grads(impl, dtype, loss, kind, label, reduction, shapes):
    # "diff": real and fake of different numbers of elements (reduction="none" needs one shape)
    real_shape, fake_shape = ((64, 1), (64, 1)) if shapes == "same" else ((64, 1), (3, 1, 4, 5))
    device = impl_device(impl)
    seed = _seed(impl, str(dtype), loss, kind, reduction, shapes)
    real = make_logits(real_shape, dtype, device, seed=seed)
    fake = make_logits(fake_shape, dtype, device, seed=seed + 1)
    check(impl, loss, kind, reduction, real, fake, real_label=label, seed=seed)


@pytest.mark.parametrize("impl,dtype,real_shape,fake_shape", _shape_params([(s, s) for s in SAME_SHAPES]))
def test_shapes(impl, dtype, real_shape, fake_shape):
    device = impl_device(impl)
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            seed = _seed(real_shape, loss, kind, reduction)
            real = make_logits(real_shape, dtype, device, seed=seed)
            fake = make_logits(fake_shape, dtype, device, seed=seed + 1)
            check(impl, loss, kind, reduction, real, fake, real_label=label, seed=seed)


@pytest.mark.parametrize("impl,dtype,real_shape,fake_shape", _shape_params(DIFF_SHAPES))
def test_different_sizes(impl, dtype, real_shape, fake_shape):
    # mean: each term averages over its own tensor; the relativistic means are over whole tensors.
    device = impl_device(impl)
    for loss, kind, label in LOSS_CASES:
        for reduction in ("mean", "sum"):
            seed = _seed(real_shape, fake_shape, loss, kind, reduction)
            real = make_logits(real_shape, dtype, device, seed=seed)
            fake = make_logits(fake_shape, dtype, device, seed=seed + 1)
            check(impl, loss, kind, reduction, real, fake, real_label=label, seed=seed)


def _noncontiguous(t, layout):
    """A non-contiguous view with t's shape: a strided slice, reversed strides, or stride 0."""
    if layout == "step":  # every other row of a buffer twice as long
        buf = torch.zeros((2 * t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        buf[::2] = t
        out = buf[::2]
    elif layout == "expand":
        out = utils.make_noncontiguous(t, "expand")
    else:
        out = utils.make_noncontiguous(t, layout)
    assert not out.is_contiguous()
    return out


@pytest.mark.parametrize(
    "layout,shape",
    [
        ("step", (9,)),
        ("step", (9, 1)),
        ("slice", (9, 1)),
        ("transpose", (3, 1, 4, 5)),
        ("slice", (3, 1, 4, 5)),
        ("expand", (9, 1)),
        ("expand", (3, 1, 4, 5)),
    ],
    ids=lambda v: v if isinstance(v, str) else _sid(v),
)
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS))
def test_noncontiguous(impl, dtype, layout, shape):
    device = impl_device(impl)
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            seed = _seed(layout, shape, loss, kind, reduction)
            real = _noncontiguous(make_logits(shape, dtype, device, seed=seed), layout)
            fake = _noncontiguous(make_logits(shape, dtype, device, seed=seed + 1), layout)
            check(
                impl,
                loss,
                kind,
                reduction,
                real,
                fake,
                real_label=label,
                seed=seed,
                where=f"{loss} {kind} {reduction} {layout}",
            )


@pytest.mark.parametrize(
    "impl,dtype", impl_dtype_params(KERNEL_IMPLS, dtypes=(torch.float32, torch.float64, torch.float16))
)
def test_relativistic_none_cross_terms(impl, dtype):
    # With "none", loss_i = sp(-(r_i - mean f)) + sp(f_i - mean r): every loss_i depends on every
    # logit through the means, so grad_r = -g * a - sum(g * b) / n (a, b the sigmoids): the backward
    # needs the upstream gradient g in a reduction, it cannot only scale a saved gradient.
    device = impl_device(impl)
    real, fake = make_logits((33, 1), dtype, device, seed=1), make_logits((33, 1), dtype, device, seed=2)
    g = _upstream(real, real, fake, "none", 3)
    for loss in ("d", "g"):
        check(impl, loss, "relativistic", "none", real, fake, upstream=g, where=f"{loss} relativistic none")
    # The cross term is large here: a backward that dropped it would fail the check above.
    r64, f64 = real.double().requires_grad_(), fake.double()
    elementwise = torch.autograd.grad(
        reference.discriminator_loss(r64, f64.mean() + 0 * f64, "relativistic", reduction="none"), r64, g.double()
    )[0]
    full = torch.autograd.grad(
        reference.discriminator_loss(r64, f64, "relativistic", reduction="none"), r64, g.double()
    )[0]
    assert (full - elementwise).abs().max() > 0.01


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_none_upstream_layouts(impl):
    # loss.sum().backward() hands the op a stride-0 (expanded) gradient; (loss * w) a strided one.
    device = impl_device(impl)
    real, fake = (
        make_logits((12, 1), torch.float32, device, seed=4),
        make_logits((12, 1), torch.float32, device, seed=5),
    )
    w = _noncontiguous(make_logits((12, 1), torch.float32, device, seed=6), "step")
    for loss, kind, label in LOSS_CASES:
        for upstream in (torch.ones((), device=device).expand(12, 1), w):
            assert not upstream.is_contiguous()
            check(
                impl,
                loss,
                kind,
                "none",
                real,
                fake,
                real_label=label,
                upstream=upstream,
                where=f"{loss} {kind} none, upstream strides {upstream.stride()}",
            )


@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS, dtypes=(torch.float32, torch.bfloat16)))
def test_hinge_kink(impl, dtype):
    # At r = 1 and f = -1 the hinge terms are 0 and the reference's gradient is relu's subgradient 0.
    device = impl_device(impl)
    real = torch.tensor([1.0, 0.5, 2.0, 1.0], dtype=dtype, device=device)
    fake = torch.tensor([-1.0, -0.5, -2.0, -1.0], dtype=dtype, device=device)
    for reduction in REDUCTIONS:
        check(impl, "d", "hinge", reduction, real, fake, where=f"hinge kink {reduction}")


@pytest.mark.parametrize("impl", utils.IMPLS)
def test_generator_ignores_real_logits(impl):
    # Only the relativistic generator loss reads real_logits; the others ignore them (any shape/dtype).
    device = impl_device(impl)
    fake = make_logits((7, 1), torch.float32, device, seed=7)
    odd_real = torch.ones(3, dtype=torch.float16, device=device)
    for kind in KINDS:
        if kind == "relativistic":
            continue
        for reduction in REDUCTIONS:
            a = genkern.generator_loss(fake, kind, reduction=reduction, impl=impl)
            b = genkern.generator_loss(fake, kind, real_logits=odd_real, reduction=reduction, impl=impl)
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the backward: a scale of the saved gradient -----------------------------------------


@LOSS_PARAMS
@pytest.mark.parametrize("impl", utils.IMPLS)
def test_backward_scales_and_retains(impl, loss, kind, label):
    device = impl_device(impl)
    for reduction in REDUCTIONS:
        where = f"{loss} {kind} {reduction}"
        real, fake = (
            make_logits((6, 1), torch.float32, device, seed=8),
            make_logits((6, 1), torch.float32, device, seed=9),
        )
        leaves = [t.requires_grad_() for t in (real, fake)]
        out = _op(impl, loss, kind, reduction, *leaves, label)
        ones = torch.ones_like(out)
        base = torch.autograd.grad(out, leaves, ones, retain_graph=True, allow_unused=True)
        out.backward(3 * ones, retain_graph=True)  # e.g. loss.backward(torch.tensor(3.0))
        for b, x in zip(base, leaves):
            want = torch.zeros_like(x) if b is None else 3 * b
            got = torch.zeros_like(x) if x.grad is None else x.grad
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=f"{where}: 3x upstream")
        out.backward(ones)  # the second backward over the retained graph accumulates
        for b, x in zip(base, leaves):
            want = torch.zeros_like(x) if b is None else 4 * b
            got = torch.zeros_like(x) if x.grad is None else x.grad
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0, msg=f"{where}: second backward")


@pytest.mark.parametrize("kind", ("nonsaturating", "wasserstein", "relativistic"))
@pytest.mark.parametrize("impl", utils.IMPLS)
def test_retained_gradients_stay_put(impl, kind):
    # A gradient returned by a retain_graph backward belongs to the caller: a later backward over
    # the same graph (which may scale the saved gradients in place) must not change it.
    device = impl_device(impl)
    real = make_logits((6, 1), torch.float32, device, seed=20).requires_grad_()
    fake = make_logits((6, 1), torch.float32, device, seed=21).requires_grad_()
    out = genkern.discriminator_loss(real, fake, kind, impl=impl)
    first = torch.autograd.grad(out, (real, fake), retain_graph=True)
    copies = [g.clone() for g in first]
    second = torch.autograd.grad(out, (real, fake), torch.tensor(3.0, device=device))
    for a, c, b in zip(first, copies, second):
        torch.testing.assert_close(a, c, rtol=0, atol=0, msg=f"{kind}: the first gradient changed")
        torch.testing.assert_close(b, 3 * c, rtol=1e-6, atol=0)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_no_grad_and_detached_inputs(impl):
    device = impl_device(impl)
    real, fake = (
        make_logits((5, 1), torch.float32, device, seed=10),
        make_logits((5, 1), torch.float32, device, seed=11),
    )
    want = reference.discriminator_loss(real, fake, "relativistic")
    with torch.no_grad():
        out = genkern.discriminator_loss(real, fake, "relativistic", impl=impl)
    assert not out.requires_grad
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        torch.testing.assert_close(
            genkern.discriminator_loss(real, fake, "relativistic", impl=impl), want, rtol=1e-5, atol=1e-6
        )
    # Only one side requires grad (the usual D step: fake logits of a detached generator output).
    fake_leaf = fake.clone().requires_grad_()
    out = genkern.discriminator_loss(real, fake_leaf, "relativistic", impl=impl)
    out.backward()
    f64 = fake.double().requires_grad_()
    reference.discriminator_loss(real.double(), f64, "relativistic").backward()
    torch.testing.assert_close(fake_leaf.grad, f64.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ("nonsaturating", "least_squares", "relativistic", "wasserstein"))
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_double_backward_refused(impl, kind):
    # A gradient penalty on the loss (logits = w * x, penalty = |d loss / d x|^2, then d / d w)
    # differentiates the op's backward. The fused backward only scales a saved gradient, right to
    # first order only: create_graph=True must raise (the C++ and the Python autograd word it
    # alike), never silently drop the loss's second derivative. The forward and first-order
    # gradients are unaffected. impl="torch" differentiates twice: test_spec_double_backward.
    device = impl_device(impl)
    x = make_logits((5,), torch.float32, device, seed=12).requires_grad_()
    fake = make_logits((5,), torch.float32, device, seed=13)
    w = torch.tensor(1.3, device=device, requires_grad=True)
    out = genkern.discriminator_loss(w * x, fake, kind, impl=impl)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\)"):
        torch.autograd.grad(out, x, create_graph=True)
    (gx,) = torch.autograd.grad(genkern.discriminator_loss(w * x, fake, kind, impl=impl), x)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.discriminator_loss(1.3 * x64, fake.double(), kind), x64)
    torch.testing.assert_close(gx.double(), want, rtol=1e-5, atol=1e-6)


# --- constant gradients: returned 0-d by the kernels, expanded by the backward -----------

# (loss, kind) whose gradient is one value for every logit (genkern.ops.gan_loss.const_grads).
CONST_CASES = [("d", "wasserstein"), ("g", "wasserstein"), ("g", "hinge")]
CONST_IDS = [f"{loss}-{kind}" for loss, kind in CONST_CASES]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss,kind", CONST_CASES, ids=CONST_IDS)
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_constant_gradients(impl, loss, kind, reduction):
    # The kernels write no per-element gradient for these terms: the backward hands autograd a
    # stride-0 view of one value (as torch's sum() does). Users must not notice: the values are
    # right for every reduction, .grad accumulates over backward calls and is an ordinary,
    # writable tensor (an optimizer updates it in place).
    device = impl_device(impl)
    real = make_logits((33, 1), torch.float32, device, seed=60)
    fake = make_logits((3, 1, 11) if reduction != "none" else (33, 1), torch.float32, device, seed=61)
    check(impl, loss, kind, reduction, real, fake, seed=62, where=f"{loss} {kind} {reduction} constant gradient")

    leaves = [t.clone().requires_grad_() for t in (real, fake)]
    leaves64 = [t.double().requires_grad_() for t in (real, fake)]
    for step in range(2):  # the second backward adds to .grad
        out = _op(impl, loss, kind, reduction, *leaves)
        up = _upstream(out, real, fake, reduction, seed=63 + step)
        if reduction != "none" and impl != "torch":
            got = torch.autograd.grad(out, leaves[1], up, retain_graph=True)[0]
            assert got.shape == fake.shape and all(st == 0 for st in got.stride()), got.stride()
        out.backward(up)
        _reference(loss, kind, reduction, *leaves64).backward(up.double())
    for name, x, w in zip(("real", "fake"), leaves, leaves64):
        where = f"{loss} {kind} {reduction}: .grad of the {name} logits after two backward calls"
        if w.grad is None:
            assert x.grad is None or not bool(x.grad.any()), where
            continue
        assert x.grad.shape == x.shape and x.grad.stride() == x.stride(), f"{where}: strides {x.grad.stride()}"
        torch.testing.assert_close(x.grad.double(), w.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
        x.grad.mul_(0.5)  # writable, and no element aliases another
        torch.testing.assert_close(x.grad.double(), w.grad * 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", utils.KERNEL_IMPLS)
def test_fwd_op_constant_gradients(impl):
    # gan_loss_<family>_fwd returns the gradient of a constant-gradient term 0-d: its value
    # (1/N-scaled for "mean"), and 0 for real logits that a generator loss does not read.
    device = impl_device(impl)
    fwd = getattr(torch.ops.genkern, f"gan_loss_{impl}_fwd").default
    real, fake = (
        make_logits((8, 1), torch.float32, device, seed=64),
        make_logits((5, 1), torch.float32, device, seed=65),
    )
    w, h = KIND_CODE["wasserstein"], KIND_CODE["hinge"]
    cases = [  # (args, grad_real, grad_fake); None: a full gradient
        ((real, fake, w, RED_CODE["mean"], 1.0, False), -1 / 8, 1 / 5),
        ((real, fake, w, RED_CODE["sum"], 1.0, False), -1.0, 1.0),
        ((None, fake, w, RED_CODE["mean"], 1.0, True), "empty", -1 / 5),
        ((real, fake, h, RED_CODE["sum"], 1.0, True), 0.0, -1.0),
        ((real, fake, KIND_CODE["least_squares"], RED_CODE["mean"], 1.0, True), 0.0, None),
        ((real, fake, h, RED_CODE["mean"], 1.0, False), None, None),
        ((real, real, w, RED_CODE["none"], 1.0, False), -1.0, 1.0),
    ]
    for args, want_r, want_f in cases:
        _, g_r, g_f = fwd(*args)
        for got, want, x in ((g_r, want_r, args[0]), (g_f, want_f, args[1])):
            if want == "empty":
                assert got.shape == (0,)
            elif want is None:
                assert got.shape == x.shape
            else:
                assert got.shape == () and got.item() == pytest.approx(want, rel=1e-6), (args[2:], got)


# --- gradcheck, opcheck, torch.compile ------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@LOSS_PARAMS
@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_gradcheck(impl, loss, kind, label, reduction):
    real = make_logits((4,), torch.float64, seed=14, scale=1.5).requires_grad_()
    fake = make_logits((4,) if reduction == "none" else (3,), torch.float64, seed=15, scale=1.5).requires_grad_()
    if _uses_real(loss, kind):
        inputs = (real, fake)
        fn = lambda r, f: _op(impl, loss, kind, reduction, r, f, label)  # noqa: E731
    else:
        inputs = (fake,)
        fn = lambda f: _op(impl, loss, kind, reduction, None, f, label)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


KIND_CODE = {k: i for i, k in enumerate(KINDS)}
RED_CODE = {r: i for i, r in enumerate(REDUCTIONS)}


def _opcheck_samples(device, dtype, requires_grad):
    mk = lambda shape, seed: make_logits(shape, dtype, device, seed=seed).requires_grad_(requires_grad)  # noqa: E731
    samples = []
    for i, kind in enumerate(KINDS):  # every kind, discriminator and generator, mean
        samples.append((mk((8, 1), i), mk((5, 1), 10 + i), KIND_CODE[kind], RED_CODE["mean"], 1.0, False))
        real = mk((8, 1), 20 + i) if kind == "relativistic" else None
        samples.append((real, mk((5, 1), 30 + i), KIND_CODE[kind], RED_CODE["mean"], 1.0, True))
    samples += [
        (mk((7,), 40), mk((2, 1, 3, 3), 41), KIND_CODE["nonsaturating"], RED_CODE["sum"], 0.9, False),
        (mk((6, 1), 42), mk((6, 1), 43), KIND_CODE["hinge"], RED_CODE["none"], 1.0, False),
        (mk((6, 1), 44), mk((6, 1), 45), KIND_CODE["relativistic"], RED_CODE["none"], 1.0, False),
        (mk((6, 1), 46), mk((6, 1), 47), KIND_CODE["relativistic"], RED_CODE["none"], 1.0, True),
        (None, mk((2, 1, 4, 4), 48), KIND_CODE["least_squares"], RED_CODE["none"], 1.0, True),
        (mk((4, 3), 49).t(), mk((4, 3), 50).t(), KIND_CODE["minimax"], RED_CODE["none"], 0.9, False),
        # constant gradients (0-d from the kernels) for every reduction; unused real logits
        (mk((7,), 51), mk((2, 1, 3, 3), 52), KIND_CODE["wasserstein"], RED_CODE["sum"], 1.0, False),
        (mk((6, 1), 53), mk((6, 1), 54), KIND_CODE["wasserstein"], RED_CODE["none"], 1.0, False),
        (None, mk((2, 1, 4, 4), 55), KIND_CODE["hinge"], RED_CODE["none"], 1.0, True),
        (mk((3, 1), 56), mk((5, 1), 57), KIND_CODE["hinge"], RED_CODE["sum"], 1.0, True),
    ]
    return samples


@pytest.mark.parametrize("impl,dtype", impl_dtype_params(utils.KERNEL_IMPLS, dtypes=(torch.float32, torch.float16)))
def test_opcheck(impl, dtype):
    device = impl_device(impl)
    fwd = getattr(torch.ops.genkern, f"gan_loss_{impl}_fwd").default  # the kernel op, differentiable
    for requires_grad in (False, True):
        for args in _opcheck_samples(device, dtype, requires_grad=requires_grad):
            torch.library.opcheck(fwd, args)


def _compile_fn(impl):
    def fn(real, fake):
        d = genkern.discriminator_loss(real, fake, "nonsaturating", real_label=0.9, impl=impl)
        d_none = genkern.discriminator_loss(real, fake, "relativistic", reduction="none", impl=impl)
        g = genkern.generator_loss(fake, "relativistic", real_logits=real, impl=impl)
        g_sum = genkern.generator_loss(fake, "least_squares", reduction="sum", impl=impl)
        # constant gradients: expanded to the (possibly symbolic) logits' shapes in the backward
        w = genkern.discriminator_loss(real, fake, "wasserstein", impl=impl)
        g_hinge = genkern.generator_loss(fake, "hinge", reduction="sum", impl=impl)
        return d + g + w, d_none * 2 + 1, g_sum + g_hinge

    return fn


def _check_compiled_equals_eager(impl, device, dynamic=None, n=16):
    torch._dynamo.reset()
    fn = _compile_fn(impl)
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for size in (n, n + 7) if dynamic else (n,):
        _compare_compiled(fn, compiled, device, size)


def _compare_compiled(fn, compiled, device, n):
    real, fake = (
        make_logits((n, 1), torch.float32, device, seed=51),
        make_logits((n, 1), torch.float32, device, seed=52),
    )
    w = make_logits((n, 1), torch.float32, device, seed=53)
    results = []
    for run in (fn, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (real, fake)]
        out = run(*leaves)
        (out[0] * 3 + (out[1] * w).sum() + out[2]).backward()
        results.append((out, [t.grad for t in leaves]))
    (eager, eager_g), (comp, comp_g) = results
    for e, c in zip(eager + tuple(eager_g), comp + tuple(comp_g)):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_torch_compile_fullgraph_cpp():
    utils.require_impl("cpp")
    _check_compiled_equals_eager("cpp", torch.device("cpu"))


def test_torch_compile_dynamic_shapes_cpp():
    # Batch sizes vary in training (the last batch of an epoch): dynamic shapes, forward and backward.
    utils.require_impl("cpp")
    _check_compiled_equals_eager("cpp", torch.device("cpu"), dynamic=True)


def test_compiled_autograd_cpp():
    # torch._dynamo.compiled_autograd records the backward node as one opaque call: the same
    # gradients as eager, for full, constant (0-d) and relativistic-"none" saved gradients,
    # dynamic sizes included.
    utils.require_impl("cpp")
    from torch._dynamo import compiled_autograd

    cases = [
        ("d", "nonsaturating", "mean"),
        ("d", "wasserstein", "mean"),
        ("g", "hinge", "sum"),
        ("d", "relativistic", "none"),
        ("g", "wasserstein", "none"),
    ]
    torch._dynamo.reset()
    for loss, kind, reduction in cases:
        for n in (5, 9):  # a second size: a recompile with dynamic shapes
            real = make_logits((n, 1), torch.float32, seed=70 + n)
            fake = make_logits((n, 1), torch.float32, seed=80 + n)
            grads = []
            for compiled in (False, True):
                leaves = [t.clone().requires_grad_() for t in (real, fake)]
                ctx = (
                    compiled_autograd._enable(torch.compile(backend="aot_eager", dynamic=True))
                    if compiled
                    else contextlib.nullcontext()
                )
                with ctx:
                    (_op("cpp", loss, kind, reduction, *leaves) * 1.5).sum().backward()
                grads.append([t.grad for t in leaves])
            for e, c in zip(*grads):
                assert (e is None) == (c is None), f"{loss} {kind} {reduction}"
                if e is not None:
                    torch.testing.assert_close(
                        c, e, rtol=1e-6, atol=1e-7, msg=lambda m: f"{loss} {kind} {reduction}: {m}"
                    )
    torch._dynamo.reset()


# --- numerics ---------------------------------------------------------------------------


def _extreme_logits(dtype, device):
    """(real, fake): 64 logits up to +-1e4 (softplus(+-1e4), sigmoid(+-1e4): a naive log(1 + exp(x))
    or e / (1 + e) gives inf / NaN). Skewed to positive real and negative fake logits: the sums do
    not cancel (a float32 sum of +-1e4 terms that cancels to ~0 is off by ~1e-4 in any impl)."""
    n = 64
    vals = torch.cat(
        [
            torch.tensor([1e4, -1e4, 9999.0, -9999.0, 20.0, -20.0, 88.0, -88.0, 89.0, -89.0]),
            torch.linspace(-1e4, 1e4, 20),
            torch.linspace(5e3, 1e4, n - 30),
        ]
    ).double()
    real = vals[torch.randperm(n, generator=torch.Generator().manual_seed(1))].to(dtype).to(device)
    fake = -vals[torch.randperm(n, generator=torch.Generator().manual_seed(2))].to(dtype).to(device)
    return real, fake


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_float32_extreme_logits(impl):
    real, fake = _extreme_logits(torch.float32, impl_device(impl))
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            out = check(
                impl, loss, kind, reduction, real, fake, real_label=label, where=f"{loss} {kind} {reduction} +-1e4"
            )
            assert bool(torch.isfinite(out).all())


def _float16_range_logits(device):
    """(real, fake) across float16's range, and the same / 1024 (up to +-64: finite losses,
    near-saturated sigmoids)."""
    n = 128
    vals = torch.cat(
        [
            torch.tensor([65504.0, -65504.0, 60000.0, -60000.0, 11.0, -11.0, 1e-4, -1e-4]),
            torch.linspace(-65504, 65504, n - 8),
        ]
    ).double()
    real = vals[torch.randperm(n, generator=torch.Generator().manual_seed(3))].half().to(device)
    fake = vals[torch.randperm(n, generator=torch.Generator().manual_seed(4))].half().to(device)
    return real, fake, real / 1024, fake / 1024


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_float16_range(impl):
    # Logits across float16's range: where the float64 loss (or gradient) rounds to inf in float16
    # the result must be inf as well, elsewhere finite and by the rule (assert_close_rule).
    real, fake, small_real, small_fake = _float16_range_logits(impl_device(impl))
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            for r, f, what in ((real, fake, "full range"), (small_real, small_fake, "+-64")):
                check(
                    impl,
                    loss,
                    kind,
                    reduction,
                    r,
                    f,
                    real_label=label,
                    where=f"{loss} {kind} {reduction} float16 {what}",
                )


def check_float16_loss_scaling(impl, n, device, loss_cases=LOSS_CASES):
    """AMP scales the loss so that small float16 gradients survive: with "mean" over n = 2^16 logits
    each gradient is d/n before the upstream scale, below float16's normal range (6.1e-5). A
    gradient rounded to float16 before the scale is applied keeps only a few bits there; torch
    applies the scale in float32 and rounds once. Each gradient must be as accurate, relative
    to itself, as plain PyTorch's: at most 2x its relative error plus float16's epsilon."""
    real = make_logits((n, 1), torch.float16, device, seed=16)
    fake = make_logits((n, 1), torch.float16, device, seed=17)
    up = torch.tensor(32768.0, dtype=torch.float16, device=device)  # 2^15: 2^16 overflows float16
    for loss, kind, label in loss_cases:
        where = f"{loss} {kind} mean float16 n={n} upstream 2^15"
        check(impl, loss, kind, "mean", real, fake, real_label=label, upstream=up, where=where)
        leaves = [t.clone().requires_grad_() for t in (real, fake)]
        got = torch.autograd.grad(_op(impl, loss, kind, "mean", *leaves, label), leaves, up, allow_unused=True)
        l64 = [t.double().requires_grad_() for t in (real, fake)]
        want = torch.autograd.grad(_reference(loss, kind, "mean", *l64, label), l64, up.double(), allow_unused=True)
        ls = [t.clone().requires_grad_() for t in (real, fake)]
        same = torch.autograd.grad(_reference(loss, kind, "mean", *ls, label), ls, up, allow_unused=True)
        for name, g, w, s in zip(("real", "fake"), got, want, same):
            if w is None:
                continue
            ok = w.abs() > 1e-3  # relative errors of the gradients that are normal float16 numbers
            rel = ((g.double() - w).abs() / w.abs())[ok]
            rel_same = ((s.double() - w).abs() / w.abs())[ok]
            allowed = 2 * rel_same.max().item() + torch.finfo(torch.float16).eps
            i = int(rel.argmax())
            assert rel.max().item() <= allowed, (
                f"{where}: grad {name} relative error {rel.max().item():.2e} > {allowed:.2e} at "
                f"{g.double()[ok][i].item()!r} (reference {w[ok][i].item()!r})"
            )


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_float16_mean_gradient_under_loss_scaling(impl):
    # The interpreter takes ~1.5 s a call at 2^16 logits: two cases there (the GPU test runs them all).
    cases = [("d", "nonsaturating", 1.0), ("g", "relativistic", 1.0)] if utils.interpreted(impl) else LOSS_CASES
    check_float16_loss_scaling(impl, 1 << 16, impl_device(impl), cases)


def _nan_at(t, index):
    t = t.clone()
    t.view(-1)[index] = float("nan")
    return t


@pytest.mark.parametrize("impl,dtype", impl_dtype_params(dtypes=(torch.float32, torch.float16)))
def test_nan_propagates(impl, dtype):
    device = impl_device(impl)
    real, fake = make_logits((6, 1), dtype, device, seed=18), make_logits((6, 1), dtype, device, seed=19)
    for loss, kind, label in LOSS_CASES:
        for where_nan in ("real", "fake"):
            r = _nan_at(real, 2) if where_nan == "real" else real
            f = _nan_at(fake, 4) if where_nan == "fake" else fake
            reads_nan = where_nan == "fake" or _uses_real(loss, kind)
            for reduction in REDUCTIONS:
                what = f"{loss} {kind} {reduction}, NaN in {where_nan}"
                out = _op(impl, loss, kind, reduction, r, f, label).cpu()
                want = _reference(loss, kind, reduction, r.double(), f.double(), label).cpu()
                assert torch.equal(torch.isnan(out), torch.isnan(want)), f"{what}: NaN at {torch.isnan(out)}"
                if reduction != "none":
                    assert bool(torch.isnan(out)) == reads_nan, f"{what}: loss {out.item()}"


# --- the spec against independent formulas ------------------------------------------------
# impl="torch" is genkern.reference: comparing it with the reference proves nothing. Here it
# meets every kind, both sides and every reduction written out per element in float64 as the
# textbook losses (log sigmoid, relu, squares; no F.softplus), with gradients derived by hand
# (utils.assert_matches_formula holds each dtype to its rounding).


def _sigmoid(x):
    e = torch.exp(-x.abs())  # never overflows
    return torch.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _log_sigmoid(x):
    return x.clamp(max=0) - torch.log1p(torch.exp(-x.abs()))  # min(x, 0) - log(1 + e^-|x|)


def _separable_terms(loss, kind, r, f, label):
    """((real term, d/dr) or None, (fake term, d/df)) per element, float64."""
    one = torch.ones_like
    if loss == "g":
        fake = {
            "nonsaturating": (-_log_sigmoid(f), _sigmoid(f) - 1),  # -log sigmoid(f)
            "minimax": (_log_sigmoid(-f), -_sigmoid(f)),  # log(1 - sigmoid(f))
            "hinge": (-f, -one(f)),
            "wasserstein": (-f, -one(f)),
            "least_squares": ((f - 1) ** 2 / 2, f - 1),
        }[kind]
        return None, fake
    if kind in LABEL_KINDS:  # -(l log sigmoid(r) + (1 - l) log(1 - sigmoid(r))), -log(1 - sigmoid(f))
        real = (-(label * _log_sigmoid(r) + (1 - label) * _log_sigmoid(-r)), _sigmoid(r) - label)
        return real, (-_log_sigmoid(-f), _sigmoid(f))
    return {
        "hinge": (((1 - r).clamp(min=0), -(r < 1).double()), ((1 + f).clamp(min=0), (f > -1).double())),
        "wasserstein": ((-r, -one(r)), (f, one(f))),
        "least_squares": (((r - 1) ** 2 / 2, r - 1), (f**2 / 2, f)),
    }[kind]


def _reduce(real, fake, reduction, g):
    """Loss and per-element gradients of the separable kinds: mean averages each term over its own tensor."""
    wr, wf = (g, g) if reduction != "mean" else (g / (1 if real is None else real[0].numel()), g / fake[0].numel())
    if reduction == "none":
        value = fake[0] + (0 if real is None else real[0])
    else:
        value = fake[0].sum() * (wf / g) + (0 if real is None else real[0].sum() * (wr / g))
    return value, None if real is None else wr * real[1], wf * fake[1]


def _relativistic(x, y, reduction, g):
    """-log sigmoid(x - mean y) over x plus -log(1 - sigmoid(y - mean x)) over y, and the gradients.

    With weights a_i, b_j (g / n for mean, g for sum, g_i for none): d/dx_k = -a_k sigmoid(-(x_k - my))
    - sum_j b_j sigmoid(y_j - mx) / nx and d/dy_k = b_k sigmoid(y_k - mx) + sum_i a_i sigmoid(-(x_i - my)) / ny.
    """
    mx, my = x.sum() / x.numel(), y.sum() / y.numel()
    tx, ty = -_log_sigmoid(x - my), -_log_sigmoid(-(y - mx))
    a = g / x.numel() if reduction == "mean" else g
    b = g / y.numel() if reduction == "mean" else g
    sx, sy = _sigmoid(-(x - my)), _sigmoid(y - mx)
    gx = -a * sx - (b * sy).sum() / x.numel()
    gy = b * sy + (a * sx).sum() / y.numel()
    if reduction == "none":
        return tx + ty, gx, gy
    return (a / g) * tx.sum() + (b / g) * ty.sum() if reduction == "mean" else tx.sum() + ty.sum(), gx, gy


def formula_gan_loss(loss, kind, reduction, real, fake, label, upstream):
    """(loss, grad real or None, grad fake) in float64; upstream is the gradient of the loss."""
    r = None if real is None else real.detach().double().cpu()
    f, g = fake.detach().double().cpu(), upstream.detach().double().cpu()
    if kind == "relativistic":  # the generator's is the discriminator's with real and fake exchanged
        if loss == "d":
            return _relativistic(r, f, reduction, g)
        value, gf, gr = _relativistic(f, r, reduction, g)
        return value, gr, gf
    return _reduce(*_separable_terms(loss, kind, r, f, label), reduction, g)


def check_spec(loss, kind, reduction, real, fake, *, real_label=1.0, upstream=None, seed=0, where=""):
    """impl="torch" once, forward and backward, against formula_gan_loss."""
    where = where or f"{loss} {kind} {reduction} {real.dtype} real {tuple(real.shape)} fake {tuple(fake.shape)}"
    r, f = real.detach().requires_grad_(), fake.detach().requires_grad_()
    out = _op("torch", loss, kind, reduction, r, f, real_label)
    assert out.shape == (fake.shape if reduction == "none" else ()) and out.dtype == fake.dtype, where
    g = _upstream(out, r, f, reduction, seed + 1) if upstream is None else upstream
    got = torch.autograd.grad(out, (r, f), g, allow_unused=True)
    used_real = real if _uses_real(loss, kind) else None
    value, want_r, want_f = formula_gan_loss(loss, kind, reduction, used_real, f, real_label, g)
    assert_matches_formula(out, value, name=f"{where}: loss")
    assert_matches_formula(got[1], want_f, name=f"{where}: grad fake")
    if want_r is None:
        assert got[0] is None or not bool(got[0].any()), f"{where}: a gradient for unused real logits"
    else:
        assert_matches_formula(got[0], want_r, name=f"{where}: grad real")
    return out


SPEC_DTYPES = [pytest.param(dt, id=str(dt).replace("torch.", "")) for dt in utils.ALL_DTYPES]


@pytest.mark.parametrize("reduction,shapes", [(r, "same") for r in REDUCTIONS] + [("mean", "diff"), ("sum", "diff")])
@LOSS_PARAMS
@pytest.mark.parametrize("dtype", SPEC_DTYPES)
def test_spec_values_and_grads(dtype, loss, kind, label, reduction, shapes):
    real_shape, fake_shape = ((64, 1), (64, 1)) if shapes == "same" else ((64, 1), (3, 1, 4, 5))
    seed = _seed("torch", str(dtype), loss, kind, reduction, shapes)
    real, fake = make_logits(real_shape, dtype, seed=seed), make_logits(fake_shape, dtype, seed=seed + 1)
    check_spec(loss, kind, reduction, real, fake, real_label=label, seed=seed)


@pytest.mark.parametrize("dtype", SPEC_DTYPES)
def test_spec_shapes(dtype):
    # Every shape of the kernel tests, real and fake of one shape and of different sizes.
    pairs = [(s, s, REDUCTIONS) for s in SAME_SHAPES] + [(a, b, ("mean", "sum")) for a, b in DIFF_SHAPES]
    for real_shape, fake_shape, reductions in pairs:
        for loss, kind, label in LOSS_CASES:
            for reduction in reductions:
                seed = _seed(real_shape, fake_shape, loss, kind, reduction)
                real, fake = make_logits(real_shape, dtype, seed=seed), make_logits(fake_shape, dtype, seed=seed + 1)
                check_spec(loss, kind, reduction, real, fake, real_label=label, seed=seed)


def test_spec_layouts_and_upstreams():
    # Non-contiguous logits, stride-0 and strided upstream gradients, the hinge kinks (subgradient 0).
    real, fake = make_logits((12, 1), torch.float32, seed=4), make_logits((12, 1), torch.float32, seed=5)
    w = _noncontiguous(make_logits((12, 1), torch.float32, seed=6), "step")
    for loss, kind, label in LOSS_CASES:
        for upstream in (torch.ones(()).expand(12, 1), w):
            check_spec(loss, kind, "none", real, fake, real_label=label, upstream=upstream)
        for layout in ("step", "transpose", "expand"):
            r, f = (_noncontiguous(make_logits((3, 1, 4, 5), torch.float32, seed=s), layout) for s in (7, 8))
            for reduction in REDUCTIONS:
                check_spec(loss, kind, reduction, r, f, real_label=label, where=f"{loss} {kind} {reduction} {layout}")
    kink_real, kink_fake = torch.tensor([1.0, 0.5, 2.0, 1.0]), torch.tensor([-1.0, -0.5, -2.0, -1.0])
    for dtype in (torch.float32, torch.bfloat16):
        for reduction in REDUCTIONS:
            check_spec("d", "hinge", reduction, kink_real.to(dtype), kink_fake.to(dtype), where=f"kink {reduction}")


def test_spec_extremes():
    # Logits up to +-1e4 in float32 and float64 (finite everywhere), float16 across its range (inf where
    # the formula rounds to inf), float16 "mean" over 2^16 logits under a 2^15 loss scale (AMP).
    for dtype in (torch.float32, torch.float64):
        real, fake = _extreme_logits(dtype, "cpu")
        for loss, kind, label in LOSS_CASES:
            for reduction in REDUCTIONS:
                where = f"{loss} {kind} {reduction} +-1e4 {dtype}"
                out = check_spec(loss, kind, reduction, real, fake, real_label=label, where=where)
                assert bool(torch.isfinite(out).all())
    # float64 across softplus's linear tail (|x| in 20..40): log(1 + e^-|x|) is still above float64's ulp.
    tail = torch.linspace(-40, 40, 33, dtype=torch.float64)
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            check_spec(loss, kind, reduction, tail, -tail.flip(0), real_label=label, where=f"{loss} {kind} +-40")
    cases = _float16_range_logits("cpu")
    scaled = (make_logits((1 << 16, 1), torch.float16, seed=16), make_logits((1 << 16, 1), torch.float16, seed=17))
    up = torch.tensor(32768.0, dtype=torch.float16)
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            for r, f in (cases[:2], cases[2:]):
                where = f"{loss} {kind} {reduction} float16 range"
                check_spec(loss, kind, reduction, r, f, real_label=label, where=where)
        check_spec(loss, kind, "mean", *scaled, real_label=label, upstream=up)


@LOSS_PARAMS
def test_spec_double_backward(loss, kind, label):
    # impl="torch" differentiates twice (a gradient penalty on the loss): second derivatives
    # against finite differences of the first, in float64.
    real = make_logits((4,), torch.float64, seed=14, scale=1.5).requires_grad_()
    for reduction in REDUCTIONS:
        fake = make_logits((4,) if reduction == "none" else (3,), torch.float64, seed=15, scale=1.5).requires_grad_()
        if _uses_real(loss, kind):
            inputs, fn = (real, fake), lambda r, f: _op("torch", loss, kind, reduction, r, f, label)  # noqa: E731
        else:
            inputs, fn = (fake,), lambda f: _op("torch", loss, kind, reduction, None, f, label)  # noqa: E731
        assert torch.autograd.gradgradcheck(fn, inputs)


# --- bad input --------------------------------------------------------------------------


def _bad_cases():
    x = lambda *s: torch.randn(*s)  # noqa: E731
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    i64 = lambda *s: torch.ones(*s, dtype=torch.int64)  # noqa: E731
    cases = [
        ("d-kind", "d", dict(kind="vanilla"), ValueError, "kind"),
        ("d-kind-None", "d", dict(kind=None), ValueError, "kind"),
        ("d-kind-case", "d", dict(kind="Hinge"), ValueError, "kind"),
        ("d-reduction", "d", dict(reduction="avg"), ValueError, "reduction"),
        ("d-reduction-None", "d", dict(reduction=None), ValueError, "reduction"),
        ("d-real-empty", "d", dict(real=x(0, 1)), ValueError, "real_logits"),
        ("d-fake-empty", "d", dict(fake=x(0)), ValueError, "fake_logits"),
        ("d-real-int", "d", dict(real=i64(4, 1)), TypeError, "real_logits"),
        ("d-fake-int", "d", dict(fake=torch.ones(4, 1, dtype=torch.int32)), TypeError, "fake_logits"),
        ("d-both-int", "d", dict(real=i64(4, 1), fake=i64(4, 1)), TypeError, "fake_logits"),
        ("d-fake-bool", "d", dict(fake=torch.ones(4, 1, dtype=torch.bool)), TypeError, "fake_logits"),
        ("d-real-complex", "d", dict(real=torch.ones(4, 1, dtype=torch.complex64)), TypeError, "real_logits"),
        ("d-real-float64", "d", dict(real=x(4, 1).double()), TypeError, "real_logits"),
        ("d-real-float16", "d", dict(real=x(4, 1).half()), TypeError, "real_logits"),
        ("d-real-meta", "d", dict(real=meta(4, 1)), ValueError, "real_logits"),
        ("d-none-shape", "d", dict(real=x(4, 1), fake=x(4), reduction="none"), ValueError, "shape"),
        ("d-none-size", "d", dict(real=x(4, 1), fake=x(5, 1), reduction="none"), ValueError, "shape"),
        ("d-real-list", "d", dict(real=[[0.5]] * 4), TypeError, "real_logits"),
        ("d-fake-float", "d", dict(fake=0.5), TypeError, "fake_logits"),
        ("d-real_label-None", "d", dict(real_label=None), TypeError, "real_label"),
        ("g-kind", "g", dict(kind="vanilla"), ValueError, "kind"),
        ("g-reduction", "g", dict(reduction="avg"), ValueError, "reduction"),
        ("g-relativistic-no-real", "g", dict(kind="relativistic"), ValueError, "real_logits"),
        ("g-relativistic-real-empty", "g", dict(kind="relativistic", real=x(0)), ValueError, "real_logits"),
        ("g-relativistic-real-dtype", "g", dict(kind="relativistic", real=x(4, 1).double()), TypeError, "real_logits"),
        ("g-relativistic-real-int", "g", dict(kind="relativistic", real=i64(4, 1)), TypeError, "real_logits"),
        ("g-relativistic-real-meta", "g", dict(kind="relativistic", real=meta(4, 1)), ValueError, "real_logits"),
        (
            "g-relativistic-none-shape",
            "g",
            dict(kind="relativistic", real=x(5, 1), reduction="none"),
            ValueError,
            "shape",
        ),
        ("g-fake-empty", "g", dict(fake=x(0, 1)), ValueError, "fake_logits"),
        ("g-fake-int", "g", dict(fake=i64(4, 1)), TypeError, "fake_logits"),
        ("g-fake-list", "g", dict(fake=[0.5, 1.0]), TypeError, "fake_logits"),
    ]
    cases += [
        (f"d-real_label-{k}", "d", dict(kind=k, real_label=0.9), ValueError, "real_label")
        for k in KINDS
        if k not in LABEL_KINDS
    ]
    return cases


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("impl", utils.IMPLS)
def test_bad_input(impl, case):
    _, loss, kw, exc, name = case
    dev = impl_device(impl)
    args = dict(real=torch.randn(4, 1), fake=torch.randn(4, 1), kind="nonsaturating", reduction="mean", real_label=1.0)
    if loss == "g":
        args["real"] = None
    args.update(kw)
    args = {k: v.to(dev) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in args.items()}
    with pytest.raises(exc, match=rf"\b{name}\b"):
        if loss == "d":
            genkern.discriminator_loss(
                args["real"],
                args["fake"],
                args["kind"],
                reduction=args["reduction"],
                real_label=args["real_label"],
                impl=impl,
            )
        else:
            genkern.generator_loss(
                args["fake"], args["kind"], real_logits=args["real"], reduction=args["reduction"], impl=impl
            )


def test_unknown_kind_lists_the_kinds():
    x = torch.randn(3)
    for call in (
        lambda: genkern.discriminator_loss(x, x, "vanilla"),
        lambda: genkern.generator_loss(x, "wgan"),
        lambda: genkern.nn.GANLoss("vanilla"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert all(k in str(info.value) for k in KINDS), str(info.value)


def test_bogus_impl():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="impl"):
        genkern.discriminator_loss(x, x, impl="bogus")
    with pytest.raises(ValueError, match="impl"):
        genkern.generator_loss(x, impl="cuda")


def test_triton_float64_unavailable():
    utils.require_impl("triton")
    x = torch.randn(4, dtype=torch.float64, device=impl_device("triton"))
    with pytest.raises(genkern.ImplUnavailableError, match="float64"):
        genkern.discriminator_loss(x, x, impl="triton")
    with pytest.raises(genkern.ImplUnavailableError, match="float64"):
        genkern.generator_loss(x, impl="triton")


def test_cpp_on_meta_unavailable():
    utils.require_impl("cpp")
    x = torch.empty(4, device="meta")
    with pytest.raises(genkern.ImplUnavailableError, match="CPU"):
        genkern.discriminator_loss(x, x, "hinge", impl="cpp")
    with pytest.raises(genkern.ImplUnavailableError, match="CPU"):
        genkern.generator_loss(x, "hinge", impl="cpp")


_UNAVAILABLE = textwrap.dedent("""
    import torch, genkern
    x = torch.randn(4, 1)
    for call in (lambda: genkern.discriminator_loss(x, x, impl={impl!r}),
                 lambda: genkern.generator_loss(x, "relativistic", real_logits=x, impl={impl!r})):
        try:
            call()
        except genkern.ImplUnavailableError as e:
            print("UNAVAILABLE:", e)
""")


@pytest.mark.skipif(utils.HAS_CUDA, reason="the interpreter-less CPU case; on a GPU CPU tensors are refused anyway")
def test_triton_without_interpreter_unavailable():
    utils.require_impl("triton")
    r = utils.run_python(_UNAVAILABLE.format(impl="triton"), {"TRITON_INTERPRET": None})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("UNAVAILABLE:") == 2 and "TRITON_INTERPRET" in r.stdout, r.stdout + r.stderr


def test_cpp_disabled_unavailable():
    r = utils.run_python(_UNAVAILABLE.format(impl="cpp"), {"GENKERN_DISABLE_CPP": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("UNAVAILABLE:") == 2 and "GENKERN_DISABLE_CPP" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("impl", utils.KERNEL_IMPLS)
def test_raw_op_checks_arguments(impl):
    # torch.ops.genkern.* are public too: the kernels check before touching memory.
    dev = impl_device(impl)
    fwd = getattr(torch.ops.genkern, f"gan_loss_{impl}_fwd").default
    x, y = torch.randn(4, 1, device=dev), torch.randn(4, 1, device=dev)
    errors = (ValueError, TypeError, RuntimeError)
    bad = [
        ("kind 6", (x, y, 6, 0, 1.0, False)),
        ("kind -1", (x, y, -1, 0, 1.0, False)),
        ("reduction 3", (x, y, 0, 3, 1.0, False)),
        ("none, other shape", (x, torch.randn(5, 1, device=dev), 0, 2, 1.0, False)),
        ("none, other layout of shape", (x, torch.randn(4, device=dev), 5, 2, 1.0, False)),
        ("discriminator without real", (None, y, 0, 0, 1.0, False)),
        ("relativistic generator without real", (None, y, 5, 0, 1.0, True)),
        ("dtype mismatch", (x.double(), y, 0, 0, 1.0, False)),
        ("integer logits", (x.long(), y.long(), 0, 0, 1.0, False)),
    ]
    for what, args in bad:
        with pytest.raises(errors):
            fwd(*args)
            pytest.fail(f"{what}: no error")  # reached only when fwd did not raise


# --- GPU (Triton on CUDA) -----------------------------------------------------------------

GPU_SHAPES = [
    ((1 << 20, 1), (1 << 20, 1)),
    ((64, 1, 30, 30), (64, 1, 30, 30)),
    ((4097,), (4097,)),
    ((4096, 1), (300, 1)),
    ((5, 1, 33, 65), (1 << 17,)),
    ((1,), (70001, 1)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("real_shape,fake_shape", GPU_SHAPES, ids=[f"{_sid(a)}-{_sid(b)}" for a, b in GPU_SHAPES])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_triton_large(dtype, real_shape, fake_shape):
    utils.require_impl("triton")
    for loss, kind, label in LOSS_CASES:
        for reduction in REDUCTIONS:
            if reduction == "none" and real_shape != fake_shape:
                continue
            seed = _seed(real_shape, fake_shape, loss, kind, reduction)
            real = make_logits(real_shape, dtype, "cuda", seed=seed)
            fake = make_logits(fake_shape, dtype, "cuda", seed=seed + 1)
            check("triton", loss, kind, reduction, real, fake, real_label=label, seed=seed)


@pytest.mark.gpu
def test_gpu_float16_mean_gradient_under_loss_scaling():
    utils.require_impl("triton")
    check_float16_loss_scaling("triton", 1 << 16, "cuda")


@pytest.mark.gpu
def test_gpu_auto_is_triton():
    utils.require_impl("triton")
    assert utils._dispatch.resolve("auto", torch.device("cuda"), torch.float32, "discriminator_loss") == "triton"
    real, fake = (
        make_logits((100, 1), torch.float32, "cuda", seed=1),
        make_logits((100, 1), torch.float32, "cuda", seed=2),
    )
    check("auto", "d", "hinge", "mean", real, fake)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_opcheck(dtype):
    utils.require_impl("triton")
    for rg in (False, True):
        for args in _opcheck_samples(torch.device("cuda"), dtype, requires_grad=rg):
            torch.library.opcheck(torch.ops.genkern.gan_loss_triton_fwd.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", REDUCTIONS)
@LOSS_PARAMS
def test_gpu_no_host_sync(loss, kind, label, reduction):
    utils.require_impl("triton")
    real = make_logits((70000, 1), torch.float32, "cuda", seed=1).requires_grad_()
    fake = make_logits((70000, 1), torch.float32, "cuda", seed=2).requires_grad_()
    up = torch.randn(70000, 1, device="cuda") if reduction == "none" else torch.full((), 2.0, device="cuda")
    _op("triton", loss, kind, reduction, real, fake, label).backward(up)  # warm-up: compile, allocate
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = _op("triton", loss, kind, reduction, real, fake, label)
        out.backward(up)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_triton():
    utils.require_impl("triton")
    _check_compiled_equals_eager("triton", torch.device("cuda"))


# --- the benchmark cases (genkern.bench.gan_loss) ---------------------------------------------


def test_bench_cases_and_labels():
    from genkern.bench import gan_loss as bench
    from genkern.bench import select_cases

    names = [c.name for c in bench.CASES]
    assert len(names) == len(set(names)) == 8 * 5
    assert {c.kind for c in bench.CASES if c.loss == "d"} == set(KINDS)
    for c in bench.CASES:
        again = bench.make_case(c.name)  # every case name is a --sizes label
        assert (again.loss, again.kind, again.shape) == (c.loss, c.kind, c.shape)
    assert [c.name for c in select_cases("gan_loss", quick=True)] == ["d-nonsaturating-256x1"]
    for bad in ("8x16", "8-by-16", "d-vanilla-8x1", "x-hinge-8x1", "d-hinge-8x0", "d-hinge-"):
        with pytest.raises(ValueError, match="gan_loss"):
            bench.make_case(bad)
    case = bench.make_case("g-nonsaturating-4x1")  # reads fake only: 4 floats in, 4 grads out
    assert case.grad_inputs == ("fake",)
    assert (case.bytes_moved("fwd"), case.bytes_moved("bwd"), case.bytes_moved("fwd+bwd")) == (16, 32, 32)


@pytest.mark.parametrize("label", ("d-relativistic-8x1", "g-relativistic-2x1x3x3", "d-hinge-5"))
def test_bench_case_runs(label):
    from genkern.bench import COMPILE, runner
    from genkern.bench import gan_loss as bench

    case = bench.make_case(label)
    inputs = case.make_inputs("cpu")
    want = case.impl_fn("torch")(inputs)[0]
    for impl in ("cpp", COMPILE):
        torch.testing.assert_close(case.impl_fn(impl)(inputs)[0], want, rtol=1e-5, atol=1e-6)
    entry = runner.bench_case(case, "fwd+bwd", torch.device("cpu"), ["torch", "cpp"], budget_s=0.0, max_rounds=3)
    assert {r["status"] for r in entry["impls"].values()} == {"ok"}, entry["impls"]
