"""The embedded datasets: the digits and their fixed split, the ring of Gaussians and count_modes."""

import importlib
import math
import sys

import numpy as np
import pytest
import torch

from genkern.data.base import Dataset
from genkern.data.digits import digits, split_indices
from genkern.data.toy import count_modes, mode_centres, ring_of_gaussians

digits_module = importlib.import_module("genkern.data.digits")  # the module: genkern.data.digits is the function

# --- Dataset ------------------------------------------------------------------------------


def test_dataset_holds_and_moves():
    d = Dataset(x=torch.zeros(5, 2), y=torch.arange(5), shape=[2], levels=None, name="t")
    assert len(d) == 5 and d.shape == (2,) and d.device == torch.device("cpu")
    m = d.to("meta")
    assert m.x.device.type == "meta" and m.y.device.type == "meta" and m.name == "t"
    assert d.x.device.type == "cpu"  # the original is unchanged


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(5, 3)), "shape"),
        (dict(x=torch.zeros(5, 2, dtype=torch.int64)), "floating"),
        (dict(y=torch.arange(4)), r"\(N,\)"),
        (dict(y=torch.arange(5, dtype=torch.int32)), "int64"),
        (dict(levels=1), "levels"),
        (dict(levels=2.5), "levels"),
    ],
)
def test_dataset_rejects_bad_fields(kwargs, match):
    fields = dict(x=torch.zeros(5, 2), y=torch.arange(5), shape=(2,), levels=None, name="t")
    fields.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        Dataset(**fields)


# --- digits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    return {s: digits(s) for s in ("train", "test", "all")}


def test_digits_shapes_and_values(splits):
    for split, n in (("train", 1438), ("test", 359), ("all", 1797)):
        d = splits[split]
        assert len(d) == n and d.x.shape == (n, 1, 8, 8) and d.y.shape == (n,)
        assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
        assert d.shape == (1, 8, 8) and d.levels == 17 and d.name == f"digits/{split}"
        assert d.x.min() == 0 and d.x.max() == 1
        levels = d.x * 16
        assert torch.equal(levels, levels.round()), "every pixel is exactly level / 16"
        assert set(d.y.tolist()) == set(range(10))
    assert set((splits["all"].x * 16).round().unique().tolist()) == set(range(17))


def test_digits_split_is_a_disjoint_cover(splits):
    train_idx, test_idx = split_indices(splits["all"].y.tolist(), 0.2, digits_module.SPLIT_SEED)
    assert len(set(train_idx) & set(test_idx)) == 0
    assert sorted(train_idx + test_idx) == list(range(1797))
    all_ = splits["all"]
    assert torch.equal(all_.x[test_idx], splits["test"].x) and torch.equal(all_.y[test_idx], splits["test"].y)
    assert torch.equal(all_.x[train_idx], splits["train"].x) and torch.equal(all_.y[train_idx], splits["train"].y)


def test_digits_split_is_stratified(splits):
    totals = torch.bincount(splits["all"].y, minlength=10)
    tests = torch.bincount(splits["test"].y, minlength=10)
    assert tests.sum() == 359
    for total, n_test in zip(totals.tolist(), tests.tolist()):
        assert math.floor(0.2 * total) <= n_test <= math.ceil(0.2 * total)


def test_digits_split_is_pinned(splits):
    # The split must not depend on the machine or library versions: these values are fixed.
    _, test_idx = split_indices(splits["all"].y.tolist(), 0.2, 0)
    assert test_idx[:8] == [15, 21, 25, 37, 38, 43, 47, 48]
    assert sum(test_idx) == 334519
    assert torch.equal(digits("test").x, splits["test"].x)


def test_digits_returns_fresh_copies(splits):
    for split in ("train", "all"):
        d = digits(split)
        d.x.fill_(0.5)
        d.y.fill_(3)
        again = digits(split)
        assert torch.equal(again.x, splits[split].x) and torch.equal(again.y, splits[split].y)


def test_digits_device_argument():
    d = digits("test", device="meta")
    assert d.x.device.type == "meta" and d.y.device.type == "meta"


@pytest.mark.parametrize("split", ["val", "Train", None, 0])
def test_digits_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        digits(split)


def test_digits_without_scikit_learn(monkeypatch):
    digits_module._load.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    try:
        with pytest.raises(ImportError, match="scikit-learn"):
            digits("train")
    finally:
        digits_module._load.cache_clear()


