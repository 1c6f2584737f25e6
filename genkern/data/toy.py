"""The ring of Gaussians: a 2-D mixture whose modes a generator can visibly drop.

`ring_of_gaussians` draws the data; `count_modes` scores samples from a model:
how many modes it reaches and what fraction of its samples land on a mode.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from genkern.data.base import Dataset


def mode_centres(n_modes: int = 8, radius: float = 2.0) -> torch.Tensor:
    """The mode centres, float64 (n_modes, 2): radius * (cos, sin) of 2 pi k / n_modes, k = 0.."""
    _check_ring(n_modes, radius)
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)  # (n_modes,)
    return radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # (n_modes, 2)


def ring_of_gaussians(
    n_modes: int = 8, n: int = 10_000, radius: float = 2.0, std: float = 0.02, seed: int = 0, device=None
) -> Dataset:
    """n points from an equal-weight mixture of isotropic Gaussians on a circle.

    Args:
        n_modes: number of modes, evenly spaced on the circle (>= 1).
        n: number of points (>= 1).
        radius: circle radius (> 0).
        std: per-coordinate standard deviation of each mode (> 0).
        seed: seeds a private torch.Generator; torch's global RNG is not touched.
        device: where to put x and y (default: CPU).

    Returns:
        Dataset with x float32 (n, 2), y int64 (n,) the mode of each point, shape (2,),
        levels None, name "ring<n_modes>".
    """
    _check_ring(n_modes, radius)
    _check_positive_int("n", n)
    _check_positive("std", std)
    gen = torch.Generator().manual_seed(int(seed))
    y = torch.randint(0, n_modes, (n,), generator=gen)  # (n,)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)  # (n, 2)
    x = (mode_centres(n_modes, radius)[y] + std * noise).to(torch.float32)  # (n, 2)
    data = Dataset(x=x, y=y, shape=(2,), levels=None, name=f"ring{n_modes}")
    return data if device is None else data.to(device)


class ModeCount(NamedTuple):
    """count_modes' result.

    covered: number of modes that got at least the minimum count of high-quality samples.
    counts: high-quality samples per mode, a list of n_modes ints.
    high_quality: fraction of all samples within threshold_std * std of some centre.
    """

    covered: int
    counts: list
    high_quality: float


def count_modes(
    samples,
    n_modes: int = 8,
    radius: float = 2.0,
    std: float = 0.02,
    threshold_std: float = 3.0,
    min_fraction: float = 0.01,
) -> ModeCount:
    """Scores 2-D samples against the ring: which modes they reach and how many are on a mode.

    A sample is high-quality when it lies within threshold_std * std of its nearest
    centre, and then counts for that mode. A mode is covered when its count is at least
    min_fraction of all samples, and at least 1 (the default, 1%, ignores a mode hit by
    a stray sample or two; with 8 modes a perfect model puts 12.5% on each).
    For data drawn from the ring itself, about 1 - exp(-threshold_std^2 / 2) of the
    samples are high-quality (98.9% at 3 std, the 2-D Gaussian's radial tail).

    Args:
        samples: (N, 2) tensor or array of finite values, N >= 1.
        n_modes, radius, std: the ring the samples are meant to match.
        threshold_std: the high-quality radius in units of std (> 0).
        min_fraction: the share of samples a mode needs to count as covered, in [0, 1].
    """
    _check_ring(n_modes, radius)
    _check_positive("std", std)
    _check_positive("threshold_std", threshold_std)
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction}")
    x = torch.as_tensor(samples).detach().to("cpu", torch.float64)
    if x.dim() != 2 or x.shape[1] != 2 or x.shape[0] == 0:
        raise ValueError(f"samples must have shape (N, 2) with N >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("samples must be finite (found NaN or inf)")
    # Direct differences, not the |a|^2 + |b|^2 - 2ab shortcut, which loses small distances.
    dist = torch.cdist(x, mode_centres(n_modes, radius), compute_mode="donot_use_mm_for_euclid_dist")  # (N, n_modes)
    nearest_dist, nearest = dist.min(dim=1)  # (N,) each
    good = nearest_dist <= threshold_std * std
    counts = torch.bincount(nearest[good], minlength=n_modes)  # (n_modes,)
    # The small slack keeps e.g. 0.01 * 300 = 3.0000000000000004 from demanding 4 samples.
    min_count = max(1, math.ceil(min_fraction * x.shape[0] - 1e-9))
    return ModeCount(
        covered=int((counts >= min_count).sum()), counts=counts.tolist(), high_quality=float(good.double().mean())
    )


def _check_ring(n_modes, radius):
    _check_positive_int("n_modes", n_modes)
    _check_positive("radius", radius)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
