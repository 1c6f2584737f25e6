"""Triton kernels for the fused GAN losses: the loss and its gradient w.r.t. the logits in one pass.

Math: genkern/reference/gan_loss.py (the spec). Codes: kind 0 nonsaturating, 1 minimax,
2 hinge, 3 wasserstein, 4 least_squares, 5 relativistic; reduction 0 mean, 1 sum, 2 none.

Orientation. The kernels see a "real" and a "fake" tensor and the discriminator's terms,
or (GENERATOR) the generator's fake term alone. The relativistic generator loss is the
relativistic discriminator loss with the tensors' roles swapped,
    G(r, f) = mean sp(-(f - mean r)) + mean sp(r - mean f) = D(real=f, fake=r),
so the launcher swaps the pointers (and the gradients back) and the kernels have one
relativistic case.

Launches (all deterministic: partial sums in a fixed order, no atomics, no host sync):
    max(n_real, n_fake) <= SMALL_MAX     _gan_loss_small_kernel, one program, every case
    larger, not relativistic             _gan_loss_fwd_kernel [+ _gan_loss_sum_kernel for mean/sum]
    larger, relativistic                 _gan_loss_stats_kernel (STAGE 0: sums of the logits)
                                         [+ STAGE 1: term sums, mean/sum only]
                                         + _gan_loss_fwd_kernel (grads, loss)
The grid kernels give program p the p-th chunk of each tensor (chunk a multiple of BLOCK) and
write float32 per-program partials into part (NSTATS, PARTS); a reader sums a row in order.

Constant gradients. The wasserstein terms (KIND 3) and the hinge generator term (GENERATOR and
KIND 2) have one derivative for every logit: the kernels store no gradient for them and the
launcher returns it 0-d (see _const_grads), the contract of csrc/gan_loss.cpp.
"""

from __future__ import annotations

import torch
import triton

from genkern.triton._common import check_dtype
from genkern.triton.gan_loss_kernels import (
    HINGE,
    LARGE_BLOCK,
    LARGE_WARPS,
    MAX_NUMEL,
    NONE,
    NSTATS,
    PARTS,
    RELATIVISTIC,
    SMALL_CONFIGS,
    SMALL_MAX,
    WASSERSTEIN,
    _gan_loss_fwd_kernel,
    _gan_loss_small_kernel,
    _gan_loss_stats_kernel,
    _gan_loss_sum_kernel,
)

# --- launcher: check, allocate, launch -----------------------------------------------------


def _check(real, fake, kind, reduction, real_label, generator):
    """Checks the op's contract; returns (x, y) = the kernels' (real, fake), x None for a
    non-relativistic generator loss, and whether the roles are swapped."""
    if kind not in range(6) or reduction not in range(3):
        raise ValueError(f"kind must be in 0..5 and reduction in 0..2, got {kind} and {reduction}")
    if real_label != 1.0 and kind not in (0, 1):
        raise ValueError(f"real_label only applies to kinds 0 and 1 (nonsaturating, minimax), got kind={kind}")
    for name, t in (("real_logits", real), ("fake_logits", fake)):
        if t is None:
            continue
        check_dtype(name, t, "gan_loss")
        if t.dtype != fake.dtype or t.device != fake.device:
            raise TypeError(f"real_logits is {t.dtype} on {t.device} but fake_logits is {fake.dtype} on {fake.device}")
        if not 0 < t.numel() < MAX_NUMEL:
            raise ValueError(f"{name} must have 1 to {MAX_NUMEL - 1} elements, got shape {tuple(t.shape)}")
    if real is None and (kind == RELATIVISTIC or not generator):
        raise ValueError("real_logits is required by discriminator losses and the relativistic kind")
    if reduction == NONE and real is not None and real.shape != fake.shape:
        raise ValueError(
            f'reduction "none" needs real_logits and fake_logits of one shape, got '
            f"{tuple(real.shape)} and {tuple(fake.shape)}"
        )
    if kind == RELATIVISTIC and generator:
        return fake, real, True
    return (None if generator else real), fake, False


def _grid_launch(loss, g_x, g_y, x, y, n_x, n_y, scales, label, kind, reduction, gen):
    """The multi-program path (see the module docstring)."""
    progs = min(PARTS, triton.cdiv(max(n_x, n_y), LARGE_BLOCK))
    chunks = [triton.cdiv(triton.cdiv(n, progs), LARGE_BLOCK) * LARGE_BLOCK for n in (n_x, n_y)]
    part = torch.empty((NSTATS, PARTS), dtype=torch.float32, device=y.device)
    sizes = (n_x, n_y, *chunks, progs)
    meta = dict(BLOCK=LARGE_BLOCK, PARTS=PARTS, num_warps=LARGE_WARPS)
    for stage in ((0,) if reduction == NONE else (0, 1)) if kind == RELATIVISTIC else ():
        _gan_loss_stats_kernel[(progs,)](part, x, y, *sizes, *scales[:4], STAGE=stage, **meta)
    _gan_loss_fwd_kernel[(progs,)](
        loss, g_x, g_y, part, x, y, *sizes, *scales, label, KIND=kind, REDUCTION=reduction, GENERATOR=gen, **meta
    )
    if kind != RELATIVISTIC and reduction != NONE:
        _gan_loss_sum_kernel[(1,)](loss, part, progs, PARTS=PARTS, num_warps=LARGE_WARPS)


