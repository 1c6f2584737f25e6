"""The device a run trains on and, under `torchrun`, its process group.

Each process takes its shard of the same global batch and DistributedDataParallel
averages the gradients, so N processes follow the single-process run on that batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this trainer created the process group (and destroys it)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, batch_size: int) -> slice:
        """This process's rows of a global batch of `batch_size`."""
        size = batch_size // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def mean(self, values: dict, device: torch.device) -> dict:
        """{key: the mean over processes of value} (every process passes the same keys)."""
        keys = sorted(values)
        packed = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in keys]).to(device)
        torch.distributed.all_reduce(packed)
        return dict(zip(keys, (packed / self.world).tolist()))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_dist(device: torch.device) -> Dist:
    """Joins (or creates) the process group that `torchrun` describes; a plain Dist without it."""
    world = world_size()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), owned)


def resolve_device(device, world: int = 1) -> torch.device:
    """`device` (default: cuda if available, else cpu); under torchrun, "cuda" is this process's GPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        if world > 1 and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap_ddp(model: torch.nn.Module, dist: Dist, device: torch.device, find_unused: bool) -> torch.nn.Module:
    """The module the steps call: the model itself, or DistributedDataParallel over it."""
    if dist.world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=find_unused
    )
