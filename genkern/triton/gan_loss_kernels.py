"""The Triton kernels of genkern/triton/gan_loss.py (its docstring gives the math and the launches)."""

from __future__ import annotations

import triton
import triton.language as tl

HINGE, WASSERSTEIN, RELATIVISTIC, NONE = 2, 3, 5, 2  # kind and reduction codes with their own code paths
SMALL_MAX = 4096  # up to this many logits per tensor: one program, one launch
SMALL_CONFIGS = {256: 2, 1024: 4, 4096: 8}  # BLOCK -> num_warps of the one-program kernel
LARGE_BLOCK, LARGE_WARPS = 1024, 4  # grid kernels: 8 logits of each tensor per thread per step
PARTS = 512  # most programs of a grid launch (partials per statistic)
NSTATS = 5  # partial rows: sum r, sum f, sum a, sum b, loss (see _gan_loss_stats_kernel)
MAX_NUMEL = 2**31 - 2**20  # int32 element counts, with room for a block past the end


@triton.jit
def _sp_sig(v):
    """(sp(v), sp(-v), sigmoid(v), sigmoid(-v)) from one exp: e = exp(-|v|) in [0, 1],
    sp(+-v) = relu(+-v) + log1p(e), sigmoid(|v|) = 1 / (1 + e), sigmoid(-|v|) = e / (1 + e).
    Finite for any finite v; NaN stays NaN (no max(), which may drop it). log1p(e) =
    log(u) e / (u - 1) with u = 1 + e is exact to a few ulp even where 1 + e rounds to 1."""
    e = tl.exp(-tl.abs(v))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    q = 1.0 / u
    pos = v >= 0
    return (
        tl.where(v > 0, v, 0.0) + log1p,
        tl.where(v < 0, -v, 0.0) + log1p,
        tl.where(pos, q, e * q),
        tl.where(pos, e * q, q),
    )


@triton.jit
def _relu(t):
    return tl.where(t < 0, 0.0, t)  # keeps NaN, as torch.relu does


@triton.jit
def _term(v, label, KIND: tl.constexpr, REAL: tl.constexpr, GENERATOR: tl.constexpr):
    """(term, d term / d v) per element, float32. GENERATOR: the generator's fake term
    (REAL ignored); else the discriminator's real (REAL) or fake term. Relativistic: v is
    the shifted logit (r - mean f, or f - mean r) and the terms are sp(-v), sp(v)."""
    one = tl.full(v.shape, 1.0, tl.float32)
    if KIND == 0 or KIND == 1 or KIND == 5:
        sp, sp_neg, sig, sig_neg = _sp_sig(v)
        if GENERATOR:
            if KIND == 0:
                term, grad = sp_neg, -sig_neg  # sp(-f)
            else:
                term, grad = -sp, -sig  # -sp(f) = log(1 - sigmoid(f))
        elif REAL:
            if KIND == 5:
                term, grad = sp_neg, -sig_neg
            else:  # l sp(-r) + (1 - l) sp(r); the (1 - l) part skipped at l == 1 (inf * 0)
                term = tl.where(label == 1.0, sp_neg, label * sp_neg + (1.0 - label) * sp)
                grad = (1.0 - label) * sig - label * sig_neg
        else:
            term, grad = sp, sig
    elif KIND == 2:
        if GENERATOR:
            term, grad = -v, -one
        elif REAL:  # relu's gradient is 0 only where t <= 0: a NaN logit passes it, as in torch
            term, grad = _relu(1.0 - v), tl.where(1.0 - v <= 0, 0.0, -one)
        else:
            term, grad = _relu(1.0 + v), tl.where(1.0 + v <= 0, 0.0, one)
    elif KIND == 3:
        if GENERATOR or REAL:
            term, grad = -v, -one
        else:
            term, grad = v, one
    else:  # least squares: (v - 1)^2 / 2 for the real and generator terms, v^2 / 2 for fake
        if GENERATOR or REAL:
            d = v - 1.0
        else:
            d = v
        term, grad = 0.5 * d * d, d
    return term, grad


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _sum_row(part_ptr, row, n_parts, PARTS: tl.constexpr):
    """Sum of partial row `row` over the n_parts programs, in a fixed order."""
    i = tl.arange(0, PARTS)
    return tl.sum(tl.load(part_ptr + row * PARTS + i, mask=i < n_parts, other=0.0), axis=0)


