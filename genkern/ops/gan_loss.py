"""Fused GAN losses: the loss and its gradient with respect to the logits in one pass."""
from __future__ import annotations

import torch

from genkern import _dispatch, _ext
from genkern.ops._common import call_kernel_op, check_float_tensor
from genkern.reference import gan_loss as reference
from genkern.reference.gan_loss import KINDS, LABEL_KINDS, REDUCTIONS

_KIND_CODE = {k: i for i, k in enumerate(KINDS)}
_REDUCTION_CODE = {r: i for i, r in enumerate(REDUCTIONS)}


def discriminator_loss(real_logits, fake_logits, kind="nonsaturating", *, reduction="mean", real_label=1.0,
                       impl="auto"):
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
    """
    kind_code, red_code = _check_common(fake_logits, "fake_logits", kind, reduction)
    check_float_tensor(real_logits, "real_logits", like=fake_logits, like_name="fake_logits")
    _check_pair(real_logits, fake_logits, reduction)
    real_label = check_settings(kind, reduction, real_label)
    backend = _dispatch.resolve(impl, fake_logits.device, fake_logits.dtype, "discriminator_loss")
    if backend == "torch":
        return reference.discriminator_loss(real_logits, fake_logits, kind, reduction=reduction,
                                            real_label=real_label)
    return call_kernel_op(_OPS, _ext.load()[0].gan_loss, backend, real_logits, fake_logits, kind_code, red_code,
                          real_label, False)


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
    """
    kind_code, red_code = _check_common(fake_logits, "fake_logits", kind, reduction)
    if kind == "relativistic":
        if real_logits is None:
            raise ValueError("the relativistic generator loss needs real_logits")
        check_float_tensor(real_logits, "real_logits", like=fake_logits, like_name="fake_logits")
        _check_pair(real_logits, fake_logits, reduction)
    else:
        real_logits = None  # the other generator losses do not depend on the real logits
    backend = _dispatch.resolve(impl, fake_logits.device, fake_logits.dtype, "generator_loss")
    if backend == "torch":
        return reference.generator_loss(fake_logits, kind, real_logits=real_logits, reduction=reduction)
    return call_kernel_op(_OPS, _ext.load()[0].gan_loss, backend, real_logits, fake_logits, kind_code, red_code,
                          1.0, True)


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


def _check_common(logits, name, kind, reduction):
    check_float_tensor(logits, name)
    check_settings(kind, reduction)
    if logits.numel() == 0:
        raise ValueError(f"{name} is empty; a GAN loss needs at least one logit")
    return _KIND_CODE[kind], _REDUCTION_CODE[reduction]


def _check_pair(real_logits, fake_logits, reduction):
    if real_logits.numel() == 0:
        raise ValueError("real_logits is empty; a GAN loss needs at least one logit")
    if reduction == "none" and real_logits.shape != fake_logits.shape:
        raise ValueError(f'reduction="none" needs real_logits and fake_logits of one shape, got '
                         f"{tuple(real_logits.shape)} and {tuple(fake_logits.shape)}")


# --- registration: fake kernels of the fused forward ops -----------------------------

def _fake_fwd(real_logits, fake_logits, kind, reduction, real_label, generator):
    """(loss, grad_real, grad_fake) of the right shapes: see csrc/genkern.cpp."""
    if reduction == _REDUCTION_CODE["none"]:
        loss = torch.empty_like(fake_logits, memory_format=torch.contiguous_format)
    else:
        loss = fake_logits.new_empty(())
    grad_real = fake_logits.new_empty(0) if real_logits is None else \
        torch.empty_like(real_logits, memory_format=torch.contiguous_format)
    return loss, grad_real, torch.empty_like(fake_logits, memory_format=torch.contiguous_format)


_OPS = {}


def _register():
    if not _ext.available():
        return
    for family in ("cpp", "triton"):
        torch.library.register_fake(getattr(torch.ops.genkern, f"gan_loss_{family}_fwd").default, _fake_fwd)
        _OPS[family] = getattr(torch.ops.genkern, f"gan_loss_{family}").default
    from genkern.triton import register_gan_loss
    register_gan_loss()


_register()
