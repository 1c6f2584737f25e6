"""pytest-benchmark setup: the device, the fast impl, and one helper that times a case.

GENKERN_BENCH_DEVICE (default: cuda if available, else cpu) and
GENKERN_BENCH_IMPL (default auto: cpp on CPU, triton on CUDA) choose what runs;
GENKERN_BENCH_MEM_LIMIT (GiB, like `genkern bench --mem-limit`; default half the
available memory, 0: none) skips an impl estimated to need more memory.
The cases and their setup come from genkern.bench (shared with `genkern bench`).
"""

import os

import pytest
import torch

from genkern.bench import COMPILE, FAST, MIN_ROUNDS, memory
from genkern.bench.arguments import fast_impl
from genkern.bench.timing import ImplError, prepare, time_once

SLOW_CALL_S = 0.05  # calls slower than this get MIN_ROUNDS fixed rounds instead of calibration


@pytest.fixture(scope="session")
def bench_device():
    return torch.device(os.environ.get("GENKERN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.fixture(scope="session")
def bench_impl(bench_device):
    return fast_impl(bench_device, os.environ.get("GENKERN_BENCH_IMPL", "auto"))


@pytest.fixture(scope="session")
def bench_mem_limit(bench_device):
    limit = os.environ.get("GENKERN_BENCH_MEM_LIMIT")
    return memory.memory_limit(bench_device, float(limit) if limit else None)


def _synced(call, device):
    if device.type != "cuda":
        return call

    def timed():
        call()
        torch.cuda.synchronize(device)

    return timed


@pytest.fixture
def bench_case(benchmark, bench_device, bench_impl, bench_mem_limit):
    """bench_case(case, impl, direction): impl is "torch" (the plain-PyTorch baseline of
    genkern.bench.baselines), FAST, COMPILE (of that baseline) or a case baseline (e.g. SDPA);
    direction one of `case.directions` (the suites parametrize over genkern.bench.case_directions).

    Skips (with the reason) a case not listed for this device, an impl over the
    memory limit, an impl that is unavailable, or a torch.compile that fails;
    any other failure of a genkern impl fails the test.
    """

    def run(case, impl, direction):
        name = bench_impl if impl == FAST else impl
        if impl == FAST and name == "torch":
            pytest.skip("the fast impl is torch here (GENKERN_BENCH_IMPL=torch)")
        if direction not in case.directions:  # like `genkern bench`: e.g. no backward for inference-only ops
            pytest.skip(f"{case.op} has no {direction}")
        if not case.runs_on(bench_device.type):
            pytest.skip(f"a {'/'.join(case.devices)} case")
        too_big = memory.guard(case, name, direction, bench_mem_limit)
        if too_big:
            pytest.skip(too_big)
        try:
            call = prepare(case, name, direction, bench_device)
        except ImplError as exc:
            if exc.status == "unavailable" or name == COMPILE:
                pytest.skip(f"{name} {exc.status}: {exc}")
            raise
        timed = _synced(call, bench_device)
        first = min(time_once(call, bench_device) for _ in range(2))  # warm-up, and the cost per call
        benchmark.group = f"{case.op} {case.key(direction)}"
        flops = case.flops(direction)
        benchmark.extra_info.update(
            op=case.op,
            case=case.name,
            impl=name,
            direction=direction,
            bytes=case.bytes_moved(direction),
            flops=flops,
            device=str(bench_device),
            peak_mem_bytes=memory.peak_memory(call, bench_device),
        )
        if first > SLOW_CALL_S:
            benchmark.pedantic(timed, rounds=MIN_ROUNDS, warmup_rounds=0)
        else:
            benchmark(timed)
        stats = getattr(benchmark.stats, "stats", None)  # None under --benchmark-disable
        if flops and stats is not None:
            benchmark.extra_info["tflops"] = flops / stats.median / 1e12

    return run