@triton.jit
def _step(ptr, pid, k, chunk, n, BLOCK: tl.constexpr):
    """Offsets, mask and float32 logits of step k of program pid's chunk [pid chunk, (pid + 1) chunk)
    of a tensor of n elements. chunk is a multiple of BLOCK; the step test is uniform, so the
    mask stays 16-byte vectorisable when n % 16 == 0. int32 offsets: n < 2^31 - 2^20."""
    offs = pid * chunk + k * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < n) & (k * BLOCK < chunk)
    return offs, mask, _load(ptr, offs, mask)


@triton.jit
def _gan_loss_small_kernel(
    # outputs, in the logits' dtype: loss (0-d, or (n_fake,) for "none"), grads (n_real,), (n_fake,)
    loss_ptr,
    grad_real_ptr,
    grad_fake_ptr,
    # inputs, flat contiguous (real unused with GENERATOR)
    real_ptr,
    fake_ptr,
    n_real,
    n_fake,
    # 1/n of each tensor, each term's scale (1/n for mean, else 1), the real label
    inv_real,
    inv_fake,
    scale_real,
    scale_fake,
    label,
    # meta: kind and reduction codes, generator loss, tile (>= n_real, n_fake)
    KIND: tl.constexpr,
    REDUCTION: tl.constexpr,
    GENERATOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Every case in one program, both tensors in registers.
    loss = scale_real sum_i real_term(r_i) + scale_fake sum_j fake_term(f_j)  (mean, sum);
    none: loss_i = real_term(r_i) + fake_term(f_i); grads: scale * d term / d logit.
    Relativistic (a_i = sigmoid(mean f - r_i), b_j = sigmoid(f_j - mean r), A, B their sums):
    grad_r = -scale_real a - scale_fake B / n_real,  grad_f = scale_fake b + scale_real A / n_fake
    for mean/sum (the cross terms through the means); -a and b for none."""
    offs = tl.arange(0, BLOCK)
    ok_f = offs < n_fake
    f = _load(fake_ptr, offs, ok_f)
    if GENERATOR:
        t_f, g_f = _term(f, label, KIND, False, True)
        loss_el = t_f
        loss = tl.sum(tl.where(ok_f, t_f, 0.0), axis=0) * scale_fake
    else:
        ok_r = offs < n_real
        r = _load(real_ptr, offs, ok_r)
        if KIND == 5:  # masked lanes load 0: plain sums
            mean_r = tl.sum(r, axis=0) * inv_real
            mean_f = tl.sum(f, axis=0) * inv_fake
            r, f = r - mean_f, f - mean_r
        t_r, g_r = _term(r, label, KIND, True, False)
        t_f, g_f = _term(f, label, KIND, False, False)
        loss_el = t_r + t_f
        loss = (
            tl.sum(tl.where(ok_r, t_r, 0.0), axis=0) * scale_real
            + tl.sum(tl.where(ok_f, t_f, 0.0), axis=0) * scale_fake
        )
        if KIND == 5 and REDUCTION != 2:
            sum_a = -tl.sum(tl.where(ok_r, g_r, 0.0), axis=0)
            sum_b = tl.sum(tl.where(ok_f, g_f, 0.0), axis=0)
            g_r = g_r * scale_real - scale_fake * sum_b * inv_real
            g_f = g_f * scale_fake + scale_real * sum_a * inv_fake
        else:
            g_r = g_r * scale_real
        if KIND != 3:  # else a constant gradient (see _const_grads)
            tl.store(grad_real_ptr + offs, g_r.to(grad_real_ptr.dtype.element_ty), mask=ok_r)
    if not (KIND == 5 and REDUCTION != 2):
        g_f = g_f * scale_fake
    if not (KIND == 3 or (GENERATOR and KIND == 2)):  # else constant (see _const_grads)
        tl.store(grad_fake_ptr + offs, g_f.to(grad_fake_ptr.dtype.element_ty), mask=ok_f)
    if REDUCTION == 2:
        tl.store(loss_ptr + offs, loss_el.to(loss_ptr.dtype.element_ty), mask=ok_f)
    else:
        tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _gan_loss_stats_kernel(
    # output: float32 partials (NSTATS, PARTS); this program writes column pid of its STAGE's rows
    part_ptr,
    # inputs, flat contiguous; program pid reads [pid * chunk, (pid + 1) * chunk) of each
    real_ptr,
    fake_ptr,
    n_real,
    n_fake,
    chunk_real,
    chunk_fake,
    n_parts,
    # 1/n of each tensor, each term's scale (1/n for mean, else 1)
    inv_real,
    inv_fake,
    scale_real,
    scale_fake,
    # meta: which statistics, tile, partial row length
    STAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,
):
    """Relativistic statistics, per program. STAGE 0: rows 0, 1 = sum r, sum f.
    STAGE 1 (reads rows 0, 1 for the means): rows 2, 3, 4 = sum a_i, sum b_j and
    scale_real sum sp(mean f - r_i) + scale_fake sum sp(f_j - mean r)."""
    pid = tl.program_id(0)
    if STAGE == 1:
        mean_r = _sum_row(part_ptr, 0, n_parts, PARTS) * inv_real
        mean_f = _sum_row(part_ptr, 1, n_parts, PARTS) * inv_fake
    acc_r = tl.zeros((BLOCK,), tl.float32)  # STAGE 0: logits; 1: a
    acc_f = tl.zeros((BLOCK,), tl.float32)  # STAGE 0: logits; 1: b
    acc_t = tl.zeros((BLOCK,), tl.float32)  # STAGE 1: the loss
    k = tl.full((), 0, tl.int32)  # a while loop: the interpreter (numpy 2) fails on range(runtime bound)
    while k * BLOCK < tl.maximum(chunk_real, chunk_fake):
        o_r, ok_r, r = _step(real_ptr, pid, k, chunk_real, n_real, BLOCK)
        o_f, ok_f, f = _step(fake_ptr, pid, k, chunk_fake, n_fake, BLOCK)
        if STAGE == 0:
            acc_r += r
            acc_f += f
        else:
            t_r, g_r = _term(r - mean_f, 1.0, 5, True, False)
            t_f, g_f = _term(f - mean_r, 1.0, 5, False, False)
            acc_r -= tl.where(ok_r, g_r, 0.0)
            acc_f += tl.where(ok_f, g_f, 0.0)
            acc_t += tl.where(ok_r, t_r, 0.0) * scale_real + tl.where(ok_f, t_f, 0.0) * scale_fake
        k += 1
    row = 2 * STAGE
    tl.store(part_ptr + row * PARTS + pid, tl.sum(acc_r, axis=0))
    tl.store(part_ptr + (row + 1) * PARTS + pid, tl.sum(acc_f, axis=0))
    if STAGE == 1:
        tl.store(part_ptr + 4 * PARTS + pid, tl.sum(acc_t, axis=0))


@triton.jit
def _gan_loss_fwd_kernel(
    # outputs, in the logits' dtype: loss (0-d, or (n_fake,) for "none"), grads (n_real,), (n_fake,)
    loss_ptr,
    grad_real_ptr,
    grad_fake_ptr,
    # float32 partials (NSTATS, PARTS): read (relativistic), or row 4 written (loss, mean/sum)
    part_ptr,
    # inputs, flat contiguous (real unused with GENERATOR); program pid owns
    # [pid * chunk, (pid + 1) * chunk) of each ("none": n_real = n_fake, one chunk)
    real_ptr,
    fake_ptr,
    n_real,
    n_fake,
    chunk_real,
    chunk_fake,
    n_parts,
    # 1/n of each tensor, each term's scale (1/n for mean, else 1), the real label
    inv_real,
    inv_fake,
    scale_real,
    scale_fake,
    label,
    # meta: kind and reduction codes, generator loss, tile, partial row length
    KIND: tl.constexpr,
    REDUCTION: tl.constexpr,
    GENERATOR: tl.constexpr,
    BLOCK: tl.constexpr,
    PARTS: tl.constexpr,
):
    """grads = scale * d term / d logit (+ the relativistic cross terms, see the small kernel,
    from the partial sums of _gan_loss_stats_kernel; its program 0 writes the loss from row 4);
    none: loss_i = real_term(r_i) + fake_term(f_i); mean/sum (not relativistic): this
    program's scale_real sum real_term + scale_fake sum fake_term into row 4, column pid."""
    pid = tl.program_id(0)
    shift_r, shift_f, add_r, add_f = 0.0, 0.0, 0.0, 0.0
    if KIND == 5:
        shift_r = _sum_row(part_ptr, 1, n_parts, PARTS) * inv_fake  # r - mean f
        shift_f = _sum_row(part_ptr, 0, n_parts, PARTS) * inv_real  # f - mean r
        if REDUCTION != 2:
            add_r = -scale_fake * _sum_row(part_ptr, 3, n_parts, PARTS) * inv_real
            add_f = scale_real * _sum_row(part_ptr, 2, n_parts, PARTS) * inv_fake
            if pid == 0:
                tl.store(loss_ptr, _sum_row(part_ptr, 4, n_parts, PARTS).to(loss_ptr.dtype.element_ty))
    acc = tl.zeros((BLOCK,), tl.float32)
    k = tl.full((), 0, tl.int32)  # a while loop: the interpreter (numpy 2) fails on range(runtime bound)
    while k * BLOCK < tl.maximum(chunk_real, chunk_fake):
        o_f, ok_f, f = _step(fake_ptr, pid, k, chunk_fake, n_fake, BLOCK)
        t_f, g_f = _term(f - shift_f, label, KIND, False, GENERATOR)
        if not (KIND == 3 or (GENERATOR and KIND == 2)):  # else constant (see _const_grads)
            tl.store(grad_fake_ptr + o_f, (g_f * scale_fake + add_f).to(grad_fake_ptr.dtype.element_ty), mask=ok_f)
        t = tl.where(ok_f, t_f, 0.0) * scale_fake
        if not GENERATOR:
            o_r, ok_r, r = _step(real_ptr, pid, k, chunk_real, n_real, BLOCK)
            t_r, g_r = _term(r - shift_r, label, KIND, True, False)
            if KIND != 3:  # else constant (see _const_grads)
                tl.store(grad_real_ptr + o_r, (g_r * scale_real + add_r).to(grad_real_ptr.dtype.element_ty), mask=ok_r)
            t += tl.where(ok_r, t_r, 0.0) * scale_real
        if REDUCTION == 2:  # scales are 1
            tl.store(loss_ptr + o_f, t.to(loss_ptr.dtype.element_ty), mask=ok_f)
        else:
            acc += t
        k += 1
    if REDUCTION != 2 and KIND != 5:
        tl.store(part_ptr + 4 * PARTS + pid, tl.sum(acc, axis=0))


@triton.jit
def _gan_loss_sum_kernel(
    loss_ptr,  # output: 0-d, in the logits' dtype
    part_ptr,
    n_parts,  # float32 partials (NSTATS, PARTS), row 4 summed
    PARTS: tl.constexpr,
):
    """loss = sum of the n_parts loss partials (row 4), in program order."""
    tl.store(loss_ptr, _sum_row(part_ptr, 4, n_parts, PARTS).to(loss_ptr.dtype.element_ty))
