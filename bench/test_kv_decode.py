"""pytest-benchmark suite for genkern.attention_with_kvcache: one decoding step, size x impl.

Cases come from genkern.bench.kv_decode (the same ones `genkern bench --op kv_decode` runs):
CPU float32 cases on CPU, CUDA float16 cases on CUDA, the tiny quick one on both. Impls:
plain PyTorch, the fast impl and sdpa over the filled cache. Forward only (no backward).
Run: .venv/bin/python -m pytest bench/test_kv_decode.py --benchmark-only
"""

import pytest

from genkern.bench import FAST, SDPA
from genkern.bench.kv_decode import CASES


@pytest.mark.parametrize("impl", ["torch", FAST, SDPA])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kv_decode(bench_case, case, impl):
    bench_case(case, impl, "fwd")
