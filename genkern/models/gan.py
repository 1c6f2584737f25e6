"""A GAN over genkern's fused GAN losses: MLP or DCGAN-style networks, R1, spectral norm, EMA.

generator      z (N, latent_dim) -> x (N, *data_shape)
discriminator  x (N, *data_shape) -> logits (N,)

The discriminator has no BatchNorm: its batch statistics would mix real and fake examples
and make a sharded batch differ from the same batch on one process. For the same reason the
DCGAN generator normalizes per sample (GroupNorm).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from genkern._dispatch import check_impl
from genkern.models._config import ConfigDict, check_data_shape
from genkern.ops.gan_loss import KINDS, discriminator_loss, generator_loss

ARCHS = ("mlp", "dcgan")
OUTPUTS = ("sigmoid", "tanh", "linear")
MODES = ("d", "g")


@dataclass
class GANConfig(ConfigDict):
    """Defaults: the MLP GAN that trains on the 8x8 digits in ~2,000 steps (Adam lr 1e-3,
    betas (0.5, 0.999), batch 256); the ring of Gaussians needs data_shape=(2,), output="linear"."""

    data_shape: tuple = (1, 8, 8)
    arch: str = "mlp"  # "mlp" | "dcgan" (dcgan: (C, H, W), H and W multiples of 2**depth)
    latent_dim: int = 32
    hidden: int = 256  # MLP width; DCGAN: channels at the coarsest resolution
    depth: int = 2  # MLP: hidden layers per network; DCGAN: stride-2 stages
    loss: str = "relativistic"  # any genkern GAN loss kind
    spectral_norm: bool = False  # on every discriminator layer
    r1_gamma: float = 0.01  # R1 penalty gamma / 2 * E ||grad_x D(real)||^2 (0: off)
    ema_decay: float = 0.99  # decay of the generator's moving average (0: no EMA copy)
    output: str = "sigmoid"  # generator output: "sigmoid" ([0, 1]) | "tanh" | "linear"
    impl: str = "auto"  # GAN loss impl: "auto" | "torch" | "cpp" | "triton"

    def __post_init__(self):
        self.data_shape = check_data_shape(self.data_shape)
        for name, choices in (("arch", ARCHS), ("loss", KINDS), ("output", OUTPUTS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        self.impl = check_impl(self.impl)
        for name in ("latent_dim", "hidden", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.spectral_norm, bool):
            raise ValueError(f"spectral_norm must be a bool, got {self.spectral_norm!r}")
        if (
            isinstance(self.r1_gamma, bool)
            or not isinstance(self.r1_gamma, (int, float))
            or not math.isfinite(self.r1_gamma)
            or self.r1_gamma < 0
        ):
            raise ValueError(f"r1_gamma must be a finite number >= 0, got {self.r1_gamma!r}")
        if (
            isinstance(self.ema_decay, bool)
            or not isinstance(self.ema_decay, (int, float))
            or not 0 <= self.ema_decay < 1
        ):
            raise ValueError(f"ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
        self.r1_gamma, self.ema_decay = float(self.r1_gamma), float(self.ema_decay)
        if self.arch == "dcgan":
            f = 2**self.depth
            if len(self.data_shape) != 3 or self.data_shape[1] % f or self.data_shape[2] % f:
                raise ValueError(
                    f"arch='dcgan' needs data_shape (C, H, W) with H and W multiples of "
                    f"2**depth = {f}, got {self.data_shape}"
                )
            if self.hidden >> (self.depth - 1) < 1:
                raise ValueError(
                    f"arch='dcgan' halves hidden at each of depth - 1 stages: hidden={self.hidden} "
                    f"is too small for depth={self.depth}"
                )

    @property
    def dim(self) -> int:
        """D, the number of data dimensions."""
        return math.prod(self.data_shape)


_OUTPUT = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "linear": nn.Identity}


def _group_norm(channels):
    # Per-sample normalization (no batch statistics): 8 groups where they divide evenly.
    return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)


class _Reshape(nn.Module):
    def __init__(self, *shape):
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)  # (N, *shape)

    def extra_repr(self) -> str:
        return f"(N, {', '.join(map(str, self.shape))})"


def mlp_generator(cfg: GANConfig) -> nn.Sequential:
    """(N, latent_dim) -> (N, *data_shape): depth ReLU layers of width hidden, then the output map."""
    layers, width = [], cfg.latent_dim
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    return nn.Sequential(*layers, nn.Linear(width, cfg.dim), _OUTPUT[cfg.output](), _Reshape(*cfg.data_shape))


def mlp_discriminator(cfg: GANConfig) -> nn.Sequential:
    """(N, *data_shape) -> (N, 1): depth LeakyReLU(0.2) layers of width hidden."""
    layers, width = [nn.Flatten()], cfg.dim
    for _ in range(cfg.depth):
        layers += [nn.Linear(width, cfg.hidden), nn.LeakyReLU(0.2)]
        width = cfg.hidden
    return nn.Sequential(*layers, nn.Linear(width, 1))


def dcgan_generator(cfg: GANConfig) -> nn.Sequential:
    """(N, latent_dim) -> linear to (N, hidden, H / 2**depth, W / 2**depth), then depth transposed
    convs 4x4 stride 2 halving the channels (GroupNorm + ReLU between) -> (N, C, H, W)."""
    c, h, w = cfg.data_shape
    f = 2**cfg.depth
    ch = cfg.hidden
    layers = [
        nn.Linear(cfg.latent_dim, ch * (h // f) * (w // f)),
        _Reshape(ch, h // f, w // f),
        _group_norm(ch),
        nn.ReLU(),
    ]
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        out = c if last else ch // 2
        layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1))  # (N, out, 2h, 2w)
        if not last:
            layers += [_group_norm(out), nn.ReLU()]
        ch = out
    return nn.Sequential(*layers, _OUTPUT[cfg.output]())


def dcgan_discriminator(cfg: GANConfig) -> nn.Sequential:
    """(N, C, H, W) -> depth convs 4x4 stride 2 (LeakyReLU, channels doubling up to hidden)
    -> (N, hidden, H / 2**depth, W / 2**depth) -> linear -> (N, 1)."""
    c, h, w = cfg.data_shape
    f = 2**cfg.depth
    layers, ch = [], c
    for i in range(cfg.depth):
        out = cfg.hidden >> (cfg.depth - 1 - i)
        layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * (h // f) * (w // f), 1))


class GAN(nn.Module):
    """Generator, discriminator and (ema_decay > 0) the generator's moving average.

    forward(mode, real=None, z=None) -> dict of scalar tensors:
      "d": {"loss", "d_loss", "r1" (r1_gamma > 0)}; real (N, *data_shape) required, z (N, latent_dim)
           or None (drawn). One discriminator forward over cat(real, G(z)) with G under no_grad.
      "g": {"loss", "g_loss"}; z (N, latent_dim), or None with real given (N drawn). The
           relativistic kind also needs real (one discriminator forward over cat(real, fake)).
    """

    def __init__(self, config: GANConfig):
        super().__init__()
        if not isinstance(config, GANConfig):
            raise TypeError(f"config must be a GANConfig, got {type(config).__name__}")
        self.config = cfg = config
        if cfg.arch == "mlp":
            self.generator, self.discriminator = mlp_generator(cfg), mlp_discriminator(cfg)
        else:
            self.generator, self.discriminator = dcgan_generator(cfg), dcgan_discriminator(cfg)
            self.apply(_dcgan_init)
        if cfg.spectral_norm:
            for name, layer in list(self.discriminator.named_children()):
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    setattr(self.discriminator, name, _spectral_norm(layer))
        self.generator_ema = None
        if cfg.ema_decay > 0:
            self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def forward(self, mode: str, real=None, z=None) -> dict:
        if mode not in MODES:
            raise ValueError(f"mode must be 'd' or 'g', got {mode!r}")
        cfg = self.config
        if real is not None:
            self._check_real(real)
        n = real.shape[0] if real is not None else None
        if mode == "d" and real is None:
            raise ValueError("mode 'd' needs real, a (N, *data_shape) batch")
        if mode == "g" and cfg.loss == "relativistic" and real is None:
            raise ValueError("the relativistic generator loss needs real, a (N, *data_shape) batch")
        z = self._check_z(z, n) if z is not None else self._draw_z(n)
        if mode == "d":
            return self._d_step(real, z)
        fake = self.generator(z)  # (M, *data_shape)
        if cfg.loss == "relativistic":
            logits = self.discriminator(torch.cat([real.detach().to(fake.dtype), fake]))[:, 0]  # (N + M,)
            real_logits, fake_logits = logits[:n], logits[n:]
        else:
            real_logits, fake_logits = None, self.discriminator(fake)[:, 0]
        g_loss = generator_loss(fake_logits, cfg.loss, real_logits=real_logits, impl=cfg.impl)
        return {"loss": g_loss, "g_loss": g_loss}

    def _d_step(self, real, z):
        cfg = self.config
        with torch.no_grad():
            fake = self.generator(z)
        real = real.detach().to(fake.dtype)
        if cfg.r1_gamma > 0:
            real.requires_grad_(True)
        n = real.shape[0]
        logits = self.discriminator(torch.cat([real, fake]))[:, 0]  # (N + M,): one forward
        real_logits, fake_logits = logits[:n], logits[n:]
        d_loss = discriminator_loss(real_logits, fake_logits, cfg.loss, impl=cfg.impl)
        out = {"loss": d_loss, "d_loss": d_loss}
        if cfg.r1_gamma > 0:
            # No batch statistics in D: the gradient of the summed logits is each example's own.
            (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = 0.5 * cfg.r1_gamma * grad.square().reshape(n, -1).sum(1).mean()
            out["r1"], out["loss"] = r1, d_loss + r1
        return out

    @torch.no_grad()
    def update_ema(self):
        """generator_ema <- decay * generator_ema + (1 - decay) * generator; buffers copied."""
        if self.generator_ema is None:
            raise RuntimeError("update_ema needs ema_decay > 0 (this GAN has no EMA generator)")
        decay = self.config.ema_decay
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - decay)
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)

    @torch.no_grad()
    def sample(self, n: int, *, generator=None, z=None, ema: bool = True):
        """(n, *data_shape) samples of the EMA generator (ema=True and one exists) or the generator.
        z: optional (n, latent_dim) noise; otherwise drawn from `generator` (a torch.Generator)."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"n must be an int >= 0, got {n!r}")
        if z is None:
            device = next(self.generator.parameters()).device
            g_device = device if generator is None else generator.device
            z = torch.randn(n, self.config.latent_dim, generator=generator, device=g_device).to(device)
        else:
            z = self._check_z(z, n)
        net = self.generator_ema if ema and self.generator_ema is not None else self.generator
        return net(z)

    # --- checks ----------------------------------------------------------------------

    def _check_real(self, real):
        shape = self.config.data_shape
        if not isinstance(real, torch.Tensor) or not real.is_floating_point():
            raise TypeError(
                f"real must be a floating-point tensor, got "
                f"{real.dtype if isinstance(real, torch.Tensor) else type(real).__name__}"
            )
        if real.dim() != len(shape) + 1 or tuple(real.shape[1:]) != shape or real.shape[0] == 0:
            raise ValueError(
                f"real must have shape (N, {', '.join(map(str, shape))}) with N >= 1, got {tuple(real.shape)}"
            )

    def _check_z(self, z, n):
        ld = self.config.latent_dim
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(
                f"z must be a floating-point tensor, got {z.dtype if isinstance(z, torch.Tensor) else type(z).__name__}"
            )
        if z.dim() != 2 or z.shape[1] != ld or (n is not None and z.shape[0] != n) or z.shape[0] == 0:
            want = f"({n}, {ld})" if n is not None else f"(N, {ld}) with N >= 1"
            raise ValueError(f"z must have shape {want}, got {tuple(z.shape)}")
        return z.to(next(self.generator.parameters()).dtype)

    def _draw_z(self, n):
        if n is None:
            raise ValueError("give z (N, latent_dim) or real (N, *data_shape) so the batch size is known")
        p = next(self.generator.parameters())
        return torch.randn(n, self.config.latent_dim, device=p.device, dtype=p.dtype)

    def extra_repr(self) -> str:
        c = self.config
        return f"{c.arch}, loss={c.loss!r}, data_shape={c.data_shape}, latent_dim={c.latent_dim}"


def _dcgan_init(m):
    # DCGAN's initialization: N(0, 0.02) weights, zero biases; norms start as the identity.
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        nn.init.zeros_(m.bias)
