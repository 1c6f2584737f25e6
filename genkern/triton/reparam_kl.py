"""Triton kernels for reparameterized sampling with its KL divergence.

Math and noise scheme: genkern/reference/reparam_kl.py (the spec).

Layout. mu is viewed as (rows, D), row-major contiguous. A program owns ROWS
rows and walks D in chunks of BLOCK_D columns. Its tile has shape
(ROWS, BLOCK_D // 4, 4), and tile element [r, j, k] of the chunk starting at
column c0 is the flat element

    i = a_r + c0 + 4 j + k,   a_r = 4 * floor(r D / 4),   column c = i - r D,

valid when 0 <= c < D. Starting every row's tile on the 4-aligned flat index
a_r (shifted left by (r D) mod 4 columns when D is not a multiple of 4) makes
each (r, j) exactly one Philox group: counter i // 4 = (a_r + c0) / 4 + j,
output k. So Philox runs once per 4 elements (on a (ROWS, BLOCK_D // 4, 1)
tensor, broadcast over k), and the compiler sees 4-element aligned runs it can
load and store as vectors (when D % 4 == 0; other D load element by element).

The noise is tl.randn4x's (Philox4x32-10, Box-Muller) with cos/sin evaluated for
angles in [0, 2 pi) only (_box_muller); it matches the reference philox_normal to
~2e-6 absolute. The backward draws it again from the same seed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genkern.triton._common import check_dtype

_MAX_COUNTER_ELEMS = 2**34  # counters i // 4 are 32-bit
# BLOCK_D -> (ROWS, num_warps): every config the launchers can pick (the AOT test compiles each).
# A program's tile is ROWS * BLOCK_D = 2048 elements over 8 warps (8 per thread: two 16-byte
# vectors of fp32 per tensor, ~50 registers, so 4 programs fit an SM on sm_80 and sm_90); rows
# wider than 2048 loop over chunks.
CONFIGS = {1 << p: (2048 >> p, 8) for p in range(2, 12)}


@triton.jit
def _expm1_parts(x):
    """(expm1(x), expm1(x) - x) without cancellation: for |x| < 0.5, expm1(x) - x =
    x^2 sum_n x^n / (n + 2)! to n = 6 (truncation < 5e-8 relative); outside, exp(x) - 1
    (- x) loses under 2e-6 relative. The KL term expm1(d) - d ~ d^2 / 2 keeps full precision."""
    p = x * (1.0 / 40320.0) + (1.0 / 5040.0)
    p = p * x + (1.0 / 720.0)
    p = p * x + (1.0 / 120.0)
    p = p * x + (1.0 / 24.0)
    p = p * x + (1.0 / 6.0)
    p = p * x + 0.5
    small = tl.abs(x) < 0.5
    em = tl.exp(x) - 1.0
    em_minus_x = tl.where(small, x * x * p, em - x)
    return tl.where(small, x + x * x * p, em), em_minus_x


@triton.jit
def _tile(rows, start, c0, D, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
    """Flat offsets (int64), columns and mask of the (ROWS, BLOCK_D // 4, 4) tile at chunk c0,
    and its Philox counters ((ROWS, BLOCK_D // 4, 1), uint32), from rows (ROWS,) and their
    flat start r * D (int64)."""
    base = ((start >> 2) << 2)[:, None, None]  # a_r, 4-aligned
    j = tl.arange(0, BLOCK_D // 4)[None, :, None]
    jk = 4 * j + tl.arange(0, 4)[None, None, :]  # (1, BLOCK_D // 4, 4)
    if ALIGNED:
        col = c0 + jk
        mask = (c0 + 4 * j) < D  # per group (D % 4 == 0): the compiler sees 4-wide masks, vectorizes
    else:
        col = c0 + jk - (start & 3).to(tl.int32)[:, None, None]
        mask = (col >= 0) & (col < D)
    counter = ((base + c0) >> 2) + j  # < 2^32 for valid elements
    return base + c0 + jk, col, mask, counter.to(tl.uint32)


@triton.jit
def _box_muller(u1, u2):
    """tl.randn4x's Box-Muller, r (cos, sin)(2 pi u2) with r = sqrt(-2 log(max(u1, 1e-7))), but
    with cos and sin for u2 in [0, 1) only: reduced to the nearest quarter turn q and
    x = 2 pi (u2 - q / 4) in [-pi/4, pi/4], where Taylor series are good to 2e-9. The general
    libdevice sin/cos carry a large-argument path that costs registers and stack."""
    r = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    q = tl.floor(4.0 * u2 + 0.5)
    x = 6.283185307179586 * (u2 - 0.25 * q)  # u2 - q / 4 is exact
    x2 = x * x
    s = x2 * (1.0 / 362880.0) - (1.0 / 5040.0)
    s = s * x2 + (1.0 / 120.0)
    s = s * x2 - (1.0 / 6.0)
    s = (s * x2 + 1.0) * x
    c = x2 * (-1.0 / 3628800.0) + (1.0 / 40320.0)
    c = c * x2 - (1.0 / 720.0)
    c = c * x2 + (1.0 / 24.0)
    c = c * x2 - 0.5
    c = c * x2 + 1.0
    quad = q.to(tl.int32) & 3  # cos(q pi/2 + x), sin(q pi/2 + x) by quadrant
    cos = tl.where(quad == 0, c, tl.where(quad == 1, -s, tl.where(quad == 2, -c, s)))
    sin = tl.where(quad == 0, s, tl.where(quad == 1, c, tl.where(quad == 2, -s, -c)))
    return r * cos, r * sin


@triton.jit
def _noise(eps_ptr, offs, mask, seed, counter, HAS_EPS: tl.constexpr):
    """eps at offs, or the counter-based normals: lane k of group `counter` = tl.randn4x output k."""
    if HAS_EPS:
        eps = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        u1, u2, u3, u4 = tl.rand4x(seed, counter)  # (ROWS, BLOCK_D // 4, 1) each
        n1, n2 = _box_muller(u1, u2)
        n3, n4 = _box_muller(u3, u4)
        k = tl.arange(0, 4)[None, None, :]
        eps = tl.where(k == 0, n1, tl.where(k == 1, n2, tl.where(k == 2, n3, n4)))
    return eps


@triton.jit
def _load_prior(ptr, offs, col, mask, PRIOR: tl.constexpr):
    # PRIOR == 1: one (D,) vector for every row (the usual expand view), read by column from
    # cache; PRIOR == 2: (rows, D) contiguous like mu.
    if PRIOR == 1:
        p = tl.load(ptr + col, mask=mask, other=0.0)
    else:
        p = tl.load(ptr + offs, mask=mask, other=0.0)
    return p.to(tl.float32)


@triton.jit
def _reparam_kl_fwd_kernel(
    # outputs: z (rows, D) contiguous, kl (rows,) contiguous; in mu's dtype
    z_ptr,
    kl_ptr,
    # inputs (rows, D) contiguous: mu, logvar, eps (eps read only if HAS_EPS)
    mu_ptr,
    logvar_ptr,
    eps_ptr,
    # prior mean and log-variance: PRIOR 0 none (unused), 1 (D,) for every row, 2 (rows, D)
    pmu_ptr,
    plv_ptr,
    # one int64: the Philox key (read only if not HAS_EPS)
    seed_ptr,
    # sizes; span = D, plus 3 when D % 4 != 0 (rows' tiles start up to 3 columns left of the row)
    n_rows,
    D,
    span,
    # meta: noise source, prior, D % 4 == 0, tile
    HAS_EPS: tl.constexpr,
    PRIOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z = mu + exp(logvar / 2) * eps;  kl = 1/2 sum_D(expm1(d) - d + t^2),
    d = logvar - prior_logvar, t = (mu - prior_mu) exp(-prior_logvar / 2)
    (prior_mu = prior_logvar = 0 without a prior). Math in float32."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    start = rows * D
    seed = 0
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    kl = tl.zeros((ROWS,), dtype=tl.float32)
    chunk = tl.full((), 0, tl.int32)  # a while loop: the interpreter (numpy 2) fails on range(runtime bound)
    while chunk * BLOCK_D < span:
        c0 = chunk * BLOCK_D  # (not a loop-carried c0, so the compiler knows its alignment)
        offs, col, mask, counter = _tile(rows, start, c0, D, ROWS, BLOCK_D, ALIGNED)
        mask = mask & row_ok[:, None, None]
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = _noise(eps_ptr, offs, mask, seed, counter, HAS_EPS)
        z = mu + tl.exp(0.5 * logvar) * eps
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
        if PRIOR:
            plv = _load_prior(plv_ptr, offs, col, mask, PRIOR)
            d = logvar - plv
            t = (mu - _load_prior(pmu_ptr, offs, col, mask, PRIOR)) * tl.exp(-0.5 * plv)
        else:
            d = logvar
            t = mu
        term = tl.where(mask, _expm1_parts(d)[1] + t * t, 0.0)
        kl += tl.sum(tl.sum(term, axis=2), axis=1)
        chunk += 1
    tl.store(kl_ptr + rows, (0.5 * kl).to(kl_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _reparam_kl_bwd_kernel(
    # outputs (rows, D) contiguous, in mu's dtype: grads of mu, logvar, prior_mu, prior_logvar
    # (the prior ones written only if PRIOR)
    gmu_ptr,
    glogvar_ptr,
    gpmu_ptr,
    gplv_ptr,
    # incoming grads: grad_z (rows, D) contiguous, grad_kl (rows,) at element stride stride_gkl
    gz_ptr,
    gkl_ptr,
    stride_gkl,
    # inputs (rows, D) contiguous: mu, logvar, eps (eps read only if HAS_EPS)
    mu_ptr,
    logvar_ptr,
    eps_ptr,
    # prior mean and log-variance: PRIOR 0 none (unused), 1 (D,) for every row, 2 (rows, D)
    pmu_ptr,
    plv_ptr,
    # one int64: the Philox key (read only if not HAS_EPS); the noise is drawn again
    seed_ptr,
    # sizes; span = D, plus 3 when D % 4 != 0 (rows' tiles start up to 3 columns left of the row)
    n_rows,
    D,
    span,
    # meta: noise source, prior, D % 4 == 0, tile
    HAS_EPS: tl.constexpr,
    PRIOR: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """With s = exp(logvar / 2), h = exp(-prior_logvar / 2), t = (mu - prior_mu) h,
    d = logvar - prior_logvar and grad_kl broadcast over D:
        grad_mu           = grad_z + grad_kl t h
        grad_logvar       = 1/2 (grad_z eps s + grad_kl expm1(d))
        grad_prior_mu     = -grad_kl t h
        grad_prior_logvar = -1/2 grad_kl (expm1(d) + t^2)
    (t h = (mu - prior_mu) exp(-prior_logvar), without overflowing exp where the product fits)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    start = rows * D
    seed = 0
    if not HAS_EPS:
        seed = tl.load(seed_ptr)
    gkl = tl.load(gkl_ptr + rows * stride_gkl, mask=row_ok, other=0.0).to(tl.float32)[:, None, None]
    chunk = tl.full((), 0, tl.int32)  # a while loop: the interpreter (numpy 2) fails on range(runtime bound)
    while chunk * BLOCK_D < span:
        c0 = chunk * BLOCK_D  # (not a loop-carried c0, so the compiler knows its alignment)
        offs, col, mask, counter = _tile(rows, start, c0, D, ROWS, BLOCK_D, ALIGNED)
        mask = mask & row_ok[:, None, None]
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(logvar_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = _noise(eps_ptr, offs, mask, seed, counter, HAS_EPS)
        g_logvar_z = gz * eps * tl.exp(0.5 * logvar)
        if PRIOR:
            plv = _load_prior(plv_ptr, offs, col, mask, PRIOR)
            h = tl.exp(-0.5 * plv)
            t = (mu - _load_prior(pmu_ptr, offs, col, mask, PRIOR)) * h
            g_kl_mu = gkl * (t * h)
            em = _expm1_parts(logvar - plv)[0]
            tl.store(gpmu_ptr + offs, (-g_kl_mu).to(gpmu_ptr.dtype.element_ty), mask=mask)
            tl.store(gplv_ptr + offs, (-0.5 * gkl * (em + t * t)).to(gplv_ptr.dtype.element_ty), mask=mask)
        else:
            g_kl_mu = gkl * mu
            em = _expm1_parts(logvar)[0]
        tl.store(gmu_ptr + offs, (gz + g_kl_mu).to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glogvar_ptr + offs, (0.5 * (g_logvar_z + gkl * em)).to(glogvar_ptr.dtype.element_ty), mask=mask)
        chunk += 1


# --- launchers: check, allocate, launch --------------------------------------------------


def _check(mu, logvar, eps, prior_mu, prior_logvar, seed):
    """Checks the op's contract; returns the kernel's sizes (n_rows, D, span) and meta-parameters."""
    check_dtype("mu", mu, "reparam_kl")
    for name, t in (("logvar", logvar), ("eps", eps), ("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if t is not None and t.dtype != mu.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but mu has {mu.dtype}; pass one dtype")
        if t is not None and (t.device != mu.device or t.shape != mu.shape):
            raise ValueError(
                f"{name} must be on mu's device {mu.device} with its shape {tuple(mu.shape)}, got "
                f"{t.device} {tuple(t.shape)}"
            )
    if (eps is None) == (seed is None):
        raise ValueError("exactly one of eps and seed must be given")
    if seed is not None and (seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != mu.device):
        raise ValueError(
            f"seed must be one int64 element on {mu.device}, got {seed.dtype} {tuple(seed.shape)} on {seed.device}"
        )
    if (prior_mu is None) != (prior_logvar is None):
        raise ValueError("prior_mu and prior_logvar must be both given or both None")
    if mu.dim() < 1 or mu.numel() >= _MAX_COUNTER_ELEMS or mu.shape[-1] >= 2**31:
        raise ValueError(f"mu must be (..., D) with fewer than 2^34 elements and D < 2^31, got {tuple(mu.shape)}")
    D = mu.shape[-1]
    span = D + (0 if D % 4 == 0 else 3)
    block_d = min(max(CONFIGS), max(4, triton.next_power_of_2(span)))
    rows_per_program, num_warps = CONFIGS[block_d]
    meta = dict(
        HAS_EPS=eps is not None, ALIGNED=D % 4 == 0, ROWS=rows_per_program, BLOCK_D=block_d, num_warps=num_warps
    )
    return (mu.numel() // D if D else 0, D, span), meta


def _priors(prior_mu, prior_logvar, n_rows, D, unused):
    """(prior_mu, prior_logvar, PRIOR) as the kernels read them: one contiguous (D,) vector each
    when every row shares them (expand views: stride 0 over rows), else (rows, D) contiguous."""
    if prior_mu is None:
        return unused, unused, 0
    pm, plv = prior_mu.reshape(n_rows, D), prior_logvar.reshape(n_rows, D)
    if n_rows == 1 or (pm.stride(0) == 0 and plv.stride(0) == 0):
        return pm[0].contiguous(), plv[0].contiguous(), 1
    return pm.contiguous(), plv.contiguous(), 2


def reparam_kl_forward(mu, logvar, eps, prior_mu, prior_logvar, seed):
    """(z (..., D), kl (...)) in mu's dtype; see _reparam_kl_fwd_kernel."""
    sizes, meta = _check(mu, logvar, eps, prior_mu, prior_logvar, seed)
    n_rows, D, _ = sizes
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    kl = (torch.zeros if D == 0 else torch.empty)(mu.shape[:-1], dtype=mu.dtype, device=mu.device)
    if n_rows == 0:
        return z, kl
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps = mu if eps is None else eps.contiguous()
    pm, plv, prior = _priors(prior_mu, prior_logvar, n_rows, D, mu)
    grid = (triton.cdiv(n_rows, meta["ROWS"]),)
    _reparam_kl_fwd_kernel[grid](
        z, kl, mu, logvar, eps, pm, plv, mu if seed is None else seed, *sizes, PRIOR=prior, **meta
    )
    return z, kl


def reparam_kl_backward(grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, seed):
    """(grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar); the prior grads have mu's
    shape, or are empty (shape (0,)) without a prior. See _reparam_kl_bwd_kernel."""
    sizes, meta = _check(mu, logvar, eps, prior_mu, prior_logvar, seed)
    n_rows, D, _ = sizes
    if grad_z.shape != mu.shape or grad_kl.shape != mu.shape[:-1]:
        raise ValueError(
            f"grad_z must be {tuple(mu.shape)} and grad_kl {tuple(mu.shape[:-1])}, got "
            f"{tuple(grad_z.shape)} and {tuple(grad_kl.shape)}"
        )
    new = lambda: torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)  # noqa: E731
    g_mu, g_logvar = new(), new()
    g_pm, g_plv = (mu.new_empty(0), mu.new_empty(0)) if prior_mu is None else (new(), new())
    if n_rows == 0:
        return g_mu, g_logvar, g_pm, g_plv
    # grad_kl is often a stride-0 expand (kl.sum().backward()): read it in place, by row stride.
    grad_z, grad_kl = grad_z.to(mu.dtype).contiguous(), grad_kl.to(mu.dtype).reshape(n_rows)
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps = mu if eps is None else eps.contiguous()
    pm, plv, prior = _priors(prior_mu, prior_logvar, n_rows, D, mu)
    grid = (triton.cdiv(n_rows, meta["ROWS"]),)
    _reparam_kl_bwd_kernel[grid](
        g_mu,
        g_logvar,
        g_pm if prior else g_mu,
        g_plv if prior else g_mu,
        grad_z,
        grad_kl,
        grad_kl.stride(0),
        mu,
        logvar,
        eps,
        pm,
        plv,
        mu if seed is None else seed,
        *sizes,
        PRIOR=prior,
        **meta,
    )
    return g_mu, g_logvar, g_pm, g_plv


def aot_cases():
    """Every config the launchers pick, under three flag sets that cover every code path
    (for genkern.triton._aot): the VAE hot path (in-kernel noise, standard prior, D % 16 == 0),
    given eps with a shared (D,) prior, and in-kernel noise with a full prior at odd D."""
    flag_sets = (
        (dict(HAS_EPS=False, PRIOR=0, ALIGNED=True), ("D", "span")),
        (dict(HAS_EPS=True, PRIOR=1, ALIGNED=True), ("D", "span")),
        (dict(HAS_EPS=False, PRIOR=2, ALIGNED=False), ()),
    )
    for kernel in (_reparam_kl_fwd_kernel, _reparam_kl_bwd_kernel):
        for block_d, (rows, num_warps) in CONFIGS.items():
            for flags, divisible in flag_sets:
                yield dict(
                    kernel=kernel,
                    constexprs=dict(flags, ROWS=rows, BLOCK_D=block_d),
                    num_warps=num_warps,
                    types={"seed_ptr": "*i64"},
                    divisible=divisible,
                )
