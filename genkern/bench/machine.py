"""The machine a benchmark ran on: its name, the versions, and its measured limits.

The limits (copy and read bandwidth, matmul rate) are what a kernel's GB/s and
TFLOP/s are compared with in the report: measured, not taken from a data sheet,
so that a share of them means the same on every machine.
"""

from __future__ import annotations

import datetime
import os
import platform
import re

import torch

from genkern._info import package_version
from genkern.bench.timing import time_once


def device_name(device) -> str:
    """The GPU's name, or the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device) -> str:
    """File-name form: "cpu-intel-xeon-processor", "nvidia-h100-80gb-hbm3"."""
    name = re.sub(r"\((r|tm|c)\)", "", device_name(device).lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug if torch.device(device).type == "cuda" else f"cpu-{slug}"


def machine_header(device, quick=False) -> dict:
    """The device, versions, date, threads, load and measured limits: the head of a results file."""
    import genkern

    device = torch.device(device)
    dtypes = ("float32", "bfloat16")
    return {
        "device": _device_info(device),
        "versions": {
            "genkern": genkern.__version__,
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "copy_gbps": copy_bandwidth(device, quick),
        **_read_fields(device, quick),
        "matmul_tflops": {dt: matmul_rate(device, getattr(torch, dt), quick) for dt in dtypes},
    }


# What one run measured and ran with: each results entry keeps its own copy (a file merges many runs).
RUN_FIELDS = (
    "date",
    "versions",
    "threads",
    "load_avg",
    "copy_gbps",
    "read_gbps",
    "read_probe",
    "matmul_tflops",
    "settings",
)


def run_header(header: dict) -> dict:
    """The fields of `header` (machine_header, plus the run's settings) that belong to one run, not the device."""
    return {k: header[k] for k in RUN_FIELDS if k in header}


def _mv(matrix):
    vector = torch.ones(matrix.shape[1], device=matrix.device)
    return lambda: torch.mv(matrix, vector)


def _read_fields(device, quick) -> dict:
    probes = read_probes(device, quick)
    best = max(probes, key=probes.get)
    return {"read_gbps": probes[best], "read_probe": f"{best}: {READ_PROBES[best]}"}


def _device_info(device) -> dict:
    info = {"type": device.type, "name": device_name(device), "slug": device_slug(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    else:
        info["isa"] = cpu_features()
    return info


# The CPU features that decide the kernels' speed: vector width, and the bf16/fp16 matrix instructions.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_features() -> list:
    """ISA_FLAGS this CPU has (from /proc/cpuinfo; elsewhere torch's dispatch level alone), and torch's
    CPU dispatch level (e.g. "torch:AVX512")."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return [f for f in ISA_FLAGS if f in flags] + [f"torch:{torch.backends.cpu.get_cpu_capability()}"]


def copy_bandwidth(device, quick=False) -> float:
    """GB/s of a large tensor copy, counting the bytes read and written."""
    src = torch.ones(_probe_numel(device, quick), device=device)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), device, 3 if quick else 10)
    return 2 * src.numel() * src.element_size() / t / 1e9


# Read-only kernels that can each reach the memory's read bandwidth: a plain `sum` does not on every
# CPU (one reduction tree per thread is latency-bound: 21 GB/s where a decode kernel reads 33), while
# a matrix-vector product over wide rows streams the matrix with many independent accumulators.
READ_PROBES = {
    "sum": "torch.sum over the tensor",
    "mv-16k": "torch.mv of the tensor viewed as rows of 16384 elements",
    "mv-64k": "torch.mv of the tensor viewed as rows of 65536 elements",
    "mv-t": "torch.mv of the transposed view (columns of 16384 elements)",
}


def read_bandwidth(device, quick=False) -> float:
    """GB/s of reading a large tensor: the fastest of the READ_PROBES, the limit of read-bound kernels."""
    return max(read_probes(device, quick).values())


def read_probes(device, quick=False) -> dict:
    """{probe name: GB/s} of each of READ_PROBES over one large tensor (bytes read / best time)."""
    src = torch.ones(_probe_numel(device, quick), device=device)
    repeats, nbytes = 3 if quick else 10, src.numel() * src.element_size()
    calls = {"sum": src.sum}
    if src.numel() % 2**16 == 0:
        calls["mv-16k"] = _mv(src.view(-1, 2**14))  # (numel / 16384, 16384)
        calls["mv-64k"] = _mv(src.view(-1, 2**16))  # (numel / 65536, 65536)
        calls["mv-t"] = _mv(src.view(-1, 2**14).t())  # (16384, numel / 16384), column-major
    return {name: nbytes / _best(call, device, repeats) / 1e9 for name, call in calls.items()}


def matmul_rate(device, dtype, quick=False) -> float:
    """TFLOP/s of a square matmul (TF32 off unless torch's settings allow it)."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    call = lambda: torch.mm(a, b)  # noqa: E731
    call()  # the warm-up (on CUDA it may also create the BLAS handle: seconds)
    first = time_once(call, device)
    if first > 0.5:  # a dtype without a fast matmul here (bfloat16 on AVX2: seconds a call)
        return 2 * n**3 / first / 1e12
    t = min([first] + [time_once(call, device) for _ in range(3 if quick else 10)])
    return 2 * n**3 / t / 1e12


def matmul_ceiling(rates: dict, dtype: str):
    """The matmul rate a case in `dtype` is held against: its own dtype's rate, and for a 16-bit
    dtype at least float32's (its data can always be widened and multiplied at that rate, which
    is what a CPU without bfloat16/float16 matrix instructions does); None if none was measured."""
    rates = rates or {}
    own = rates.get(dtype)
    if dtype in ("bfloat16", "float16") and rates.get("float32"):
        return max(own or 0.0, rates["float32"])
    return own


def _probe_numel(device, quick) -> int:
    # Large, so the probes measure memory rather than cache bandwidth (a quick run trades that for time).
    return 2**22 if quick else (2**28 if device.type == "cuda" else 2**26)


def _best(call, device, repeats) -> float:
    # The limit is what the device can reach: the fastest of a few runs.
    call()
    return min(time_once(call, device) for _ in range(repeats))
