"""`genkern bench`: times every registered case, prints a table, writes bench/results/<device>.json.

Each (case, direction) is timed for every impl in interleaved rounds, so the
ratios come from the same stretch of a noisy machine. Times are medians after
warm-up, with their quartiles; on CUDA each call is timed with CUDA events.
"torch" is the plain-PyTorch baseline of genkern.bench.baselines. A target
passes at the conservative end of the spread, else it is "within noise" or
fails (genkern.bench.Target). `bwd` times
torch.autograd.grad over a graph built once and retained (no forward inside).
Peak memory is measured on one more call, and an impl whose estimated memory
is over the limit is skipped, not run (genkern.bench.memory).

This module only orchestrates; the work is done by genkern.bench.arguments
(options, impl choice), machine (device name, measured limits), timing and
report (summaries, the table, the results file). Their public names used by
`genkern bench`, bench/ and the tests are importable from here too.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys

import torch

from genkern._io import locked, remove_temp_files
from genkern.bench import COMPILE, DIRECTIONS, NOISE, report, select_cases
from genkern.bench.arguments import (
    add_arguments,
    budget_s,
    case_impls,
    check_cases,
    check_numbers,
    fast_impl,
    impls_for,
    max_repeats,
    resolve_device,
    size_labels,
)
from genkern.bench.compare_results import run_compare
from genkern.bench.machine import (
    copy_bandwidth,
    device_name,
    device_slug,
    machine_header,
    matmul_ceiling,
    matmul_rate,
    read_bandwidth,
)
from genkern.bench.memory import guard, memory_limit, peak_memory
from genkern.bench.report import (
    all_good,
    print_entry,
    print_header,
    print_summary,
    quartiles,
    speedup,
    summarize,
)
from genkern.bench.summary import print_op_summary
from genkern.bench.timing import BWD_METHOD, MIN_ROUNDS, ImplError, measure, prepare, time_once

__all__ = [
    "BWD_METHOD",
    "MIN_ROUNDS",
    "ImplError",
    "add_arguments",
    "bench_case",
    "case_impls",
    "copy_bandwidth",
    "device_name",
    "device_slug",
    "fast_impl",
    "impls_for",
    "machine_header",
    "matmul_rate",
    "measure",
    "prepare",
    "print_entry",
    "print_header",
    "print_summary",
    "read_bandwidth",
    "run",
    "speedup",
    "summarize",
    "time_once",
    "write_results",
]


def run(args) -> int:
    """Runs the benchmarks selected by `args` (or compares results files: --compare); returns the exit code."""
    if getattr(args, "compare", None):
        try:
            return run_compare(args.compare, args.out)
        except ValueError as exc:
            print(f"genkern bench: {exc}", file=sys.stderr)
            return 2
    try:  # every option is checked before anything is timed
        check_numbers(args)
        labels = size_labels(args.sizes)
        device = resolve_device(args.device)
        cases = select_cases(args.op, labels, args.quick, device.type, full=getattr(args, "full", True))
        check_cases(cases)
    except (ValueError, RuntimeError) as exc:
        print(f"genkern bench: {exc}", file=sys.stderr)
        return 2
    if not cases:
        print(f"genkern bench: no {device.type} case matches --op {args.op} --sizes {args.sizes}", file=sys.stderr)
        return 2
    budget, repeats = budget_s(args), max_repeats(args)
    impls = impls_for(device, args.impl, compile=not args.no_compile)
    limit = memory_limit(device, args.mem_limit)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        entries, header = _run_cases(cases, device, impls, args, budget, repeats, limit)
    finally:
        torch.set_num_threads(threads)
    header["settings"] = {
        "impl": args.impl,
        "budget_s": budget,
        "repeats": repeats,
        "quick": args.quick,
        "mem_limit_gib": None if limit is None else round(limit / 2**30, 2),
    }
    print_op_summary(entries)
    print_summary(entries)
    path = write_results(args.out, header, entries)
    pictures = [] if getattr(args, "no_plots", False) else _pictures(path)
    print(f"wrote {path}" + "".join(f", {p}" for p in pictures))
    return 1 if args.strict and not all_good(entries) else 0


def _pictures(path: str) -> list:
    # Drawn from the whole merged file; a machine without matplotlib still gets its results.
    try:
        from genkern.bench.plots import write_pictures

        with open(path) as f:
            return write_pictures(path, json.load(f))
    except ImportError as exc:
        print(f"note: no pictures ({exc})")
        return []


def write_results(out_dir: str, header: dict, entries) -> str:
    """Merges `entries` into <out_dir>/<device slug>.json (genkern.bench.report.write_results) under a lock.

    The merge reads the file, adds the entries and rewrites it atomically; two `genkern bench` runs
    merging at once would each rewrite what they read and lose the other's entries, so the whole
    read-modify-write holds an exclusive lock beside the file. Under it no other writer is active,
    so temporaries beside the file are those of a writer that was killed: they are removed.
    """
    os.makedirs(out_dir, exist_ok=True)
    name = header["device"]["slug"] + ".json"
    with locked(os.path.join(out_dir, name)):
        remove_temp_files(out_dir, lambda target: target == name)
        return report.write_results(out_dir, header, entries)


def _run_cases(cases, device, impls, args, budget, repeats, limit):
    # A current CUDA device: the timing events and streams follow it.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        header = machine_header(device, args.quick)
        print_header(header, impls, sorted({b for c in cases for b in c.baselines}), limit)
        if repeats < MIN_ROUNDS:
            print(f"note: --repeats {repeats} < {MIN_ROUNDS} rounds: no target can PASS, at best '{NOISE}'")
        entries = []
        plan = [(c, d) for c in cases for d in args.direction or DIRECTIONS if d in c.directions]
        with _progress(len(plan)) as bar:
            for case, direction in plan:  # a direction a case lacks (inference-only ops: no backward) is left out
                bar.set_postfix_str(f"{case.op} {case.name} {direction}", refresh=False)
                entry = bench_case(
                    case,
                    direction,
                    device,
                    impls,
                    budget,
                    repeats,
                    header["copy_gbps"],
                    matmul_tflops=header["matmul_tflops"],
                    mem_limit=limit,
                    read_gbps=header["read_gbps"],
                )
                with bar.external_write_mode():
                    print_entry(entry)
                entries.append(entry)
                bar.update()
    return entries, header


def _progress(total):
    """A progress bar over the (case, direction) entries with the time left, on stderr when it is a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="case", desc="genkern bench", dynamic_ncols=True, disable=None, leave=False)


