"""Samples of any genkern generative model from a CPU generator, one convention for every family.

The trainer's sample grids, `genkern sample`, the quality metrics and the speed
measurements all draw through `draw_samples`, so the same seed gives the same
samples wherever they are drawn.
"""

from __future__ import annotations

import torch

from genkern.models.gan import GAN
from genkern.models.rnn import RNNLM
from genkern.models.sequence import sample_sequences
from genkern.models.transformer import TransformerLM
from genkern.models.vae import VAE

MODELS = {"vae": (VAE,), "gan": (GAN,), "transformer": (TransformerLM,), "rnn": (RNNLM,)}


@torch.no_grad()
def draw_samples(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """n samples on the CPU: images or points as float32 (n, *data_shape); a text model's
    (n, 1 + L) int64 character ids (see genkern.models.sequence.sample_sequences).

    generator: a CPU generator; all the noise is drawn from it, then moved to the model's device.
    """
    if isinstance(model, VAE):
        return model.sample(n, generator=generator).float().cpu()
    if isinstance(model, GAN):
        z = torch.randn(n, model.config.latent_dim, generator=generator)
        return model.sample(n, z=z.to(next(model.parameters()).device)).float().cpu()
    if isinstance(model, (TransformerLM, RNNLM)):
        return sample_sequences(model, n, generator)
    raise TypeError(f"model must be a genkern VAE, GAN, TransformerLM or RNNLM, got {type(model).__name__}")


def sampler_for(family: str, model):
    """draw_samples, once `model` is checked to be a model of `family` ("vae", "gan", "transformer", "rnn")."""
    if family not in MODELS:
        raise ValueError(f"family must be one of {', '.join(MODELS)}, got {family!r}")
    if not isinstance(model, MODELS[family]):
        raise TypeError(
            f"model must be a {MODELS[family][0].__name__} for the {family} family, got {type(model).__name__}"
        )
    return draw_samples
