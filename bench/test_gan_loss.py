"""pytest-benchmark suite for the fused GAN losses: loss x kind x shape x impl x direction.

Cases come from genkern.bench.gan_loss (the same ones `genkern bench --op gan_loss` runs).
Run: .venv/bin/python -m pytest bench/test_gan_loss.py --benchmark-only
     (-k d-hinge for one kind, -k 256x1 for one size)
"""

import pytest

from genkern.bench import COMPILE, FAST, Case
from genkern.bench.gan_loss import CASES


@pytest.mark.parametrize("direction", Case.directions)  # an op's: fwd, bwd, fwd+bwd (no "step")
@pytest.mark.parametrize("impl", ["torch", FAST, COMPILE])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gan_loss(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
