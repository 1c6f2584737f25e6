"""GaussianLatent: the VAE latent layer over genkern.reparameterize_kl."""

from __future__ import annotations

import torch
from torch import nn

from genkern.ops.reparam_kl import reparameterize_kl


class GaussianLatent(nn.Module):
    """Maps features to a diagonal Gaussian posterior, samples it and returns its KL.

    `forward(h)` with h of shape (..., in_features) returns (z, kl, mu, logvar):
    z (..., latent_dim) sampled by reparameterization (the mean when
    `sample=False` or in eval mode with `sample_in_eval=False`), kl (...) the KL
    to the prior. The prior is standard normal, or learned (a mean and
    log-variance per latent dimension) with `learn_prior=True`.
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        *,
        learn_prior: bool = False,
        sample_in_eval: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if in_features < 1 or latent_dim < 1:
            raise ValueError(f"in_features and latent_dim must be positive, got {in_features}, {latent_dim}")
        self.latent_dim = latent_dim
        self.impl = impl
        self.sample_in_eval = sample_in_eval
        self.proj = nn.Linear(in_features, 2 * latent_dim)
        if learn_prior:
            self.prior_mu = nn.Parameter(torch.zeros(latent_dim))
            self.prior_logvar = nn.Parameter(torch.zeros(latent_dim))
        else:
            self.prior_mu = self.prior_logvar = None

    def forward(self, h, *, sample: bool | None = None, generator=None):
        mu, logvar = self.proj(h).chunk(2, dim=-1)  # (..., latent_dim) each
        if sample is None:
            sample = self.training or self.sample_in_eval
        eps = None if sample else torch.zeros_like(mu)
        z, kl = reparameterize_kl(
            mu, logvar, eps, prior_mu=self.prior_mu, prior_logvar=self.prior_logvar, generator=generator, impl=self.impl
        )
        return z, kl, mu, logvar

    def extra_repr(self) -> str:
        learned = self.prior_mu is not None
        return f"{self.proj.in_features} -> {self.latent_dim}, learn_prior={learned}, impl={self.impl!r}"
