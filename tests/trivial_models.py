"""Trivial models of the digits and the ring: the negative controls of tests/test_quality.py.

Each is what a model that learned nothing beyond first-order statistics would produce, built
in closed form (no training, deterministic). A quality threshold is only worth something if
these fail it while the trained models pass:

- the counting model: an independent categorical per pixel, its 17 level probabilities
  counted on the training digits (no latent, no pixel interactions);
- independent-pixel samples: every pixel drawn from its own counted marginal;
- a collapsed VAE: the genkern VAE whose encoder outputs the prior (mu = 0, logvar = 0) and
  whose decoder ignores z (output weights zero, output bias = the counted log-marginals);
- a marginal GAN: a genkern GAN whose generator maps each noise coordinate through the
  normal CDF and then the inverse CDF of one pixel's marginal (independent pixels, drawn
  through the same z -> sample interface the GAN evaluation uses);
- a ring GAN that spreads its samples uniformly over the circle the modes sit on.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from genkern.data.base import Dataset
from genkern.data.digits import LEVELS, PIXELS, SHAPE
from genkern.models.gan import GAN, GANConfig
from genkern.models.vae import VAE, VAEConfig

# Add-k smoothing of the level counts (Krichevsky-Trofimov): a level never seen for a pixel in
# training must not make a test image impossible. The choice barely matters: k in 0.01..2 gives
# 2.418-2.423 bits/dim on the test split.
SMOOTHING = 0.5


def pixel_levels(data: Dataset) -> torch.Tensor:
    """The integer level 0..16 of every pixel: int64 (N, 64)."""
    return (data.x.reshape(len(data.x), PIXELS) * (LEVELS - 1)).round().long()  # (N, 64)


def counted_log_marginals(train: Dataset) -> torch.Tensor:
    """log p(level | pixel) of the counting model, float64 (64, 17): smoothed level frequencies."""
    levels = pixel_levels(train)  # (N, 64)
    counts = torch.zeros(PIXELS, LEVELS, dtype=torch.float64)
    counts.scatter_add_(1, levels.T, torch.ones(levels.T.shape, dtype=torch.float64))  # (64, 17)
    counts += SMOOTHING
    return (counts / counts.sum(dim=1, keepdim=True)).log()


def counting_bits_per_dim(log_marginals: torch.Tensor, test: Dataset) -> float:
    """The counting model's exact test log-likelihood in bits/dim: -mean_n sum_d log p_d(x_nd) / (64 ln 2).

    Written out here from the formula, independently of the VAE code it is compared with.
    """
    levels = pixel_levels(test)  # (N, 64)
    log_p = log_marginals.gather(1, levels.T)  # (64, N): log p_d(x_nd)
    return float(-log_p.sum(dim=0).mean() / (PIXELS * math.log(2.0)))


def marginal_samples(log_marginals: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n images with every pixel drawn independently from its marginal: float32 (n, 1, 8, 8)."""
    probs = log_marginals.exp().float()  # (64, 17)
    levels = torch.multinomial(probs, n, replacement=True, generator=generator).T  # (n, 64)
    return (levels.float() / (LEVELS - 1)).reshape(n, *SHAPE)


def collapsed_vae(log_marginals: torch.Tensor) -> VAE:
    """The default digits VAE with its posterior collapsed onto the prior and its decoder blind to z.

    q(z|x) = N(0, I) = p(z) exactly, so the KL term is 0 and every importance weight is
    p(x|z) = the counting model's p(x): its ELBO and importance-weighted bound both equal the
    counting model's log-likelihood, and its samples are independent-pixel samples.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = VAE(VAEConfig())
    encoder_out, decoder_out = vae.encoder[-1], vae.decoder[-1]
    with torch.no_grad():
        encoder_out.weight.zero_()
        encoder_out.bias.zero_()  # mu = 0, logvar = 0
        decoder_out.weight.zero_()
        decoder_out.bias.copy_(log_marginals.reshape(-1))  # (64 * 17,): pixel d, level k at d * 17 + k
    return vae.eval()


class MarginalGenerator(nn.Module):
    """z (N, 64) -> (N, 1, 8, 8): pixel d takes the level whose marginal CDF interval holds Phi(z_d).

    With z ~ N(0, I), Phi(z_d) is uniform and independent across d, so each pixel is an
    independent draw from its own marginal: a generator that learned the pixel marginals only.
    The CDFs are its one (frozen) parameter: GAN.sample reads the generator's parameter dtype.
    """

    def __init__(self, log_marginals: torch.Tensor):
        super().__init__()
        self.cdf = nn.Parameter(log_marginals.exp().cumsum(dim=1).float(), requires_grad=False)  # (64, 17)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = 0.5 * (1 + torch.erf(z.float() / math.sqrt(2.0)))  # (N, 64) uniform in (0, 1)
        levels = (self.cdf < u[..., None]).sum(dim=-1).clamp_(max=LEVELS - 1)  # (N, 64)
        return (levels.float() / (LEVELS - 1)).reshape(z.shape[0], *SHAPE)


def marginal_gan(log_marginals: torch.Tensor) -> GAN:
    """A digits GAN (latent_dim 64, no EMA copy) whose generator is MarginalGenerator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gan = GAN(GANConfig(latent_dim=PIXELS, ema_decay=0.0))
    gan.generator = MarginalGenerator(log_marginals)
    return gan.eval()


class UniformRingGenerator(nn.Module):
    """z (N, latent_dim) -> (N, 2): radius * (cos, sin) of 2 pi Phi(z_0), uniform on the circle."""

    def __init__(self, radius: float = 2.0):
        super().__init__()
        self.radius = nn.Parameter(torch.tensor(float(radius)), requires_grad=False)  # a parameter, as above

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        angle = math.pi * (1 + torch.erf(z[:, 0].float() / math.sqrt(2.0)))  # (N,) uniform in (0, 2 pi)
        return self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (N, 2)


def uniform_ring_gan() -> GAN:
    """A ring GAN (the trainer's ring config) whose samples lie uniformly on the modes' circle."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gan = GAN(GANConfig(data_shape=(2,), arch="mlp", output="linear", ema_decay=0.0))
    gan.generator = UniformRingGenerator()
    return gan.eval()
