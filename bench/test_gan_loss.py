"""pytest-benchmark suite for the fused GAN losses: loss x kind x shape x impl x direction.

Cases come from genkern.bench.gan_loss (the same ones `genkern bench --op gan_loss` runs), each
with the directions it has. "torch" is the plain-PyTorch baseline (genkern.bench.baselines).
Run: .venv/bin/python -m pytest bench/test_gan_loss.py --benchmark-only
     (-k d-hinge for one kind, -k 256x1 for one size)
"""

import pytest

from genkern.bench import COMPILE, FAST, case_directions, listed_cases, param_id
from genkern.bench import gan_loss as cases_module

CASES = listed_cases(cases_module)  # CASES and the CUDA-only GPU_CASES


@pytest.mark.parametrize("impl", ["torch", FAST, COMPILE])
@pytest.mark.parametrize(("case", "direction"), case_directions(CASES), ids=param_id)
def test_gan_loss(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