def _const_grads(kind, gen):
    """Which of the kernels' (real, fake) gradients are one constant, not stored per element:
    the wasserstein terms and the hinge generator term (genkern.ops.gan_loss.const_grads;
    the kernels test the same codes)."""
    return not gen and kind == WASSERSTEIN, kind == WASSERSTEIN or (gen and kind == HINGE)


def gan_loss_forward(real_logits, fake_logits, kind, reduction, real_label, generator):
    """(loss, grad_real, grad_fake) in the logits' dtype: loss 0-d (mean, sum) or fake's shape
    (none), each grad its tensor's shape, or 0-d where it is one constant (the value at every
    element: see _const_grads; 0 for real_logits a generator loss does not read); grad_real
    empty (0,) without real_logits. The contract of gan_loss_fwd in csrc/gan_loss.cpp."""
    x, y, swapped = _check(real_logits, fake_logits, kind, reduction, real_label, generator)
    gen = x is None
    x, y = (y if gen else x.contiguous()), y.contiguous()  # x = y: an unused pointer
    n_x, n_y = x.numel(), y.numel()
    const_x, const_y = _const_grads(kind, gen)
    mean = reduction == 0
    scales = (1.0 / n_x, 1.0 / n_y, 1.0 / n_x if mean else 1.0, 1.0 / n_y if mean else 1.0)
    full = lambda value: torch.full((), value, dtype=y.dtype, device=y.device)  # noqa: E731
    loss = torch.empty(fake_logits.shape if reduction == NONE else (), dtype=y.dtype, device=y.device)
    g_y = full(-scales[3] if gen else scales[3]) if const_y else torch.empty_like(y)
    g_x = g_y if gen else full(-scales[2]) if const_x else torch.empty_like(x)
    if max(n_x, n_y) <= SMALL_MAX:
        block = min(b for b in SMALL_CONFIGS if b >= max(n_x, n_y))
        _gan_loss_small_kernel[(1,)](
            loss,
            g_x,
            g_y,
            x,
            y,
            n_x,
            n_y,
            *scales,
            float(real_label),
            KIND=kind,
            REDUCTION=reduction,
            GENERATOR=gen,
            BLOCK=block,
            num_warps=SMALL_CONFIGS[block],
        )
    else:
        _grid_launch(loss, g_x, g_y, x, y, n_x, n_y, scales, float(real_label), kind, reduction, gen)
    if swapped:
        return loss, g_y, g_x
    if gen:  # real_logits given to a loss without a real term: its gradient is zero
        return loss, fake_logits.new_empty(0) if real_logits is None else full(0.0), g_y
    return loss, g_x, g_y


def aot_cases():
    """For genkern.triton._aot, every kernel x config: the one-program kernel for every kind x
    reduction x (D, G) at its largest BLOCK and for the heaviest case (relativistic mean) at every
    BLOCK; the grid kernels for every kind x reduction x (D, G), both stats stages, the sum. Sizes
    divisible by 16 (the vectorised code), plus odd sizes for the relativistic and nonsaturating
    means (masks element by element)."""
    f32 = {n: "fp32" for n in ("inv_real", "inv_fake", "scale_real", "scale_fake", "label")}
    f32["part_ptr"] = "*fp32"
    even, odd = ("n_real", "n_fake", "chunk_real", "chunk_fake"), ("chunk_real", "chunk_fake")
    cases = [
        (dict(KIND=k, REDUCTION=r, GENERATOR=g), even)
        for k in range(6)
        for r in range(3)
        for g in ((False,) if k == RELATIVISTIC else (False, True))
    ]
    cases += [(dict(KIND=k, REDUCTION=0, GENERATOR=False), odd) for k in (0, RELATIVISTIC)]
    heavy = [(dict(KIND=RELATIVISTIC, REDUCTION=0, GENERATOR=False), d) for d in (even, odd)]
    for block, warps in SMALL_CONFIGS.items():
        for c, div in cases if block == max(SMALL_CONFIGS) else heavy:
            yield dict(
                kernel=_gan_loss_small_kernel,
                constexprs=dict(c, BLOCK=block),
                num_warps=warps,
                types=f32,
                divisible=[d for d in div if d.startswith("n_")],
            )
    grid = dict(BLOCK=LARGE_BLOCK, PARTS=PARTS)
    for c, div in cases:
        yield dict(
            kernel=_gan_loss_fwd_kernel, constexprs=dict(c, **grid), num_warps=LARGE_WARPS, types=f32, divisible=div
        )
    for stage in (0, 1):
        for div in (even, odd):
            yield dict(
                kernel=_gan_loss_stats_kernel,
                constexprs=dict(STAGE=stage, **grid),
                num_warps=LARGE_WARPS,
                types=f32,
                divisible=div,
            )
    yield dict(kernel=_gan_loss_sum_kernel, constexprs=dict(PARTS=PARTS), num_warps=LARGE_WARPS, types=f32)
