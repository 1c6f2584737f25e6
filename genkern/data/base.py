"""Dataset: a labelled tensor dataset small enough to live in memory."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole dataset held as tensors.

    Attributes:
        x: floating tensor (N, *shape), the examples.
        y: int64 tensor (N,), a label per example (digit class, ring mode), or None.
        shape: the shape of one example, e.g. (1, 8, 8) or (2,).
        levels: number of discrete values a coordinate takes (x * (levels - 1) is an
            integer), or None for continuous data.
        name: a short name, e.g. "digits/train".
    """

    x: torch.Tensor
    y: torch.Tensor | None
    shape: tuple
    levels: int | None
    name: str

    def __post_init__(self):
        if not isinstance(self.x, torch.Tensor) or not self.x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(self.x, 'dtype', type(self.x).__name__)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if tuple(self.x.shape[1:]) != self.shape:
            raise ValueError(
                f"x must have shape (N, *shape) = (N, {', '.join(map(str, self.shape))}), got {tuple(self.x.shape)}"
            )
        if self.y is not None:
            if not isinstance(self.y, torch.Tensor) or self.y.dtype != torch.int64:
                raise TypeError(
                    f"y must be an int64 torch.Tensor or None, got {getattr(self.y, 'dtype', type(self.y).__name__)}"
                )
            if self.y.shape != (self.x.shape[0],):
                raise ValueError(f"y must have shape (N,) = ({self.x.shape[0]},), got {tuple(self.y.shape)}")
            if self.y.device != self.x.device:
                raise ValueError(f"x and y must be on one device, got {self.x.device} and {self.y.device}")
        if self.levels is not None and (
            isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2
        ):
            raise ValueError(f"levels must be an int >= 2 or None, got {self.levels!r}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device) -> Dataset:
        """The same dataset with x and y on `device` (tensors already there are shared, not copied)."""
        device = torch.device(device)
        y = None if self.y is None else self.y.to(device)
        return dataclasses.replace(self, x=self.x.to(device), y=y)
