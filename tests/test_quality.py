"""What the trained models must show on real data (the trainer's default settings, short runs).

- VAE on digits: a test bound in bits/dim far below the uniform log2(17) = 4.09, the
  importance-weighted bound (K = 100) tighter than the ELBO, samples of all 10 classes.
- GAN on digits: samples of all 10 classes (1,000 samples, the digit classifier).
- GAN on the ring of 8 Gaussians: at least 7 modes covered.
"""

from __future__ import annotations

import math

import pytest
import torch

from genkern.train import train
from utils import one_thread  # noqa: F401  (small models: one thread is the fast setting)

UNIFORM_BPD = math.log2(17)


@pytest.fixture(scope="module")
def vae_run():
    threads = torch.get_num_threads()  # module fixtures start before the one_thread fixture
    torch.set_num_threads(1)
    try:
        return train("vae", data="digits", steps=1000, progress=False, eval_every=1000)
    finally:
        torch.set_num_threads(threads)


def test_vae_bits_per_dim(vae_run):
    final = vae_run.history[-1]
    elbo, iw = final["test_elbo_bpd"], final["test_iw100_bpd"]
    assert iw < elbo, (iw, elbo)  # the K = 100 bound is tighter than the ELBO
    assert elbo < 0.65 * UNIFORM_BPD, elbo  # measured: ELBO ~2.16, IW ~2.08 bits/dim
    assert iw > 1.0  # a bound on 17-level pixels this low would mean a bug, not a good model


def test_vae_samples_cover_all_digits(vae_run):
    final = vae_run.history[-1]
    assert final["classes_covered"] == 10, final


def test_gan_samples_cover_all_digits():
    res = train("gan", data="digits", steps=2000, progress=False, eval_every=2000)
    final = res.history[-1]
    assert final["classes_covered"] == 10, final
    assert final["frechet"] < 40, final  # train vs test digits: ~1.25; uniform noise: ~166


def test_gan_covers_the_ring():
    res = train("gan", data="ring", steps=2000, progress=False, eval_every=2000)
    final = res.history[-1]
    assert final["modes_covered"] >= 7, final
    assert final["high_quality"] > 0.5, final
