"""Fused GAN losses: the loss and its gradient with respect to the logits in one pass."""

from __future__ import annotations

import torch

from genkern.ops._common import FLOAT_DTYPES, KernelOp, check_float_tensor, refuse_double_backward
from genkern.reference import gan_loss as reference
from genkern.reference.gan_loss import KINDS, LABEL_KINDS, REDUCTIONS

_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_REDUCTION_CODE = {r: i for i, r in enumerate(REDUCTIONS)}
_HINGE, _WASSERSTEIN, _RELATIVISTIC = _KIND_CODE["hinge"], _KIND_CODE["wasserstein"], _KIND_CODE["relativistic"]
_MEAN, _NONE = _REDUCTION_CODE["mean"], _REDUCTION_CODE["none"]
_HALF = (torch.float16, torch.bfloat16)


def discriminator_loss(
    real_logits, fake_logits, kind="nonsaturating", *, reduction="mean", real_label=1.0, impl="auto"
):
    """The discriminator's loss on real and fake logits.

    Args:
        real_logits: floating tensor of any shape, e.g. (B,), (B, 1) or a patch map (B, 1, H, W).
        fake_logits: floating tensor of the same dtype and device, any shape (its own size).
        kind: one of "nonsaturating", "minimax", "hinge", "wasserstein", "least_squares",
            "relativistic" (see genkern/reference/gan_loss.py for each formula).
        reduction: "mean" (each term averaged over its own tensor, then added), "sum", or
            "none" (real term + fake term per element; real and fake must have one shape).
        real_label: target of the real term (one-sided label smoothing, e.g. 0.9); only the
            "nonsaturating" and "minimax" kinds take one.
        impl: "auto" | "torch" | "cpp" | "triton" (default from GENKERN_IMPL).

    Returns:
        The loss in the logits' dtype: a 0-d tensor, or real_logits' shape with "none".
        Float16/bfloat16 are computed in float32; NaN logits give a NaN loss.

    Gradients: where a term's gradient is one constant (the "wasserstein" terms here, and the
    generator's "wasserstein" and "hinge" terms), the cpp/triton impls hand autograd a
    stride-0 (expanded) gradient, as torch's sum() does: torch.autograd.grad returns it as
    such (read-only in place), and backward() accumulates it into an ordinary .grad.
    """
    backend, kind_code, red_code, label = _prepare(
        real_logits, fake_logits, kind, reduction, real_label, impl, "discriminator_loss"
    )
    if backend == "torch":
        return reference.discriminator_loss(real_logits, fake_logits, kind, reduction=reduction, real_label=label)
    return _fused(backend, real_logits, fake_logits, kind_code, red_code, label, False)


def generator_loss(fake_logits, kind="nonsaturating", *, real_logits=None, reduction="mean", impl="auto"):
    """The generator's loss on fake logits (and real logits for the relativistic kind).

    Args:
        fake_logits: floating tensor of any shape.
        kind: as for discriminator_loss.
        real_logits: needed by "relativistic" only (any shape; "none" needs fake's shape);
            the other kinds do not use it.
        reduction: "mean", "sum" or "none".
        impl: "auto" | "torch" | "cpp" | "triton".

    Returns:
        The loss in the logits' dtype: a 0-d tensor, or fake_logits' shape with "none".
        Gradients as for discriminator_loss ("wasserstein" and "hinge": stride-0).
    """
    backend, kind_code, red_code, _ = _prepare(real_logits, fake_logits, kind, reduction, 1.0, impl, "generator_loss")
    if kind_code != _RELATIVISTIC:
        real_logits = None  # the other generator losses do not depend on the real logits
    if backend == "torch":
        return reference.generator_loss(fake_logits, kind, real_logits=real_logits, reduction=reduction)
    return _fused(backend, real_logits, fake_logits, kind_code, red_code, 1.0, True)


def check_settings(kind, reduction, real_label=1.0) -> float:
    """Validates a loss's settings (also used by genkern.nn.GANLoss); returns real_label as a float."""
    if kind not in _KIND_CODE:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if reduction not in _REDUCTION_CODE:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if isinstance(real_label, bool) or not isinstance(real_label, (int, float)):
        raise TypeError(f"real_label must be a number, got {type(real_label).__name__}")
    if real_label != 1.0 and kind not in LABEL_KINDS:
        raise ValueError(f"real_label only applies to the {' and '.join(LABEL_KINDS)} kinds, got kind={kind!r}")
    return float(real_label)


# The public functions run at every training step, often on a few hundred logits, where
# microseconds of Python count: what does not depend on the tensors' values is checked once
# per call signature (an explicit impl is resolved once too: GENKERN_IMPL does not apply to
# it), and the extension's entry point is looked up once.
_MEMO: dict = {}  # (kind, reduction, real_label, impl, op, device, dtype) -> (backend or None, codes, label)
_MEMO_MAX = 256  # (a NaN real_label never equals its key: the memo stays bounded)


def _fused(backend, real_logits, fake_logits, kind, reduction, label, generator):
    """The loss from the fused kernel op (its gradients stay with the autograd node)."""
    dtype = fake_logits.dtype
    if (
        reduction == _MEAN
        and dtype in _HALF
        and torch.is_grad_enabled()
        and (fake_logits.requires_grad or (real_logits is not None and real_logits.requires_grad))
    ):
        # Half "mean" logits that need a gradient go to the kernel as float32: the saved
        # gradients d/N (below float16's normal range for N >~ 2^14) keep their bits until the
        # backward has applied the upstream gradient (AMP's loss scale) and the casts' backward
        # rounds once, as torch does.
        real32 = None if real_logits is None else real_logits.float()
        return GAN_LOSS(backend, real32, fake_logits.float(), kind, reduction, label, generator).to(dtype)
    return GAN_LOSS(backend, real_logits, fake_logits, kind, reduction, label, generator)


