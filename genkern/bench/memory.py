"""Peak memory of one call, and the guard that skips an impl too large to run.

Peak memory is what one call allocates beyond what was live before it (the
inputs, and for `bwd` the retained forward graph):

- CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus
  memory_allocated before the call.
- CPU: the call runs once more under torch.profiler with profile_memory=True;
  its allocation and free events (every allocation through torch's CPU
  allocator: in every op, in the C++ kernels' at::empty, in the autograd
  engine) are replayed in time order, and the peak of the running sum of live
  bytes is the answer. Memory that bypasses torch's allocator (a kernel's
  std::vector scratch blocks, small and per thread) is not seen.

The guard: a case estimates what an impl needs (`Case.memory_needed`: its peak
plus, for `bwd`, its retained graph). An impl whose estimate exceeds the limit
is not run; it is reported as status "skipped", "needs ~X GiB ...". The limit
is `--mem-limit` GiB, or by default half of the memory available when the run
starts (CPU: MemAvailable in /proc/meminfo; CUDA: the device's free memory):
the other half is left to the other impls' retained graphs and to the other
processes of a shared machine. `--mem-limit 0` turns the guard off.
"""

from __future__ import annotations

import os

import torch

GIB = 2**30


def peak_memory(call, device) -> int | None:
    """Bytes allocated during one call beyond what was live before; None if unmeasurable."""
    if torch.device(device).type == "cuda":
        return _cuda_peak(call, device)
    return _cpu_peak(call)


def _cuda_peak(call, device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _cpu_peak(call) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    if torch.autograd._profiler_enabled():  # a profiler of the caller's is running; one cannot nest another
        return None
    # Kineto prints two lines per profiler start/stop to stderr unless told not to
    # (read when the profiler first starts); a level the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    events = [e for e in results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())  # stable: same-time events keep their recorded order
    live = peak = 0
    for e in events:
        live += e.nbytes()  # > 0 allocation, < 0 free
        peak = max(peak, live)
    return peak


def available_bytes(device) -> int | None:
    """Memory free for a new allocation now: the device's free memory (CUDA), MemAvailable (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def memory_limit(device, limit_gib: float | None = None) -> int | None:
    """The guard's limit in bytes: `limit_gib`, else half the available memory; None: no guard."""
    if limit_gib is not None:
        return int(limit_gib * GIB) if limit_gib > 0 else None
    available = available_bytes(device)
    return None if available is None else available // 2


def guard(case, impl: str, direction: str, limit: int | None) -> str | None:
    """Why `impl` is not run on `case`, or None when it fits under `limit`."""
    need = case.memory_needed(impl, direction)
    if limit is None or need is None or need <= limit:
        return None
    return f"needs ~{need / GIB:.1f} GiB, over the memory limit of {limit / GIB:.1f} GiB (--mem-limit)"
