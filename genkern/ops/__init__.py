"""Public ops: one file per hot path (function, autograd, fake kernel, registration)."""

from genkern.ops.attention import flash_attention
from genkern.ops.attention_varlen import flash_attention_varlen
from genkern.ops.gan_loss import discriminator_loss, generator_loss
from genkern.ops.kv_decode import attention_with_kvcache
from genkern.ops.reparam_kl import reparameterize_kl

__all__ = [
    "attention_with_kvcache",
    "flash_attention",
    "flash_attention_varlen",
    "discriminator_loss",
    "generator_loss",
    "reparameterize_kl",
]
