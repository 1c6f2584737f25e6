"""Plain-PyTorch GAN losses: the spec and the fallback.

With r = real logits and f = fake logits (any shapes; they may differ in size),
the per-element terms of each kind are

    kind            discriminator (real term, fake term)        generator (fake term, real term)
    nonsaturating   l*sp(-r) + (1-l)*sp(r),  sp(f)               sp(-f)
    minimax         as nonsaturating                            -sp(f)   (= log(1 - sigmoid(f)))
    hinge           relu(1 - r),  relu(1 + f)                    -f
    wasserstein     -r,  f                                       -f
    least_squares   (r - 1)^2 / 2,  f^2 / 2                      (f - 1)^2 / 2
    relativistic    sp(-(r - mean(f))),  sp(f - mean(r))         sp(-(f - mean(r))),  sp(r - mean(f))

where sp is softplus, l the real label (one-sided label smoothing; only the
nonsaturating and minimax kinds take one) and the relativistic kind is the
relativistic *average* GAN (the means are over whole tensors).

Reductions: "mean" averages each term over its own tensor and adds the two;
"sum" sums each; "none" returns real term + fake term per element, which needs
real and fake of one shape (a generator loss without a real term returns its
fake term). Float16 and bfloat16 are computed in float32.

This is the definition the kernels are tested against, written to be exact rather
than fast: the benchmarks' plain-PyTorch speed baseline lives in genkern.bench.baselines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("nonsaturating", "minimax", "hinge", "wasserstein", "least_squares", "relativistic")
REDUCTIONS = ("mean", "sum", "none")
LABEL_KINDS = ("nonsaturating", "minimax")  # the kinds whose real term takes a label


def _ct(x):
    # Half-precision logits are computed in float32, as the kernels do.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _sp(x):
    # softplus exact to float64: torch's default threshold returns x above 20, off by up to
    # log(1 + e^-20) = 2e-9 (and the gradient by as much); above 40 that is below half an ulp.
    return F.softplus(x, threshold=40.0)


def _combine(real_term, fake_term, reduction, out_dtype):
    if reduction == "mean":
        loss = fake_term.mean() + (0 if real_term is None else real_term.mean())
    elif reduction == "sum":
        loss = fake_term.sum() + (0 if real_term is None else real_term.sum())
    else:
        loss = fake_term if real_term is None else real_term + fake_term
    return loss.to(out_dtype)


def discriminator_terms(r, f, kind, real_label=1.0):
    """(real term, fake term) per element, in the compute dtype."""
    r, f = _ct(r), _ct(f)
    if kind in LABEL_KINDS:
        # A label of exactly 1 or 0 leaves one term alone (0 * sp(inf) would be NaN, not 0).
        if real_label in (0.0, 1.0):
            real = _sp(-r) if real_label == 1.0 else _sp(r)
        else:
            real = real_label * _sp(-r) + (1 - real_label) * _sp(r)
        return real, _sp(f)
    if kind == "hinge":
        return torch.relu(1 - r), torch.relu(1 + f)
    if kind == "wasserstein":
        return -r, f
    if kind == "least_squares":
        return 0.5 * (r - 1) ** 2, 0.5 * f * f
    if kind == "relativistic":
        return _sp(-(r - f.mean())), _sp(f - r.mean())
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def generator_terms(f, kind, r=None):
    """(fake term, real term or None) per element, in the compute dtype."""
    f = _ct(f)
    if kind == "nonsaturating":
        return _sp(-f), None
    if kind == "minimax":
        return -_sp(f), None
    if kind in ("hinge", "wasserstein"):
        return -f, None
    if kind == "least_squares":
        return 0.5 * (f - 1) ** 2, None
    if kind == "relativistic":
        r = _ct(r)
        return _sp(-(f - r.mean())), _sp(r - f.mean())
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def discriminator_loss(real_logits, fake_logits, kind="nonsaturating", *, reduction="mean", real_label=1.0):
    real, fake = discriminator_terms(real_logits, fake_logits, kind, real_label)
    return _combine(real, fake, reduction, fake_logits.dtype)


def generator_loss(fake_logits, kind="nonsaturating", *, real_logits=None, reduction="mean"):
    fake, real = generator_terms(fake_logits, kind, real_logits)
    return _combine(real, fake, reduction, fake_logits.dtype)
