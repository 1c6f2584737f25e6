"""pytest-benchmark suite for whole training steps of the model families: model x impl.

Cases come from genkern.bench.training (the same ones `genkern bench --op train_step` runs).
Run: .venv/bin/python -m pytest bench/ --benchmark-only
"""

import pytest

from genkern.bench import FAST
from genkern.bench.training import CASES


@pytest.mark.parametrize("impl", ["torch", FAST])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_train_step(bench_case, case, impl):
    bench_case(case, impl, "step")