def _prepare(real_logits, fake_logits, kind, reduction, real_label, impl, op):
    """Checks a call (real_logits only where the loss reads them); returns (backend, kind code,
    reduction code, real_label as a float)."""
    if not isinstance(fake_logits, torch.Tensor) or fake_logits.dtype not in FLOAT_DTYPES:
        check_float_tensor(fake_logits, "fake_logits")  # raises, naming the argument
    device, dtype = fake_logits.device, fake_logits.dtype
    hashable = (
        type(kind) is str
        and type(reduction) is str
        and type(real_label) in (float, int)
        and (type(impl) is str or impl is None)
    )
    key = (kind, reduction, real_label, impl, op, device, dtype) if hashable else None
    answer = _MEMO.get(key) if hashable else None
    if answer is None:
        label = check_settings(kind, reduction, real_label)
        explicit = impl is not None and impl != "auto"
        answer = (
            GAN_LOSS.resolve(impl, fake_logits, op) if explicit else None,  # raises if it cannot run
            _KIND_CODE[kind],
            _REDUCTION_CODE[reduction],
            label,
        )
        if hashable and len(_MEMO) < _MEMO_MAX:
            _MEMO[key] = answer
    if fake_logits.numel() == 0:
        raise ValueError("fake_logits is empty; a GAN loss needs at least one logit")
    if op == "discriminator_loss" or answer[1] == _RELATIVISTIC:
        if real_logits is None and op == "generator_loss":
            raise ValueError("the relativistic generator loss needs real_logits")
        if not isinstance(real_logits, torch.Tensor) or real_logits.dtype is not dtype or real_logits.device != device:
            check_float_tensor(real_logits, "real_logits", like=fake_logits, like_name="fake_logits")  # raises
        if real_logits.numel() == 0:
            raise ValueError("real_logits is empty; a GAN loss needs at least one logit")
        if answer[2] == _NONE and real_logits.shape != fake_logits.shape:
            raise ValueError(
                f'reduction="none" needs real_logits and fake_logits of one shape, got '
                f"{tuple(real_logits.shape)} and {tuple(fake_logits.shape)}"
            )
    if answer[0] is None:  # impl "auto": GENKERN_IMPL is read on every call
        return (GAN_LOSS.resolve(impl, fake_logits, op),) + answer[1:]
    return answer


# --- the op: fake kernel and autograd ------------------------------------------------
# csrc/gan_loss_autograd.cpp registers the same autograd in C++ where genkern._C is loaded.


def const_grads(kind: int, generator: bool):
    """(grad_real, grad_fake) is 0-d: which gradients of gan_loss_<family>_fwd are one constant.

    The kernels return such a gradient as a 0-d tensor (its value at every element; see
    gan_loss_fwd in csrc/gan_loss.cpp): the wasserstein terms (D and G), the hinge generator
    term, and real logits that a non-relativistic generator loss does not read (zero).
    """
    if generator:
        return kind != _RELATIVISTIC, kind in (_WASSERSTEIN, _HINGE)
    return kind == _WASSERSTEIN, kind == _WASSERSTEIN


def _fake_fwd(real_logits, fake_logits, kind, reduction, real_label, generator):
    """(loss, grad_real, grad_fake) of the shapes the kernels return: see const_grads."""
    const_real, const_fake = const_grads(kind, generator)
    contiguous = torch.contiguous_format
    loss = torch.empty_like(fake_logits, memory_format=contiguous) if reduction == _NONE else fake_logits.new_empty(())
    if real_logits is None:
        grad_real = fake_logits.new_empty(0)
    else:
        grad_real = real_logits.new_empty(()) if const_real else torch.empty_like(real_logits, memory_format=contiguous)
    grad_fake = fake_logits.new_empty(()) if const_fake else torch.empty_like(fake_logits, memory_format=contiguous)
    return loss, grad_real, grad_fake


def _setup_context(ctx, inputs, output):
    real_logits, fake_logits, kind, reduction, _, generator = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.mix = kind == _RELATIVISTIC and reduction == _NONE
    ctx.shapes = (None if real_logits is None else real_logits.shape, fake_logits.shape)


def _backward(ctx, grad_loss, _grad_real, _grad_fake):
    refuse_double_backward("gan_loss")
    saved = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None
    if ctx.mix:  # relativistic "none": grad_x = g gx - mean(g gy), grad_y = g gy - mean(g gx)
        tr, tf = grad_loss * saved[0], grad_loss * saved[1]
        return tr - tf.mean(), tf - tr.mean(), None, None, None, None
    # A constant (0-d) gradient reaches autograd as a stride-0 view, as torch's sum() gives.
    grads = [
        None if shape is None else (grad_loss * g).expand(shape) if g.dim() == 0 and len(shape) else grad_loss * g
        for g, shape in zip(saved, ctx.shapes)
    ]
    return grads[0], grads[1], None, None, None, None


GAN_LOSS = KernelOp(
    "gan_loss",
    "gan_loss",
    fake=_fake_fwd,
    backward=_backward,
    setup_context=_setup_context,
    eager="gan_loss",
    first_output=True,
)
GAN_LOSS.register()
