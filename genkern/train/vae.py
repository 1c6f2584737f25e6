"""The VAE family: one optimizer, the reparameterisation noise drawn per step, the ELBO and the
importance-weighted bound as evaluation."""

from __future__ import annotations

import math

import torch

from genkern.models.vae import VAE, VAEConfig
from genkern.train.family import Family, digit_scores, eval_generator, is_digits


class VAEFamily(Family):
    name = "vae"
    lr = 1e-3

    def model_config(self, overrides, data):
        base = {"data_shape": list(data.shape)}
        if data.levels is not None:
            base.update(likelihood="categorical", levels=data.levels)
        else:
            base.update(likelihood="gaussian")
        base.update(overrides)
        return VAEConfig.from_dict(base).to_dict()

    def build(self, config):
        return VAE(VAEConfig.from_dict(config))

    def check_data(self, model, data, what):
        super().check_data(model, data, what)
        cfg = model.config
        x = data.x
        if cfg.likelihood in ("categorical", "bernoulli") and (x.min() < 0 or x.max() > 1):
            raise ValueError(
                f"{what} must lie in [0, 1] for the {cfg.likelihood} decoder, "
                f"got values in [{x.min().item():.4g}, {x.max().item():.4g}]"
            )
        if cfg.likelihood == "categorical":
            levels = x * (cfg.levels - 1)
            if (levels - levels.round()).abs().max() > 1e-4:
                raise ValueError(
                    f"{what} must hold the {cfg.levels} levels k / {cfg.levels - 1} for the "
                    f"categorical decoder (levels={cfg.levels})"
                )

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
        gen = eval_generator(seed)
        elbo = model.log_likelihood(x, num_samples=1, generator=gen)
        iw = model.log_likelihood(x, num_samples=k, generator=gen)
        out = {"test_elbo_nats": -elbo.mean().item(), f"test_iw{k}_nats": -iw.mean().item()}
        if model.config.likelihood == "categorical":
            dims = math.prod(model.config.data_shape) * math.log(2.0)
            out["test_elbo_bpd"] = out["test_elbo_nats"] / dims
            out[f"test_iw{k}_bpd"] = out[f"test_iw{k}_nats"] / dims
        if final and is_digits(test):
            out.update(digit_scores(self.samples(model, 1000, gen), test))
        return out
