"""A variational autoencoder over genkern.reparameterize_kl (the fused sample + KL op).

Encoder x -> (mu, logvar) of a diagonal Gaussian posterior q(z|x); the latent is sampled
by reparameterization with its KL to N(0, I) computed in the same op; the decoder gives
p(x|z) as one of three likelihoods:

    categorical  logits (N, D, levels) over the `levels` grey levels of every dimension: an
                 exact discrete likelihood, so -log p(x) / (D ln 2) is bits per dimension.
    bernoulli    logits (N, D); x in [0, 1] is the target of a binary cross-entropy.
    gaussian     mean (N, D) and a learned log-std per dimension (shared over examples).

D = prod(data_shape). Two architectures: "mlp" (flattened x) and "conv" for (C, H, W) data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from genkern._dispatch import check_impl
from genkern.models._config import ConfigDict, check_data_shape
from genkern.ops.reparam_kl import reparameterize_kl

LIKELIHOODS = ("categorical", "bernoulli", "gaussian")
ARCHS = ("mlp", "conv")
# The Gaussian decoder's log-std is clamped: pixels that never vary (the digits' borders)
# would otherwise drive it to -inf and the likelihood to +inf.
LOG_STD_MIN, LOG_STD_MAX = -6.0, 2.0
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class VAEConfig(ConfigDict):
    """Defaults: the categorical MLP VAE of the 8x8 digits (Adam lr 1e-3, batch 128, ~1,000 steps
    reach ~2.1 bits/dim on the test split; longer runs overfit the 1,438 training images)."""

    data_shape: tuple = (1, 8, 8)
    likelihood: str = "categorical"  # "categorical" | "bernoulli" | "gaussian"
    levels: int = 17  # grey levels of the categorical decoder (x = level / (levels - 1))
    arch: str = "mlp"  # "mlp" | "conv" (conv needs (C, H, W) with even H and W)
    hidden: int = 256  # width of the hidden layers (conv: channels hidden // 8, hidden // 4)
    depth: int = 2  # hidden layers of the encoder and of the decoder (conv: trunk + depth - 1)
    latent_dim: int = 16
    beta: float = 1.0  # weight of the KL term in the loss
    impl: str = "auto"  # reparameterize_kl impl: "auto" | "torch" | "cpp" | "triton"

    def __post_init__(self):
        self.data_shape = check_data_shape(self.data_shape)
        _check_choice("likelihood", self.likelihood, LIKELIHOODS)
        _check_choice("arch", self.arch, ARCHS)
        self.impl = check_impl(self.impl)
        for name, low in (("levels", 2), ("hidden", 1), ("depth", 1), ("latent_dim", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if (
            isinstance(self.beta, bool)
            or not isinstance(self.beta, (int, float))
            or not math.isfinite(self.beta)
            or self.beta < 0
        ):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        self.beta = float(self.beta)
        if self.arch == "conv":
            if len(self.data_shape) != 3 or self.data_shape[1] % 2 or self.data_shape[2] % 2:
                raise ValueError(f"arch='conv' needs data_shape (C, H, W) with even H and W, got {self.data_shape}")
            if self.hidden < 8:
                raise ValueError(
                    f"arch='conv' needs hidden >= 8 (its channels are hidden // 8, hidden // 4), got {self.hidden}"
                )

    @property
    def dim(self) -> int:
        """D, the number of data dimensions."""
        return math.prod(self.data_shape)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class ELBO(NamedTuple):
    """Scalars: loss = recon + beta * kl; recon = mean -log p(x|z) (nats per example);
    kl = mean KL(q(z|x) || p(z)) per example."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def mlp(in_features: int, hidden: int, depth: int, out_features: int) -> nn.Sequential:
    """`depth` hidden layers of width `hidden` (SiLU), then a linear output: (N, in) -> (N, out)."""
    layers, width = [], in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_features))


