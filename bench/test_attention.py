"""pytest-benchmark suite for genkern.flash_attention: size x causal x impl x direction.

Cases come from genkern.bench.attention (the same ones `genkern bench --op attention` runs):
CPU float32 cases on CPU, CUDA bfloat16 cases on CUDA, the tiny quick ones on both; a case
listed for the other device type is skipped. Impls: the plain-PyTorch baseline
(genkern.bench.baselines), the fast impl, sdpa and torch.compile of the baseline; each case
with the directions it has. extra_info holds flops, TFLOP/s and peak memory.
Run: .venv/bin/python -m pytest bench/test_attention.py --benchmark-only
     (-k 2048 for one size, -k sdpa for one baseline)
"""

import pytest

from genkern.bench import COMPILE, FAST, SDPA, case_directions, param_id
from genkern.bench.attention import CASES


@pytest.mark.parametrize("impl", ["torch", FAST, SDPA, COMPILE])
@pytest.mark.parametrize(("case", "direction"), case_directions(CASES), ids=param_id)
def test_attention(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
