"""pytest-benchmark suite for whole training steps of the model families: model x impl.

Cases come from genkern.bench.training (the same ones `genkern bench --op train_step` runs);
their one direction is "step".
Run: .venv/bin/python -m pytest bench/ --benchmark-only
"""

import pytest

from genkern.bench import FAST, case_directions, param_id
from genkern.bench.training import CASES


@pytest.mark.parametrize("impl", ["torch", FAST])
@pytest.mark.parametrize(("case", "direction"), case_directions(CASES), ids=param_id)
def test_train_step(bench_case, case, impl, direction):
    bench_case(case, impl, direction)
