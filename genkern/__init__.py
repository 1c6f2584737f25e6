"""genkern: fast kernels for training and sampling generative models.

Every op takes impl="auto" | "torch" | "cpp" | "triton"; see genkern.info().
"""

from genkern import data, eval, functional, models, nn, train
from genkern._dispatch import ImplUnavailableError
from genkern._info import info
from genkern.generation import generate
from genkern.kvcache import KVCache
from genkern.ops import (
    attention_with_kvcache,
    discriminator_loss,
    flash_attention,
    flash_attention_varlen,
    generator_loss,
    reparameterize_kl,
)
from genkern.patching import patch, patched, unpatch
from genkern.profiling import profile_generation

__version__ = "0.1.0"
__all__ = [
    "ImplUnavailableError",
    "KVCache",
    "attention_with_kvcache",
    "data",
    "discriminator_loss",
    "eval",
    "flash_attention",
    "flash_attention_varlen",
    "functional",
    "generate",
    "generator_loss",
    "info",
    "models",
    "nn",
    "patch",
    "patched",
    "profile_generation",
    "reparameterize_kl",
    "train",
    "unpatch",
    "__version__",
]
