"""Fused reparameterized sampling with its KL divergence (the VAE hot path)."""

from __future__ import annotations

import torch

from genkern.ops._common import KernelOp, check_float_tensor, refuse_double_backward
from genkern.reference import reparam_kl as reference


def reparameterize_kl(mu, logvar, eps=None, *, prior_mu=None, prior_logvar=None, generator=None, impl="auto"):
    """Samples z ~ N(mu, exp(logvar)) by reparameterization and returns its KL to a prior.

    Args:
        mu: (..., D) floating tensor, the posterior mean.
        logvar: (..., D) tensor of mu's dtype and device, the posterior log-variance.
        eps: optional (..., D) noise of mu's dtype; None draws standard normal
            noise inside the kernel (never stored; the backward pass draws it again).
        prior_mu, prior_logvar: optional prior mean and log-variance, broadcastable
            to (..., D). Both None: the standard normal prior; one None: 0 for it.
        generator: torch.Generator the noise seed is drawn from (default: torch's).
        impl: "auto" | "torch" | "cpp" | "triton" (default from GENKERN_IMPL).

    Returns:
        z: (..., D), mu + exp(logvar / 2) * eps, in mu's dtype.
        kl: (...), sum over D of KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))),
            in mu's dtype.

    Float16 and bfloat16 are computed in float32. Gradients flow to mu, logvar,
    eps and the prior tensors. The same seed gives the same z on the same impl;
    the C++ and Triton impls draw the same noise (up to rounding), the torch impl
    draws with torch.randn.
    """
    _check_args(mu, logvar, eps, prior_mu, prior_logvar)
    backend = REPARAM_KL.resolve(impl, mu)
    if backend == "torch":
        return reference.reparameterize_kl(
            mu, logvar, eps, prior_mu=prior_mu, prior_logvar=prior_logvar, generator=generator
        )
    pm, plv = _broadcast_prior(mu, prior_mu, prior_logvar)
    seed = None if eps is not None else _draw_seed(generator, mu.device)
    return REPARAM_KL(backend, mu, logvar, eps, pm, plv, seed)


def _check_args(mu, logvar, eps, prior_mu, prior_logvar):
    check_float_tensor(mu, "mu")
    check_float_tensor(logvar, "logvar", like=mu, like_name="mu")
    if mu.dim() < 1:
        raise ValueError(f"mu must have at least one dimension (..., D), got a {mu.dim()}-d tensor")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have mu's shape {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if eps is not None:
        check_float_tensor(eps, "eps", like=mu, like_name="mu")
        if eps.shape != mu.shape:
            raise ValueError(f"eps must have mu's shape {tuple(mu.shape)}, got {tuple(eps.shape)}")
    for name, p in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if p is None:
            continue
        check_float_tensor(p, name, like=mu, like_name="mu")
        try:
            shape = torch.broadcast_shapes(p.shape, mu.shape)
        except RuntimeError:
            shape = None
        if shape != mu.shape:
            raise ValueError(f"{name} of shape {tuple(p.shape)} does not broadcast to mu's shape {tuple(mu.shape)}")


def _broadcast_prior(mu, prior_mu, prior_logvar):
    # The kernels take the prior at mu's full shape; expand() is a free view, and
    # autograd's expand backward sums the gradient back to the prior's own shape.
    if prior_mu is None and prior_logvar is None:
        return None, None
    zero = mu.new_zeros(())
    pm = (zero if prior_mu is None else prior_mu).expand(mu.shape)
    plv = (zero if prior_logvar is None else prior_logvar).expand(mu.shape)
    return pm, plv


def _draw_seed(generator, device):
    # One int64 draw from the generator (on mu's device, so CUDA never syncs):
    # the kernels read it as the Philox key and the backward reuses it.
    gen_device = device if generator is None else generator.device
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=gen_device, generator=generator)
    return seed if seed.device == device else seed.to(device, non_blocking=True)


# --- the op: fake kernels and autograd ------------------------------------------------
# csrc/reparam_kl_autograd.cpp registers the same autograd in C++ where genkern._C is loaded.


def _fake_fwd(mu, logvar, eps, prior_mu, prior_logvar, seed):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(mu.shape[:-1])


def _fake_bwd(grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, seed):
    like = lambda: torch.empty_like(mu, memory_format=torch.contiguous_format)  # noqa: E731
    has_prior = prior_mu is not None
    return like(), like(), like() if has_prior else mu.new_empty(0), like() if has_prior else mu.new_empty(0)


def _setup_context(ctx, inputs, output):
    # The inputs only: never the noise, which the backward draws again from the seed.
    ctx.save_for_backward(*(t for t in inputs if t is not None))
    ctx.given = tuple(t is not None for t in inputs)  # which optional inputs (eps, priors, seed) were passed


def _backward(ctx, grad_z, grad_kl):
    refuse_double_backward("reparameterize_kl")
    saved = iter(ctx.saved_tensors)
    mu, logvar, eps, prior_mu, prior_logvar, seed = (next(saved) if given else None for given in ctx.given)
    # An output that did not reach the loss has no gradient: it contributes zero.
    grad_z = torch.zeros_like(mu, memory_format=torch.contiguous_format) if grad_z is None else grad_z
    grad_kl = mu.new_zeros(mu.shape[:-1]) if grad_kl is None else grad_kl
    g_mu, g_logvar, g_pm, g_plv = REPARAM_KL.op(ctx.family, "bwd")(
        grad_z, grad_kl, mu, logvar, eps, prior_mu, prior_logvar, seed
    )
    g_eps = None
    if eps is not None and ctx.needs_input_grad[2]:
        # d z / d eps = exp(logvar / 2), in float32 for half inputs like the kernels.
        ct = torch.promote_types(mu.dtype, torch.float32)
        g_eps = (grad_z.to(ct) * torch.exp(0.5 * logvar.to(ct))).to(mu.dtype)
    has_prior = prior_mu is not None
    return g_mu, g_logvar, g_eps, g_pm if has_prior else None, g_plv if has_prior else None, None


REPARAM_KL = KernelOp(
    "reparam_kl",
    "reparameterize_kl",
    fake=_fake_fwd,
    fake_bwd=_fake_bwd,
    backward=_backward,
    setup_context=_setup_context,
    eager="reparam_kl",
)
REPARAM_KL.register()