def bench_case(
    case,
    direction,
    device,
    impls,
    budget_s,
    max_rounds,
    copy_gbps=None,
    *,
    matmul_tflops=None,
    mem_limit=None,
    read_gbps=None,
) -> dict:
    """Times `impls` (and the case's baselines) on one case and direction; returns the result entry.

    matmul_tflops: {dtype name: the device's measured rate}; mem_limit: bytes, for the memory guard;
    read_gbps: the device's measured read bandwidth.
    """
    dtype = str(case.dtype).replace("torch.", "")
    fast = next((i for i in impls if i not in ("torch", COMPILE)), "torch")
    impls = case_impls(case, impls)
    nbytes, flops = case.bytes_moved(direction), case.flops(direction)
    calls, results = _prepare_all(case, impls, direction, device, mem_limit)
    samples, errors = measure(calls, device, budget_s, max_rounds)
    results.update({impl: {"status": "failed", "error": error} for impl, error in errors.items()})
    ref = samples.get("torch")
    ref_q1, ref_ms, ref_q3 = quartiles([t * 1e3 for t in ref]) if ref else (None,) * 3
    rates = matmul_ceiling(matmul_tflops, dtype)
    for impl, times in samples.items():
        results[impl] = summarize(
            times, nbytes, ref_ms, copy_gbps, flops, rates, read_gbps, ref_q=(ref_q1, ref_q3) if ref else None
        )
        if ref_ms is None:
            results[impl]["ratio"] = None
        results[impl]["peak_mem_bytes"] = peak_memory(calls[impl], device)
    entry = {
        "op": case.op,
        "case": case.name,
        "sizes": case.sizes,
        "dtype": dtype,
        "direction": direction,
        "bytes": nbytes,
        "fast_impl": fast,
        "bound": case.bound,
        "impls": {i: results[i] for i in impls},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if flops is not None:
        entry["flops"] = flops
    if direction == "bwd":
        entry["method"] = BWD_METHOD
    entry["targets"] = [t.evaluate(entry["impls"], fast) for t in case.targets_for(device.type, direction)]
    return entry


def _prepare_all(case, impls, direction, device, mem_limit):
    # ({impl: call}, {impl: result}): a call for each impl that can run, a result for each that cannot.
    inputs = case.make_inputs(device)  # shared: one copy of the inputs for all impls
    calls, results = {}, {}
    for impl in impls:
        too_big = guard(case, impl, direction, mem_limit)
        if too_big:
            results[impl] = {"status": "skipped", "error": too_big, "needs_bytes": case.memory_needed(impl, direction)}
            continue
        try:
            calls[impl] = prepare(case, impl, direction, device, inputs)
        except ImplError as exc:
            results[impl] = {"status": exc.status, "error": str(exc)}
    return calls, results
