"""The data a run trains on and the order it sees it in.

Every random number of step s derives from (seed, stream, s) alone, so a run resumed
at step s draws what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib

import torch

from genkern.data.base import Dataset
from genkern.data.digits import digits
from genkern.data.text import text
from genkern.data.toy import ring_of_gaussians


def step_generator(seed: int, step: int, stream: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, stream, step)."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The global batch of step `step`: epochs are seeded permutations, the last partial batch dropped."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, "epoch"))
    return perm[pos * batch_size : (pos + 1) * batch_size]


def load_data(data) -> tuple:
    """(train, test or None, description) from a dataset name, a Dataset or a tensor of samples."""
    if isinstance(data, str):
        if data == "digits":
            return digits("train"), digits("test"), {"name": "digits"}
        if data == "ring":
            return (ring_of_gaussians(n=20_000, seed=0), ring_of_gaussians(n=2_000, seed=1), {"name": "ring"})
        if data == "text":
            return text("train"), text("valid"), {"name": "text"}
        raise ValueError(f"data must be 'digits', 'ring', 'text', a genkern Dataset or a tensor, got {data!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() < 2 or data.shape[0] < 1:
            raise ValueError(f"data must be a tensor of samples (N, ...) with N >= 1, got shape {tuple(data.shape)}")
        data = Dataset(x=data, y=None, shape=tuple(data.shape[1:]), levels=None, name="tensor")
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be 'digits', 'ring', a genkern Dataset or a tensor, got {type(data).__name__}")
    x = data.x.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.blake2b(x.numpy().tobytes(), digest_size=16).hexdigest()
    return data, None, {"name": data.name, "shape": list(x.shape), "fingerprint": digest}
