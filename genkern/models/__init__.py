"""Generative models over genkern's ops."""

from genkern.models.arima import AR, ARIMA
from genkern.models.gan import GAN, GANConfig
from genkern.models.rnn import RNNLM, RNNConfig
from genkern.models.transformer import ModelArgs, TransformerLM
from genkern.models.vae import ELBO, VAE, VAEConfig

__all__ = [
    "AR",
    "ARIMA",
    "ELBO",
    "GAN",
    "GANConfig",
    "ModelArgs",
    "RNNConfig",
    "RNNLM",
    "TransformerLM",
    "VAE",
    "VAEConfig",
]
