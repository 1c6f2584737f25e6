"""Drop-in modules over genkern's ops."""

from genkern.nn.attention import CausalAttention, CausalSelfAttention
from genkern.nn.gan import GANLoss
from genkern.nn.latent import GaussianLatent

__all__ = ["CausalAttention", "CausalSelfAttention", "GANLoss", "GaussianLatent"]
