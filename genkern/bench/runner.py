"""`genkern bench`: times every registered case, prints a table, writes bench/results/<device>.json.

Each (case, direction) is timed for every impl in interleaved rounds, so the
ratios come from the same stretch of a noisy machine. Times are medians after
warm-up; on CUDA each call is timed with CUDA events. `bwd` times
torch.autograd.grad over a graph built once and retained (no forward inside).
Peak memory is measured on one more call, and an impl whose estimated memory
is over the limit is skipped, not run (genkern.bench.memory).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

from genkern._info import _version
from genkern._io import write_atomic
from genkern.bench import COMPILE, DIRECTIONS, FAST, select_cases
from genkern.bench.memory import guard, memory_limit, peak_memory

BWD_METHOD = "torch.autograd.grad over one retained forward graph (retain_graph=True)"
MIN_ROUNDS = 3


class ImplError(Exception):
    """An impl could not be benchmarked; status is "unavailable" or "failed"."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


# --- command line -------------------------------------------------------------------

def add_arguments(parser) -> None:
    """Adds the `genkern bench` options to an argparse parser."""
    parser.add_argument("--op", help="only this op (e.g. reparameterize_kl)")
    parser.add_argument("--sizes", help="comma-separated size labels, e.g. 256x64,4096x1024 (any size an op takes)")
    parser.add_argument("--quick", action="store_true", help="the smallest cases, few repeats: finishes in seconds")
    parser.add_argument("--direction", choices=DIRECTIONS, action="append", help="only these directions (repeatable)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--impl", default="auto", choices=("auto", "cpp", "triton", "torch"),
                        help="the fast impl to compare with plain PyTorch (auto: cpp on CPU, triton on CUDA)")
    parser.add_argument("--repeats", type=int, help="at most this many timed runs per impl (default 100; quick 10)")
    parser.add_argument("--budget", type=float, help="timing seconds per case and direction (default 1, quick 0.05)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and the C++ kernels (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--mem-limit", type=float, metavar="GIB",
                        help="skip an impl estimated to need more memory than this many GiB "
                             "(default: half the memory available at the start; 0: no limit)")
    parser.add_argument("--out", default=os.path.join("bench", "results"),
                        help="results directory (default bench/results, under the current directory)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if an impl failed or a target was missed")


