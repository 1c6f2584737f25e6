"""What the trainer needs to know about each model family.

A family builds its model from a config dict, names its optimizers, draws the
noise of one training step, runs that step, evaluates and draws samples. The
trainer owns everything else (data order, checkpoints, logging, distribution).

Every random number a step uses comes from the step's generator and is drawn
for the whole global batch, then sliced to this process's shard: a sharded
run and a single-process run on the same global batch see the same noise.
"""
from __future__ import annotations

import functools
import math

import torch

from genkern.data.base import Dataset


class Family:
    """Base: subclasses set `name`, the model classes and the hyperparameter defaults."""

    name = ""
    lr = 1e-3
    betas = (0.9, 0.999)
    batch_size = 128

    def model_config(self, overrides: dict, data: Dataset) -> dict:
        """The full model config (a JSON-safe dict) for `data`, with `overrides` applied."""
        raise NotImplementedError

    def build(self, config: dict) -> torch.nn.Module:
        raise NotImplementedError

    def check_data(self, model, data: Dataset, what: str) -> None:
        shape = tuple(model.config.data_shape)
        if data.x.dim() != len(shape) + 1 or tuple(data.x.shape[1:]) != shape:
            raise ValueError(f"{what} must hold samples of shape {shape} (the model's data_shape), "
                             f"got a tensor of shape {tuple(data.x.shape)}")
        if not data.x.is_floating_point():
            raise ValueError(f"{what} must be a floating tensor, got {data.x.dtype}")
        if not torch.isfinite(data.x).all():
            raise ValueError(f"{what} holds NaN or infinite values")

    def optimizers(self, model, lr: float, betas) -> dict:
        return {"model": adam(model.parameters(), lr, betas)}

    def num_examples(self, data) -> int:
        return len(data.x)

    def batch(self, model, data, step: int, seed: int, batch_size: int) -> dict:
        """The global batch of `step` (CPU tensors whose first dim is the batch)."""
        from genkern.train.trainer import batch_indices
        return {"x": data.x[batch_indices(len(data.x), batch_size, seed, step)]}

    def noise(self, model, gen: torch.Generator, n: int) -> dict:
        return {}

    def step(self, net, model, opts: dict, batch: dict, noise: dict) -> dict:
        raise NotImplementedError

    def evaluate(self, model, test: Dataset | None, *, final: bool, seed: int) -> dict:
        return {}

    def samples(self, model, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def plot(self, samples: torch.Tensor, data: Dataset, path, title: str) -> None:
        from genkern.train import plots
        if samples.dim() == 4:
            plots.image_grid(samples, path, title=title)
        elif samples.dim() == 2 and samples.shape[1] == 2:
            plots.scatter(samples, None if data is None else data.x, path, title=title)


def adam(params, lr: float, betas) -> torch.optim.Adam:
    """Adam with the fused update (one kernel for all parameters: small models spend much of a
    step in the optimizer otherwise); the same for every impl, so comparisons stay fair."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True)


def _eval_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(10_007 * seed + 1)


def _is_digits(data: Dataset | None) -> bool:
    return data is not None and data.name.startswith("digits")


class VAEFamily(Family):
    name = "vae"
    lr = 1e-3

    def model_config(self, overrides, data):
        from genkern.models.vae import VAEConfig
        base = {"data_shape": list(data.shape)}
        if data.levels is not None:
            base.update(likelihood="categorical", levels=data.levels)
        else:
            base.update(likelihood="gaussian")
        base.update(overrides)
        return VAEConfig.from_dict(base).to_dict()

    def build(self, config):
        from genkern.models.vae import VAE, VAEConfig
        return VAE(VAEConfig.from_dict(config))

    def check_data(self, model, data, what):
        super().check_data(model, data, what)
        cfg = model.config
        x = data.x
        if cfg.likelihood in ("categorical", "bernoulli") and (x.min() < 0 or x.max() > 1):
            raise ValueError(f"{what} must lie in [0, 1] for the {cfg.likelihood} decoder, "
                             f"got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
        if cfg.likelihood == "categorical":
            levels = x * (cfg.levels - 1)
            if (levels - levels.round()).abs().max() > 1e-4:
                raise ValueError(f"{what} must hold the {cfg.levels} levels k / {cfg.levels - 1} for the "
                                 f"categorical decoder (levels={cfg.levels})")

    def noise(self, model, gen, n):
        return {"eps": torch.randn(n, model.config.latent_dim, generator=gen)}

    def step(self, net, model, opts, batch, noise):
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        out = net(batch["x"], eps=noise["eps"])
        out.loss.backward()
        opt.step()
        return {"loss": out.loss.detach(), "recon": out.recon.detach(), "kl": out.kl.detach()}

    @torch.no_grad()
    def evaluate(self, model, test, *, final, seed):
        if test is None:
            return {}
        x = test.x.to(next(model.parameters()).device)
        k = 100 if final else 10
        gen = _eval_generator(seed)
        elbo = model.log_likelihood(x, num_samples=1, generator=gen)
        iw = model.log_likelihood(x, num_samples=k, generator=gen)
        out = {"test_elbo_nats": -elbo.mean().item(), f"test_iw{k}_nats": -iw.mean().item()}
        if model.config.likelihood == "categorical":
            dims = math.prod(model.config.data_shape) * math.log(2.0)
            out["test_elbo_bpd"] = out["test_elbo_nats"] / dims
            out[f"test_iw{k}_bpd"] = out[f"test_iw{k}_nats"] / dims
        if final and _is_digits(test):
            out.update(_digit_quality(self.samples(model, 1000, gen), test))
        return out

    @torch.no_grad()
    def samples(self, model, n, gen):
        return model.sample(n, generator=gen).float().cpu()


class GANFamily(Family):
    name = "gan"
    lr = 1e-3
    betas = (0.5, 0.999)
    batch_size = 256

    def model_config(self, overrides, data):
        from genkern.models.gan import GANConfig
        base = {"data_shape": list(data.shape)}
        if data.levels is None and data.x.dim() == 2:  # points in the plane: unbounded outputs
            base.update(arch="mlp", output="linear")
        base.update(overrides)
        return GANConfig.from_dict(base).to_dict()

    def build(self, config):
        from genkern.models.gan import GAN, GANConfig
        return GAN(GANConfig.from_dict(config))

    def check_data(self, model, data, what):
        super().check_data(model, data, what)
        lo, hi = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(model.config.output, (None, None))
        if lo is not None and (data.x.min() < lo or data.x.max() > hi):
            raise ValueError(f"{what} must lie in [{lo:g}, {hi:g}] for the generator's {model.config.output} "
                             f"output, got values in [{data.x.min().item():.4g}, {data.x.max().item():.4g}]")

    def optimizers(self, model, lr, betas):
        return {"generator": adam(model.generator.parameters(), lr, betas),
                "discriminator": adam(model.discriminator.parameters(), lr, betas)}

    def noise(self, model, gen, n):
        dim = model.config.latent_dim
        return {"z_d": torch.randn(n, dim, generator=gen), "z_g": torch.randn(n, dim, generator=gen)}

    def step(self, net, model, opts, batch, noise):
        opt_d, opt_g = opts["discriminator"], opts["generator"]
        opt_d.zero_grad(set_to_none=True)
        d = net("d", real=batch["x"], z=noise["z_d"])
        d["loss"].backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        g = net("g", real=batch["x"], z=noise["z_g"])
        g["loss"].backward()
        opt_g.step()
        if model.generator_ema is not None:
            model.update_ema()
        out = {"d_loss": d["d_loss"].detach(), "g_loss": g["g_loss"].detach()}
        if "r1" in d:
            out["r1"] = d["r1"].detach()
        return out

    @torch.no_grad()
    def evaluate(self, model, test, *, final, seed):
        if test is None:
            return {}
        samples = self.samples(model, 1000, _eval_generator(seed))
        if _is_digits(test):
            return _digit_quality(samples, test)
        if test.name.startswith("ring"):
            from genkern.data.toy import count_modes
            n_modes = int(test.y.max().item()) + 1
            res = count_modes(samples, n_modes=n_modes)
            return {"modes_covered": int(res.covered), "high_quality": float(res.high_quality)}
        return {}

    @torch.no_grad()
    def samples(self, model, n, gen):
        z = torch.randn(n, model.config.latent_dim, generator=gen)
        return model.sample(n, z=z.to(next(model.parameters()).device)).float().cpu()


def _digit_quality(samples: torch.Tensor, test: Dataset) -> dict:
    from genkern.eval.quality import digit_quality
    q = digit_quality(samples, reference=test.x)
    return {"classes_covered": int(q["covered"]), "confidence": float(q["mean_confidence"]),
            "frechet": float(q["frechet"])}


@functools.lru_cache(maxsize=None)
def _families() -> dict:
    from genkern.train.lm import RNNFamily, TransformerFamily  # lm.py imports this module
    return {f.name: f for f in (VAEFamily(), GANFamily(), TransformerFamily(), RNNFamily())}


FAMILY_NAMES = ("vae", "gan", "transformer", "rnn")


def get_family(name: str) -> Family:
    families = _families()
    if name not in families:
        raise ValueError(f"family must be one of {', '.join(FAMILY_NAMES)}, got {name!r}")
    return families[name]
