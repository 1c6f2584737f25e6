"""Plain-PyTorch reparameterized sampling with its KL divergence: the spec.

This file is the definition the kernels are tested against and the fallback when
no kernel is available. It is written to be exact (float64-safe), not fast: the
benchmarks' plain-PyTorch speed baseline lives in genkern.bench.baselines.

Math, for mu, logvar of shape (..., D) and a diagonal Gaussian prior
N(prior_mu, exp(prior_logvar)) (standard normal when not given):

    std = exp(logvar / 2)
    z   = mu + std * eps                                   (..., D)
    d   = logvar - prior_logvar
    t   = (mu - prior_mu) * exp(-prior_logvar / 2)
    kl  = 1/2 * sum_D( expm1(d) - d + t^2 )                (...)

which is KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over
the last dimension; with the standard prior d = logvar and t = mu. `expm1(d) - d`
keeps precision when logvar is close to prior_logvar, and squaring t (rather than
multiplying (mu - prior_mu)^2 by exp(-prior_logvar)) avoids overflowing an
intermediate when the result fits.

The in-kernel noise (C++ and Triton impls, eps=None) is counter based, so it
is never stored: the backward pass draws it again from the same seed.
Element i of the row-major flattened output uses Philox4x32-10 keyed by the
64-bit seed (low word, high word) at counter (i // 4, 0, 0, 0); the four
32-bit words become four uniforms u = int32(word) mapped to [0, 1) as
(w if w >= 0 else -w - 1) * 2^-31, and Box-Muller turns (u1, u2) and (u3, u4)
into the normals (n1, n2) and (n3, n4), with u1, u3 clamped below at 1e-7.
Element i takes n[i % 4]. This is Triton's `tl.randn4x`; `philox_normal`
below computes it in plain PyTorch for the tests.
"""

from __future__ import annotations

import math

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are computed in float32 (as the kernels do), so that
    # exp() of a float16 logvar above ~11 does not overflow an intermediate.
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def kl_divergence(mu, logvar, prior_mu=None, prior_logvar=None):
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed over the last dim.

    Shapes: mu, logvar (..., D); priors broadcast against mu; result (...).
    """
    ct = _compute_dtype(mu.dtype)
    mu, logvar = mu.to(ct), logvar.to(ct)
    # A missing prior term is skipped, not applied as zeros: subtracting 0 and scaling by
    # exp(0) = 1 change no value, so the standard prior reads d = logvar and t = mu directly.
    # prior_logvar is cast once, so that its two gradient terms add up in the compute dtype.
    plv = None if prior_logvar is None else prior_logvar.to(ct)
    d = logvar if plv is None else logvar - plv
    t = mu if prior_mu is None else mu - prior_mu.to(ct)
    if plv is not None:
        t = t * torch.exp(-0.5 * plv)
    return (0.5 * (torch.expm1(d) - d + t * t)).sum(-1)


def reparameterize_kl(mu, logvar, eps=None, *, prior_mu=None, prior_logvar=None, generator=None):
    """Returns (z, kl) as defined in the module docstring, differentiable by autograd.

    With eps=None the noise is drawn with torch.randn (materialised, from
    `generator` or torch's default generator) — the plain-PyTorch way.
    """
    if eps is None:
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    # One cast of mu and logvar to the compute dtype, shared by z and kl: their gradients then
    # add up in float32 and round to a half-precision dtype once (two casts would add them
    # in float16, where a sum of finite float32 terms can overflow).
    mu_c, logvar_c = mu.to(_compute_dtype(mu.dtype)), logvar.to(_compute_dtype(mu.dtype))
    z = mu_c + torch.exp(0.5 * logvar_c) * eps.to(mu_c.dtype)
    kl = kl_divergence(mu_c, logvar_c, prior_mu, prior_logvar)
    return z.to(mu.dtype), kl.to(mu.dtype)


# --- the counter-based noise, in plain PyTorch (for tests) ---------------------------

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57


def philox4x32(seed: int, counter: torch.Tensor, rounds: int = 10):
    """Philox4x32 of counters (counter, 0, 0, 0) under key (seed_lo, seed_hi).

    `counter`: int64 tensor of values in [0, 2^32). Returns four int64 tensors
    holding the uint32 output words. Products of two uint32 values wrap in
    int64 but keep their low 64 bits, so `>> 32 & M32` is the exact high word.
    """
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0 = counter.to(torch.int64) & _M32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        p_b, p_a = _PHILOX_ROUND_B * c2, _PHILOX_ROUND_A * c0
        c0, c1, c2, c3 = (
            ((p_b >> 32) & _M32) ^ c1 ^ k0,
            p_b & _M32,
            ((p_a >> 32) & _M32) ^ c3 ^ k1,
            p_a & _M32,
        )
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def philox_normal(seed: int, numel: int, device="cpu") -> torch.Tensor:
    """The in-kernel standard normal noise for elements 0..numel-1, float32."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    words = philox4x32(seed, groups)
    u = []
    for w in words:
        w = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret as int32
        w = torch.where(w < 0, -w - 1, w)
        u.append(w.to(torch.float32) * 4.6566127342e-10)
    out = []
    for ua, ub in ((u[0], u[1]), (u[2], u[3])):
        r = torch.sqrt(-2.0 * torch.log(torch.clamp(ua, min=1.0e-7)))
        theta = (2.0 * math.pi) * ub
        out += [r * torch.cos(theta), r * torch.sin(theta)]
    return torch.stack(out, dim=-1).reshape(-1)[:numel]