class _ConvEncoder(nn.Module):
    """(N, C, H, W) -> (N, out): conv 3x3, conv 4x4 stride 2, then depth - 1 hidden linear layers."""

    def __init__(self, cfg: VAEConfig, out_features: int):
        super().__init__()
        c, h, w = cfg.data_shape
        c1, c2 = cfg.hidden // 8, cfg.hidden // 4
        self.trunk = nn.Sequential(
            nn.Conv2d(c, c1, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
        )
        self.head = mlp(c2 * (h // 2) * (w // 2), cfg.hidden, cfg.depth - 1, out_features)

    def forward(self, x):
        return self.head(self.trunk(x))


class _ConvDecoder(nn.Module):
    """(N, latent) -> (N, C * per_dim, H, W): the encoder mirrored (transposed conv 4x4 stride 2)."""

    def __init__(self, cfg: VAEConfig, per_dim: int):
        super().__init__()
        c, h, w = cfg.data_shape
        c1, c2 = cfg.hidden // 8, cfg.hidden // 4
        self.grid = (c2, h // 2, w // 2)
        self.head = nn.Sequential(mlp(cfg.latent_dim, cfg.hidden, cfg.depth - 1, math.prod(self.grid)), nn.SiLU())
        self.trunk = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(c1, c * per_dim, 3, padding=1)
        )

    def forward(self, z):
        return self.trunk(self.head(z).view(z.shape[0], *self.grid))  # (N, c2, H/2, W/2) -> (N, C*K, H, W)


class VAE(nn.Module):
    """A VAE with an MLP or convolutional encoder/decoder; see the module docstring.

    Shapes: x (N, *data_shape) float; z, eps (N, latent_dim).
    forward(x, eps=None) is elbo(x, eps) (so DistributedDataParallel can wrap the model).
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        self.config = cfg = config
        # Decoder outputs per data dimension: logits over the levels, or one logit / mean.
        self._per_dim = cfg.levels if cfg.likelihood == "categorical" else 1
        if cfg.arch == "mlp":
            self.encoder = mlp(cfg.dim, cfg.hidden, cfg.depth, 2 * cfg.latent_dim)
            self.decoder = mlp(cfg.latent_dim, cfg.hidden, cfg.depth, cfg.dim * self._per_dim)
        else:
            self.encoder = _ConvEncoder(cfg, 2 * cfg.latent_dim)
            self.decoder = _ConvDecoder(cfg, self._per_dim)
        self.log_std = nn.Parameter(torch.zeros(cfg.dim)) if cfg.likelihood == "gaussian" else None

    # --- the pieces ------------------------------------------------------------------

    def encode(self, x):
        """x (N, *data_shape) -> mu, logvar (N, latent_dim) each."""
        cfg = self.config
        h = x if cfg.likelihood == "gaussian" else 2 * x - 1  # [0, 1] data centred for the first layer
        if cfg.arch == "mlp":
            h = h.reshape(x.shape[0], cfg.dim)  # (N, D)
        return self.encoder(h).chunk(2, dim=-1)

    def decode(self, z):
        """z (N, latent_dim) -> decoder output: categorical logits (N, D, levels), else (N, D)."""
        cfg, n = self.config, z.shape[0]
        out = self.decoder(z)
        if cfg.arch == "conv" and self._per_dim > 1:
            # Output channel c * levels + k holds the logit of level k for every pixel of channel c.
            return rearrange(out, "n (c k) h w -> n (c h w) k", k=self._per_dim)
        return out.reshape(n, cfg.dim, self._per_dim) if self._per_dim > 1 else out.reshape(n, cfg.dim)

    def _log_std(self):
        return self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)  # (D,)

    def log_prob(self, x_flat, out):
        """log p(x|z) per example (N,): x_flat (N, D) data, `out` from decode()."""
        lik = self.config.likelihood
        if lik == "categorical":
            index = (x_flat * (self.config.levels - 1)).round().long()  # (N, D) level of every dimension
            return torch.gather(F.log_softmax(_up(out), -1), -1, index[..., None]).squeeze(-1).sum(-1)
        if lik == "bernoulli":
            return -F.binary_cross_entropy_with_logits(_up(out), _up(x_flat), reduction="none").sum(-1)
        log_std = self._log_std()
        t = (_up(x_flat) - _up(out)) * torch.exp(-log_std)
        return -(0.5 * t * t + log_std + 0.5 * _LOG_2PI).sum(-1)

    def _point(self, out):
        """Decoder output -> (N, D) in data space: the most likely level / (levels - 1), the
        Bernoulli probabilities, or the Gaussian mean."""
        lik = self.config.likelihood
        if lik == "categorical":
            return out.argmax(-1).float() / (self.config.levels - 1)
        return torch.sigmoid(out) if lik == "bernoulli" else out

    # --- training --------------------------------------------------------------------

    def elbo(self, x, eps=None) -> ELBO:
        """Negative ELBO terms for x (N, *data_shape); eps optional (N, latent_dim) N(0, 1) noise
        (None: drawn inside the fused op)."""
        self._check_x(x)
        mu, logvar = self.encode(x)
        if eps is not None:
            if not isinstance(eps, torch.Tensor) or eps.shape != mu.shape:
                got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
                raise ValueError(f"eps must be a tensor of shape {tuple(mu.shape)}, got {got}")
            eps = eps.to(mu.dtype)
        z, kl = reparameterize_kl(mu, logvar, eps, impl=self.config.impl)  # (N, latent), (N,)
        recon = -self.log_prob(x.reshape(x.shape[0], -1), self.decode(z))  # (N,)
        recon, kl = recon.mean(), _up(kl).mean()
        return ELBO(recon + self.config.beta * kl, recon, kl)

    forward = elbo

    # --- evaluation and sampling -----------------------------------------------------

    @torch.no_grad()
    def log_likelihood(self, x, num_samples: int = 1, *, generator=None, batch_size: int = 4096):
        """Importance-weighted lower bound on log p(x), in nats, float64 (N,).

        log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q(z|x), K = num_samples. K=1 is the
        (beta=1) ELBO in expectation; the bound tightens as K grows. At most `batch_size`
        (example, sample) pairs are decoded at once; the log-weights are gathered in float64.
        """
        self._check_x(x)
        k = num_samples
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {k!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        n, ld = x.shape[0], self.config.latent_dim
        rows, k_chunk = max(1, batch_size // k), min(k, batch_size)
        out = []
        for start in range(0, n, rows):
            xb = x[start : start + rows]
            nb = xb.shape[0]
            mu, logvar = (_up(t) for t in self.encode(xb))  # (nb, L) each
            std = torch.exp(0.5 * logvar)
            x_flat = xb.reshape(nb, -1)
            log_w = []
            for k0 in range(0, k, k_chunk):
                kc = min(k_chunk, k - k0)
                eps = _randn((nb, kc, ld), generator, x.device)  # (nb, kc, L)
                z = mu[:, None] + std[:, None] * eps  # (nb, kc, L)
                log_q = -(0.5 * eps * eps + 0.5 * logvar[:, None] + 0.5 * _LOG_2PI).sum(-1)  # (nb, kc)
                log_pz = -(0.5 * z * z + 0.5 * _LOG_2PI).sum(-1)
                x_rep = repeat(x_flat, "n d -> (n k) d", k=kc)  # (nb*kc, D)
                z_flat = rearrange(z, "n k l -> (n k) l").to(self._dtype())
                log_px = rearrange(self.log_prob(x_rep, self.decode(z_flat)), "(n k) -> n k", k=kc)
                log_w.append(log_px.double() + log_pz.double() - log_q.double())
            log_w = torch.cat(log_w, dim=1)  # (nb, K)
            out.append(torch.logsumexp(log_w, dim=1) - math.log(k))
        return torch.cat(out) if out else x.new_zeros(0, dtype=torch.float64)

    @torch.no_grad()
    def sample(self, n: int, *, generator=None):
        """n draws x ~ p(x|z), z ~ N(0, I): (n, *data_shape) in data space. Categorical: a sampled
        level / (levels - 1) per dimension; Bernoulli: the probabilities; Gaussian: the mean."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        device = self._device()
        z = _randn((n, self.config.latent_dim), generator, device).to(self._dtype())
        out = self.decode(z)
        if self.config.likelihood == "categorical":
            # Inverse-CDF sampling from uniforms drawn on the generator's own device.
            cdf = F.softmax(_up(out), -1).cumsum(-1)  # (n, D, levels)
            u = _rand((n, self.config.dim, 1), generator, device)
            level = (cdf < u).sum(-1).clamp_(max=self.config.levels - 1)  # (n, D)
            x = level.float() / (self.config.levels - 1)
        else:
            x = self._point(out).float()
        return x.view(n, *self.config.data_shape)

    @torch.no_grad()
    def reconstruct(self, x):
        """x (N, *data_shape) -> decoded posterior mean (N, *data_shape); categorical: the most
        likely level / (levels - 1)."""
        self._check_x(x)
        mu, _ = self.encode(x)
        return self._point(self.decode(mu)).float().view(x.shape)

    # --- checks and helpers ----------------------------------------------------------

    def _check_x(self, x):
        cfg = self.config
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"x must be a floating-point tensor, got {x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.dim() != len(cfg.data_shape) + 1 or tuple(x.shape[1:]) != cfg.data_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, cfg.data_shape))}), got {tuple(x.shape)}")
        if x.numel() and cfg.likelihood != "gaussian" and bool(((x < 0) | (x > 1) | x.isnan()).any()):
            raise ValueError(
                f"x must lie in [0, 1] for the {cfg.likelihood} likelihood, got values in "
                f"[{x.min().item():.4g}, {x.max().item():.4g}]"
            )

    def _device(self):
        return next(self.parameters()).device

    def _dtype(self):
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        c = self.config
        return f"{c.arch}, {c.likelihood}, data_shape={c.data_shape}, latent_dim={c.latent_dim}, beta={c.beta}"


def _up(t):
    # Half-precision outputs are scored in float32 (log_softmax and exp over 17 levels);
    # float32 and float64 stay as they are.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _randn(shape, generator, device):
    # Drawn on the generator's device (a CPU generator can seed CUDA sampling), then moved.
    g_device = device if generator is None else generator.device
    return torch.randn(shape, generator=generator, device=g_device).to(device)


def _rand(shape, generator, device):
    g_device = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=g_device).to(device)
