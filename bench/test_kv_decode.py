"""pytest-benchmark suite for genkern.attention_with_kvcache: one decoding step, size x impl.

Cases come from genkern.bench.kv_decode (the same ones `genkern bench --op kv_decode` runs):
CPU float32 cases on CPU, CUDA float16 cases on CUDA, the tiny quick one on both. Impls:
the plain-PyTorch baseline (genkern.bench.baselines), the fast impl, sdpa over the filled
cache and torch.compile of the baseline. Forward only (the op has no backward).
Run: .venv/bin/python -m pytest bench/test_kv_decode.py --benchmark-only
"""

import pytest

from genkern.bench import COMPILE, FAST, SDPA, case_directions, param_id
from genkern.bench.kv_decode import CASES


@pytest.mark.parametrize("impl", ["torch", FAST, SDPA, COMPILE])
@pytest.mark.parametrize(("case", "direction"), case_directions(CASES), ids=param_id)
def test_kv_decode(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
