"""Public ops: one file per hot path (function, autograd, fake kernel, registration)."""
from genkern.ops.attention import flash_attention
from genkern.ops.gan_loss import discriminator_loss, generator_loss
from genkern.ops.reparam_kl import reparameterize_kl

__all__ = ["flash_attention", "discriminator_loss", "generator_loss", "reparameterize_kl"]
