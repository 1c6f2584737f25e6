"""pytest-benchmark suite for genkern.reparameterize_kl: sizes x impl x direction.

Cases come from genkern.bench.reparam_kl (the same ones `genkern bench` runs).
Run: .venv/bin/python -m pytest bench/ --benchmark-only
"""

import pytest

from genkern.bench import COMPILE, FAST, Case
from genkern.bench.reparam_kl import CASES


@pytest.mark.parametrize("direction", Case.directions)  # an op's: fwd, bwd, fwd+bwd (no "step")
@pytest.mark.parametrize("impl", ["torch", FAST, COMPILE])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reparameterize_kl(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