def run(args) -> int:
    """Runs the benchmarks selected by `args`; returns the exit code."""
    try:
        device = _device(args.device)
        sizes = [s.strip() for s in args.sizes.split(",") if s.strip()] if args.sizes else None
        cases = select_cases(args.op, sizes, args.quick, device.type)
        if any(n is not None and n < 1 for n in (args.threads, args.repeats)):
            raise ValueError("--threads and --repeats must be >= 1")
        if args.mem_limit is not None and args.mem_limit < 0:
            raise ValueError("--mem-limit must be >= 0")
    except (ValueError, RuntimeError) as exc:
        print(f"genkern bench: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"genkern bench: no {device.type} case matches --op {args.op} --sizes {args.sizes}", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (0.05 if args.quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (10 if args.quick else 100)
    impls = impls_for(device, args.impl, compile=not args.no_compile)
    limit = memory_limit(device, args.mem_limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        entries, header = _run_cases(cases, device, impls, args, budget, repeats, limit)
    finally:
        torch.set_num_threads(threads)
    header["settings"] = {"impl": args.impl, "budget_s": budget, "repeats": repeats, "quick": args.quick,
                          "mem_limit_gib": None if limit is None else round(limit / 2**30, 2)}
    path = write_results(args.out, header, entries)
    print(f"wrote {path}")
    return 1 if args.strict and not _all_good(entries) else 0


def _run_cases(cases, device, impls, args, budget, repeats, limit):
    # A current CUDA device: the timing events and streams follow it.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        header = machine_header(device, args.quick)
        print_header(header, impls, sorted({b for c in cases for b in c.baselines}), limit)
        entries = []
        for case in cases:
            for direction in args.direction or DIRECTIONS:
                if direction not in case.directions:  # e.g. inference-only ops have no backward
                    continue
                entry = bench_case(case, direction, device, impls, budget, repeats, header["copy_gbps"],
                                   matmul_tflops=header["matmul_tflops"], mem_limit=limit,
                                   read_gbps=header["read_gbps"])
                print_entry(entry)
                entries.append(entry)
    return entries, header


def _device(name) -> torch.device:
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name}")
    return device


def impls_for(device, impl="auto", compile=True) -> list:
    """The impls to time, the plain-PyTorch reference first."""
    fast = fast_impl(device, impl)
    return ["torch"] + ([fast] if fast != "torch" else []) + ([COMPILE] if compile else [])


def case_impls(case, impls) -> list:
    """`impls` with the case's own baselines (e.g. sdpa) added before torch.compile."""
    extra = [b for b in case.baselines if b not in impls]
    at = impls.index(COMPILE) if COMPILE in impls else len(impls)
    tail = list(impls[at:]) if case.compiles else [i for i in impls[at:] if i != COMPILE]
    return list(impls[:at]) + extra + tail


def fast_impl(device, impl="auto") -> str:
    if impl in (None, "auto", FAST):
        return "triton" if torch.device(device).type == "cuda" else "cpp"
    return impl


# --- the machine: name, versions, measured limits -------------------------------------

def device_name(device) -> str:
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
    import genkern
    device = torch.device(device)
    info = {"type": device.type, "name": device_name(device), "slug": device_slug(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(capability=f"sm_{p.major}{p.minor}", memory_gib=round(p.total_memory / 2**30, 1))
    dtypes = ("float32", "bfloat16") if device.type == "cuda" else ("float32",)
    return {
        "device": info,
        "versions": {"genkern": genkern.__version__, "torch": torch.__version__, "triton": _version("triton"),
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "copy_gbps": copy_bandwidth(device, quick),
        "read_gbps": read_bandwidth(device, quick),
        "matmul_tflops": {dt: matmul_rate(device, getattr(torch, dt), quick) for dt in dtypes},
    }


def copy_bandwidth(device, quick=False) -> float:
    """GB/s of a large tensor copy, counting the bytes read and written."""
    numel = 2**22 if quick else (2**28 if device.type == "cuda" else 2**26)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    t = _best(lambda: dst.copy_(src), device, 3 if quick else 10)
    return 2 * src.numel() * src.element_size() / t / 1e9


def read_bandwidth(device, quick=False) -> float:
    """GB/s of reading a large tensor (a sum over it): the limit of read-bound kernels."""
    numel = 2**22 if quick else (2**28 if device.type == "cuda" else 2**26)
    src = torch.ones(numel, device=device)
    t = _best(lambda: src.sum(), device, 3 if quick else 10)
    return src.numel() * src.element_size() / t / 1e9


def matmul_rate(device, dtype, quick=False) -> float:
    """TFLOP/s of a square matmul (TF32 off unless torch's settings allow it)."""
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _best(lambda: torch.mm(a, b), device, 3 if quick else 10)
    return 2 * n**3 / t / 1e12


def _best(call, device, repeats) -> float:
    # The limit is what the device can reach: the fastest of a few runs.
    call()
    return min(time_once(call, device) for _ in range(repeats))


# --- timing ---------------------------------------------------------------------------

def time_once(call, device) -> float:
    """Seconds one call takes; on CUDA between two events on the current stream."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


_compiled: dict = {}


def _impl_fn(case, impl):
    # One torch.compile per case: dynamo is reset when the case changes, so its
    # recompile limit is never hit (it would silently fall back to eager).
    if impl != COMPILE:
        return case.impl_fn(impl)
    key = (case.op, case.name, case.dtype)
    if key not in _compiled:
        if "torch._dynamo" in sys.modules:  # nothing to reset (and no slow import) otherwise
            torch._dynamo.reset()
        _compiled.clear()
        _compiled[key] = case.impl_fn(COMPILE)
    return _compiled[key]


def prepare(case, impl, direction, device, inputs=None):
    """A zero-argument callable running one `direction` of `impl` on `case`.

    Runs the forward once (the compile, for torch.compile). Raises ImplError
    when the impl is unavailable (not built, placeholder) or fails.
    """
    inputs = case.make_inputs(device) if inputs is None else inputs
    try:
        return _prepare(_impl_fn(case, impl), case, direction, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, the run goes on
        raise ImplError(_status(exc, impl), _message(exc)) from exc


def _prepare(fn, case, direction, inputs):
    if direction == "step":  # fn runs a whole training step itself
        fn(inputs)
        return lambda: fn(inputs)
    if direction == "fwd":
        def fwd():
            with torch.no_grad():
                return fn(inputs)
        fwd()
        return fwd
    leaves = [inputs[name].requires_grad_(True) for name in case.grad_inputs]
    outs = fn(inputs)
    grads = [torch.randn_like(o) for o in outs]
    if direction == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
    return lambda: torch.autograd.grad(fn(inputs), leaves, grads)


def _status(exc, impl) -> str:
    from genkern import ImplUnavailableError
    unavailable = isinstance(exc, (ImplUnavailableError, NotImplementedError))
    return "unavailable" if unavailable and impl != COMPILE else "failed"


def _message(exc) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def measure(calls: dict, device, budget_s: float, max_rounds: int):
    """({impl: [seconds, ...]}, {impl: error}): one warm-up each, then interleaved rounds until the budget."""
    samples, errors = {name: [] for name in calls}, {}
    live = dict(calls)
    start, rounds = None, 0
    while live and rounds < max_rounds and (rounds < MIN_ROUNDS or time.perf_counter() - start < budget_s):
        for name, call in list(live.items()):
            try:
                samples[name].append(time_once(call, device))
            except Exception as exc:  # noqa: BLE001 - recorded; the other impls go on
                errors[name] = _message(exc)
                del live[name], samples[name]
        if start is None:  # that was the warm-up round
            start = time.perf_counter()
            samples = {name: [] for name in samples}
        else:
            rounds += 1
    return samples, errors


def speedup(ref_time: float, impl_time: float) -> float:
    """ratio = reference time / impl time: >1 means faster than plain PyTorch."""
    return ref_time / impl_time


def summarize(times, nbytes: int, ref_ms=None, copy_gbps=None, flops=None, matmul_tflops=None,
              read_gbps=None) -> dict:
    """Median, quartiles, ratio, GB/s (and TFLOP/s when `flops` is given) of one impl's times (s)."""
    ms = sorted(t * 1e3 for t in times)
    q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
    gbps = nbytes / (med / 1e3) / 1e9 if nbytes else None  # no byte count: a whole training step
    out = {"status": "ok", "median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "n": len(ms),
           "ratio": speedup(ref_ms if ref_ms is not None else med, med), "gbps": gbps,
           "frac_copy_bw": gbps / copy_gbps if copy_gbps and gbps else None,
           "frac_read_bw": gbps / read_gbps if read_gbps and gbps else None}
    if flops is not None:
        out["tflops"] = flops / (med / 1e3) / 1e12
        out["frac_matmul"] = out["tflops"] / matmul_tflops if matmul_tflops else None
    return out


def bench_case(case, direction, device, impls, budget_s, max_rounds, copy_gbps=None, *,
               matmul_tflops=None, mem_limit=None, read_gbps=None) -> dict:
    """Times `impls` (and the case's baselines) on one case and direction; returns the result entry.

    matmul_tflops: {dtype name: the device's measured rate}; mem_limit: bytes, for the memory guard;
    read_gbps: the device's measured read bandwidth.
    """
    inputs = case.make_inputs(device)  # shared: one copy of the inputs for all impls
    dtype = str(case.dtype).replace("torch.", "")
    fast = next((i for i in impls if i not in ("torch", COMPILE)), "torch")
    impls = case_impls(case, impls)
    calls, results, nbytes, flops = {}, {}, case.bytes_moved(direction), case.flops(direction)
    for impl in impls:
        too_big = guard(case, impl, direction, mem_limit)
        if too_big:
            results[impl] = {"status": "skipped", "error": too_big,
                             "needs_bytes": case.memory_needed(impl, direction)}
            continue
        try:
            calls[impl] = prepare(case, impl, direction, device, inputs)
        except ImplError as exc:
            results[impl] = {"status": exc.status, "error": str(exc)}
    samples, errors = measure(calls, device, budget_s, max_rounds)
    results.update({impl: {"status": "failed", "error": error} for impl, error in errors.items()})
    ref = samples.get("torch")
    ref_ms = statistics.median(ref) * 1e3 if ref else None
    for impl, times in samples.items():
        results[impl] = summarize(times, nbytes, ref_ms, copy_gbps, flops, (matmul_tflops or {}).get(dtype),
                                  read_gbps)
        if ref_ms is None:
            results[impl]["ratio"] = None
        results[impl]["peak_mem_bytes"] = peak_memory(calls[impl], device)
    entry = {"op": case.op, "case": case.name, "sizes": case.sizes, "dtype": dtype, "direction": direction,
             "bytes": nbytes, "fast_impl": fast, "impls": {i: results[i] for i in impls},
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if flops is not None:
        entry["flops"] = flops
    if direction == "bwd":
        entry["method"] = BWD_METHOD
    entry["targets"] = [t.evaluate(entry["impls"], fast) for t in case.targets_for(device.type, direction)]
    return entry


def _all_good(entries) -> bool:
    ok = all(r["status"] != "failed" for e in entries for r in e["impls"].values())
    return ok and all(t["passed"] is not False for e in entries for t in e["targets"])


# --- output -------------------------------------------------------------------------

_COLS = ("{:<18} {:<26} {:<8} {:<7} {:<14} {:>10} {:>9} {:>7} {:>8} {:>6} {:>8} {:>9}  {}")


def print_header(header: dict, impls, baselines=(), mem_limit=None) -> None:
    d, v = header["device"], header["versions"]
    rates = ", ".join(f"{k} {r:.3g}" for k, r in header["matmul_tflops"].items() if r)
    print(f"genkern bench on {d['slug']} ({d['name']}, threads: {header['threads']}); "
          f"torch {v['torch']}, triton {v['triton']}, genkern {v['genkern']}")
    print(f"measured copy bandwidth {header['copy_gbps']:.1f} GB/s (read+write), read bandwidth "
          f"{header.get('read_gbps') or 0:.1f} GB/s; matmul TFLOP/s: {rates}; "
          f"load average {header['load_avg']}")
    cores = os.cpu_count() or 1
    if header["device"]["type"] == "cpu" and header["load_avg"] and header["load_avg"][0] >= cores:
        print(f"warning: load average {header['load_avg'][0]} on {cores} cores: other processes compete for the "
              "CPU and multi-threaded ops wait on them; ratios are unreliable (try --threads 1)")
    extra = f" (+ {', '.join(baselines)} where a case has it)" if baselines else ""
    limit = "none" if mem_limit is None else f"{mem_limit / 2**30:.1f} GiB"
    print(f"impls: {', '.join(impls)}{extra}; ratio = torch time / impl time (>1: faster than plain PyTorch); "
          f"bwd = {BWD_METHOD}")
    print(f"TFLOP/s: the op's flops (see its case module) / median time; peak MiB: allocated during one call "
          f"beyond the inputs (and a retained graph); memory limit {limit} (--mem-limit)")
    print(_COLS.format("op", "case", "dtype", "dir", "impl", "median ms", "IQR ms", "ratio", "GB/s",
                       "%copy", "TFLOP/s", "peak MiB", "target / note"))
    sys.stdout.flush()


def _fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def print_entry(entry: dict) -> None:
    for impl, r in entry["impls"].items():
        notes = [f"{t['target']}: {_verdict(t)}" for t in entry["targets"] if t["impl"] == impl]
        if r["status"] != "ok":
            error = r["error"] if len(r["error"]) <= 90 else r["error"][:87] + "..."
            notes.insert(0, f"{r['status']}: {error}")
        peak = r.get("peak_mem_bytes")
        print(_COLS.format(entry["op"], entry["case"], entry["dtype"], entry["direction"], impl,
                           _fmt(r.get("median_ms"), ".4f"), _fmt(r.get("iqr_ms"), ".4f"), _fmt(r.get("ratio"), ".2f"),
                           _fmt(r.get("gbps"), ".1f"), _fmt(r.get("frac_copy_bw"), ".0%"),
                           _fmt(r.get("tflops"), ".3g"), _fmt(peak, ".1f", 2**-20), "; ".join(notes)))
    sys.stdout.flush()


def _verdict(t: dict) -> str:
    value = "-" if t["value"] is None else f"{t['value']:.2f}"
    return {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]] + f" ({value})"


def write_results(out_dir: str, header: dict, entries) -> str:
    """Merges `entries` into <out_dir>/<device slug>.json by op and case key; atomic."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, header["device"]["slug"] + ".json")
    data = _load(path)
    results = data.get("results") if isinstance(data.get("results"), dict) else {}
    for e in entries:
        results.setdefault(e["op"], {})[f"{e['case']}/{e['dtype']}/{e['direction']}"] = e
    data.update(header, results=results)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        data = None
        reason = str(exc)
    else:
        reason = "not a JSON object"
    if isinstance(data, dict):
        return data
    # Keep what the user had: set the unreadable file aside instead of overwriting it.
    kept = f"{path}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(path, kept)
    print(f"genkern bench: {path} is unreadable ({reason}); moved it to {kept} and starting afresh",
          file=sys.stderr)
    return {}
