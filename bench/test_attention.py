"""pytest-benchmark suite for genkern.flash_attention: size x causal x impl x direction.

Cases come from genkern.bench.attention (the same ones `genkern bench --op attention` runs):
CPU float32 cases on CPU, CUDA bfloat16 cases on CUDA, the tiny quick ones on both; a case
listed for the other device type is skipped. Impls: plain PyTorch, the fast impl, sdpa and
torch.compile of the reference. extra_info holds flops, TFLOP/s and peak memory.
Run: .venv/bin/python -m pytest bench/test_attention.py --benchmark-only
     (-k 2048 for one size, -k sdpa for one baseline)
"""

import pytest

from genkern.bench import COMPILE, FAST, SDPA, Case
from genkern.bench.attention import CASES


@pytest.mark.parametrize("direction", Case.directions)  # an op's: fwd, bwd, fwd+bwd (no "step")
@pytest.mark.parametrize("impl", ["torch", FAST, SDPA, COMPILE])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_attention(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
