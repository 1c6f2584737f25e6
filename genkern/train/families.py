"""The model families the trainer knows, by name (`genkern train <family>`)."""

from __future__ import annotations

from genkern.train.family import Family
from genkern.train.gan import GANFamily
from genkern.train.rnn import RNNFamily
from genkern.train.transformer import TransformerFamily
from genkern.train.vae import VAEFamily

__all__ = ["FAMILY_NAMES", "Family", "get_family"]

FAMILY_NAMES = ("vae", "gan", "transformer", "rnn")
_FAMILIES = {f.name: f for f in (VAEFamily(), GANFamily(), TransformerFamily(), RNNFamily())}


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILY_NAMES)}, got {name!r}")
    return _FAMILIES[name]
