"""Drop-in modules over genkern's ops."""
from genkern.nn.latent import GaussianLatent

__all__ = ["GaussianLatent"]
