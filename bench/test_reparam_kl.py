"""pytest-benchmark suite for genkern.reparameterize_kl: sizes x impl x direction.

Cases come from genkern.bench.reparam_kl (the same ones `genkern bench` runs), each with the
directions it has. "torch" is the plain-PyTorch baseline (genkern.bench.baselines).
Run: .venv/bin/python -m pytest bench/ --benchmark-only
"""

import pytest

from genkern.bench import COMPILE, FAST, case_directions, listed_cases, param_id
from genkern.bench import reparam_kl as cases_module

CASES = listed_cases(cases_module)  # CASES and the CUDA-only GPU_CASES


@pytest.mark.parametrize("impl", ["torch", FAST, COMPILE])
@pytest.mark.parametrize(("case", "direction"), case_directions(CASES), ids=param_id)
def test_reparameterize_kl(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
