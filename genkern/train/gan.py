"""The GAN family: a discriminator and a generator update per step (and the EMA), sample
quality as evaluation: digit metrics, or the modes covered on the ring."""

from __future__ import annotations

import torch

from genkern.data.toy import count_modes
from genkern.models.gan import GAN, GANConfig
from genkern.train.family import Family, adam, digit_scores, eval_generator, is_digits


class GANFamily(Family):
    name = "gan"
    lr = 1e-3
    betas = (0.5, 0.999)
    batch_size = 256

    def model_config(self, overrides, data):
        base = {"data_shape": list(data.shape)}
        if data.levels is None and data.x.dim() == 2:  # points in the plane: unbounded outputs
            base.update(arch="mlp", output="linear")
        base.update(overrides)
        return GANConfig.from_dict(base).to_dict()

    def build(self, config):
        return GAN(GANConfig.from_dict(config))

    def check_data(self, model, data, what):
        super().check_data(model, data, what)
        lo, hi = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(model.config.output, (None, None))
        if lo is not None and (data.x.min() < lo or data.x.max() > hi):
            raise ValueError(
                f"{what} must lie in [{lo:g}, {hi:g}] for the generator's {model.config.output} "
                f"output, got values in [{data.x.min().item():.4g}, {data.x.max().item():.4g}]"
            )

    def optimizers(self, model, lr, betas):
        return {
            "generator": adam(model.generator.parameters(), lr, betas),
            "discriminator": adam(model.discriminator.parameters(), lr, betas),
        }

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
        samples = self.samples(model, 1000, eval_generator(seed))
        if is_digits(test):
            return digit_scores(samples, test)
        if test.name.startswith("ring"):
            n_modes = int(test.y.max().item()) + 1
            res = count_modes(samples, n_modes=n_modes)
            return {"modes_covered": int(res.covered), "high_quality": float(res.high_quality)}
        return {}
