"""Public ops: one file per hot path (function, autograd, fake kernel, registration)."""
from genkern.ops.reparam_kl import reparameterize_kl

__all__ = ["reparameterize_kl"]
