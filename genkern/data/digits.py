"""The 8x8 handwritten digits (1,797 images, 17 grey levels) with a fixed train/test split.

The images come from the copy bundled with scikit-learn (read from its package
files; nothing is downloaded). Each pixel is an integer level in 0..16; genkern
stores it as level / 16, which float32 represents exactly, so
`level = round(x * 16)` recovers it.

The split is a stratified 20% test set chosen by a hand-rolled hash of the image
index, not by torch's or numpy's random generators, so it is the same on every
machine and every library version.
"""

from __future__ import annotations

import functools
import math

import torch

from genkern.data.base import Dataset

LEVELS = 17
SHAPE = (1, 8, 8)
PIXELS = 64  # 8 x 8
BOS = LEVELS  # the start token of a pixel sequence: tokens 0..16 are the levels
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")

_MASK64 = (1 << 64) - 1


def digits(split: str = "train", device=None) -> Dataset:
    """The digits as a Dataset.

    Args:
        split: "train" (1,438 images), "test" (359 images) or "all" (1,797 images, the
            original order). Train and test keep the original order within themselves.
        device: where to put x and y (default: CPU).

    Returns:
        Dataset with x float32 (N, 1, 8, 8) in [0, 1] (level / 16), y int64 (N,) digit
        labels 0..9, shape (1, 8, 8), levels 17, name "digits/<split>". The tensors are
        fresh copies: changing them does not change later calls.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    x, y, train_idx, test_idx = _load()
    if split == "all":
        x, y = x.clone(), y.clone()
    else:
        idx = train_idx if split == "train" else test_idx
        x, y = x.index_select(0, idx), y.index_select(0, idx)  # index_select copies
    data = Dataset(x=x, y=y, shape=SHAPE, levels=LEVELS, name=f"digits/{split}")
    return data if device is None else data.to(device)


@functools.lru_cache(maxsize=1)
def _load():
    """(x (1797, 1, 8, 8) float32, y (1797,) int64, train indices, test indices), read once.

    Callers must not hand these tensors out: digits() copies them.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            "genkern.data.digits needs scikit-learn, whose package ships the 8x8 digits file: pip install scikit-learn"
        ) from err
    pixels, labels = load_digits(return_X_y=True)  # (1797, 64) float64 levels 0..16, (1797,)
    x = torch.as_tensor(pixels, dtype=torch.float32).reshape(-1, *SHAPE) / (LEVELS - 1)  # (N, 1, 8, 8)
    y = torch.as_tensor(labels, dtype=torch.int64)
    train_idx, test_idx = split_indices(y.tolist(), TEST_FRACTION, SPLIT_SEED)
    return x, y, torch.tensor(train_idx, dtype=torch.int64), torch.tensor(test_idx, dtype=torch.int64)


def pixels_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) in [0, 1] -> (N, 65) int64: the start token, then the 64 pixel levels in raster order.

    The sequence an autoregressive model reads: its exact likelihood is in the same bits/dim
    as a VAE's bound on the same images."""
    levels = (x.reshape(x.shape[0], -1) * (LEVELS - 1)).round().long()  # (N, 64)
    bos = torch.full((x.shape[0], 1), BOS, dtype=torch.int64, device=x.device)
    return torch.cat([bos, levels], dim=1)  # (N, 65)


def tokens_to_pixels(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 65) or (N, 64) tokens -> (N, 1, 8, 8) float32 images in [0, 1]."""
    levels = tokens[:, -PIXELS:].clamp(0, LEVELS - 1).float()
    return (levels / (LEVELS - 1)).reshape(-1, *SHAPE)  # (N, 1, 8, 8)


def split_indices(labels, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A stratified split of range(len(labels)) into sorted (train, test) index lists.

    The test set holds floor(test_fraction * N) examples in all; each class gets its
    proportional share, rounded by largest remainder (ties to the smaller class label).
    Within a class the test examples are those with the smallest hash of (seed, index).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    classes = sorted(by_class)
    quotas = {c: test_fraction * len(by_class[c]) for c in classes}
    n_test = {c: math.floor(quotas[c]) for c in classes}
    missing = math.floor(test_fraction * len(labels)) - sum(n_test.values())
    for c in sorted(classes, key=lambda c: (-(quotas[c] - n_test[c]), c))[:missing]:
        n_test[c] += 1
    test = []
    for c in classes:
        ranked = sorted(by_class[c], key=lambda i: _hash64(seed, i))
        test.extend(ranked[: n_test[c]])
    test_set = set(test)
    return [i for i in range(len(labels)) if i not in test_set], sorted(test)


def _hash64(seed: int, i: int) -> int:
    """splitmix64's output mix of (seed, i): a fixed pseudo-random 64-bit key per index."""
    z = (seed * 0x9E3779B97F4A7C15 + (i + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