def test_split_indices_small_case():
    labels = [0] * 7 + [1] * 3 + [2] * 5  # quotas 1.4, 0.6, 1.0 -> floor 1, 0, 1; 1 more to class 1 (0.6)
    train, test = split_indices(labels, 0.2, seed=5)
    assert len(test) == 3 and sorted(train + test) == list(range(15))
    assert sorted(labels[i] for i in test) == [0, 1, 2]
    assert split_indices(labels, 0.2, seed=5) == (train, test)
    assert split_indices(labels, 0.2, seed=6) != (train, test)
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(labels, 1.0, seed=0)


# --- ring of Gaussians --------------------------------------------------------------------


def test_mode_centres():
    c = mode_centres(8, 2.0)
    assert c.shape == (8, 2) and c.dtype == torch.float64
    torch.testing.assert_close(c.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(c[0], torch.tensor([2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(c[2], torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_ring_shapes_and_modes():
    d = ring_of_gaussians(n_modes=8, n=4000, radius=2.0, std=0.02, seed=1)
    assert d.x.shape == (4000, 2) and d.x.dtype == torch.float32 and d.y.dtype == torch.int64
    assert d.shape == (2,) and d.levels is None and len(d) == 4000
    counts = torch.bincount(d.y, minlength=8)
    assert counts.min() > 400  # 500 expected per mode
    offsets = d.x.double() - mode_centres(8, 2.0)[d.y]  # (N, 2)
    assert offsets.norm(dim=1).max() < 6 * 0.02  # P(r > 6 std) = exp(-18) per point
    assert abs(offsets.std().item() - 0.02) < 0.002
    assert offsets.mean(dim=0).abs().max() < 0.002


def test_ring_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = ring_of_gaussians(n=100, seed=3), ring_of_gaussians(n=100, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, ring_of_gaussians(n=100, seed=4).x)
    assert torch.equal(state, torch.get_rng_state())


def test_count_modes_on_the_data_covers_every_mode():
    d = ring_of_gaussians(n=5000, seed=0)
    result = count_modes(d.x)
    assert result.covered == 8 and len(result.counts) == 8
    expected = 1 - math.exp(-9 / 2)  # 2-D Gaussian mass within 3 std: 0.9889
    assert abs(result.high_quality - expected) < 0.01
    assert sum(result.counts) == round(result.high_quality * 5000)
    true_counts = torch.bincount(d.y, minlength=8).tolist()
    assert all(0.97 * t <= c <= t for c, t in zip(result.counts, true_counts))


def test_count_modes_sees_dropped_modes():
    d = ring_of_gaussians(n=5000, seed=0)
    result = count_modes(d.x[d.y < 3])
    assert result.covered == 3 and result.counts[3:] == [0] * 5
    assert result.high_quality > 0.97


def test_count_modes_on_uniform_noise():
    noise = torch.rand(5000, 2, generator=torch.Generator().manual_seed(0)) * 6 - 3
    result = count_modes(noise)
    # 8 discs of radius 0.06 cover 0.25% of the 6 x 6 square.
    assert result.high_quality < 0.01 and result.covered == 0


def test_count_modes_min_fraction():
    centres = mode_centres(8, 2.0)
    samples = torch.cat([centres[[0]].repeat(297, 1), centres[[1]].repeat(3, 1)])  # (300, 2)
    assert count_modes(samples).covered == 2  # 3 / 300 is exactly the 1% default
    assert count_modes(samples, min_fraction=0.02).covered == 1
    assert count_modes(samples, min_fraction=0.0).covered == 2  # still at least one sample
    assert count_modes(samples.numpy()).counts[:2] == [297, 3]  # arrays work too
    far = samples + torch.tensor([0.0, 0.07])  # 3.5 std off every centre
    assert count_modes(far).covered == 0 and count_modes(far, threshold_std=4.0).covered == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(samples=torch.zeros(10, 3)), "samples"),
        (dict(samples=torch.zeros(10)), "samples"),
        (dict(samples=torch.zeros(0, 2)), "samples"),
        (dict(samples=torch.tensor([[0.0, float("nan")]])), "finite"),
        (dict(n_modes=0), "n_modes"),
        (dict(n_modes=2.0), "n_modes"),
        (dict(radius=-1.0), "radius"),
        (dict(std=0.0), "std"),
        (dict(threshold_std=float("inf")), "threshold_std"),
        (dict(min_fraction=1.5), "min_fraction"),
    ],
)
def test_count_modes_rejects_bad_input(kwargs, match):
    args = dict(samples=np.zeros((10, 2)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        count_modes(**args)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(n=0), "n"), (dict(n_modes=0), "n_modes"), (dict(std=-0.1), "std"), (dict(radius=float("nan")), "radius")],
)
def test_ring_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ring_of_gaussians(**kwargs)
