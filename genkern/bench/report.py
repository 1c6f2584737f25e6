"""Reporting: an impl's times summarized, the table printed, the results merged into <device>.json."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from genkern._io import write_atomic
from genkern.bench import FAIL, MIN_ROUNDS, NOISE, NOT_APPLICABLE, PASS
from genkern.bench.machine import run_header
from genkern.bench.timing import BWD_METHOD

_COLS = "{:<18} {:<26} {:<8} {:<7} {:<14} {:>10} {:>9} {:>7} {:>11} {:>8} {:>6} {:>8} {:>5} {:>9}  {}"


# --- summaries ------------------------------------------------------------------------


def speedup(ref_time: float, impl_time: float) -> float:
    """ratio = reference time / impl time: >1 means faster than plain PyTorch."""
    return ref_time / impl_time


def quartiles(times_ms) -> tuple:
    """(q1, median, q3) of times in ms (one time: itself three times)."""
    ms = sorted(times_ms)
    return tuple(statistics.quantiles(ms, n=4, method="inclusive")) if len(ms) > 1 else (ms[0],) * 3


def summarize(
    times, nbytes: int, ref_ms=None, copy_gbps=None, flops=None, matmul_tflops=None, read_gbps=None, ref_q=None
) -> dict:
    """Median, quartiles, ratio, GB/s (and TFLOP/s when `flops` is given) of one impl's times (s).

    ref_q: the baseline's (q1, q3) in ms; then ratio_low / ratio_high, the ratio's spread, are its
    q1 over this impl's q3 (the conservative end) and its q3 over this impl's q1.
    """
    ms = [t * 1e3 for t in times]
    q1, med, q3 = quartiles(ms)
    gbps = nbytes / (med / 1e3) / 1e9 if nbytes else None  # no byte count: a whole training step
    out = {
        "status": "ok",
        "median_ms": med,
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "n": len(ms),
        "ratio": speedup(ref_ms if ref_ms is not None else med, med),
        "ratio_low": speedup(ref_q[0], q3) if ref_q else None,
        "ratio_high": speedup(ref_q[1], q1) if ref_q else None,
        "gbps": gbps,
        "frac_copy_bw": gbps / copy_gbps if copy_gbps and gbps else None,
        "frac_read_bw": gbps / read_gbps if read_gbps and gbps else None,
    }
    if flops is not None:
        out["tflops"] = flops / (med / 1e3) / 1e12
        out["frac_matmul"] = out["tflops"] / matmul_tflops if matmul_tflops else None
    return out


def all_good(entries) -> bool:
    """No impl failed and no target was missed (what `--strict` asks)."""
    ok = all(r["status"] != "failed" for e in entries for r in e["impls"].values())
    return ok and all(t["passed"] is not False for e in entries for t in e["targets"])


def verdict_counts(entries) -> dict:
    """{verdict: how many targets got it} over `entries`, PASS, NOISE, FAIL, NOT_APPLICABLE in order."""
    counts = dict.fromkeys((PASS, NOISE, FAIL, NOT_APPLICABLE), 0)
    for t in (t for e in entries for t in e["targets"]):
        counts[t["verdict"]] += 1
    return counts


def print_summary(entries) -> None:
    """One line: how many targets passed, were within noise, failed, did not apply."""
    counts = verdict_counts(entries)
    if sum(counts.values()):
        print("targets: " + ", ".join(f"{n} {verdict}" for verdict, n in counts.items()))


# --- the table ------------------------------------------------------------------------


def print_header(header: dict, impls, baselines=(), mem_limit=None) -> None:
    """The machine, its measured limits, what the columns mean, and the column titles."""
    d, v = header["device"], header["versions"]
    rates = ", ".join(f"{k} {r:.3g}" for k, r in header["matmul_tflops"].items() if r)
    isa = f", ISA: {' '.join(d['isa'])}" if d.get("isa") else ""
    print(
        f"genkern bench on {d['slug']} ({d['name']}{isa}, threads: {header['threads']}); "
        f"torch {v['torch']}, triton {v['triton']}, genkern {v['genkern']}"
    )
    print(
        f"measured copy bandwidth {header['copy_gbps']:.1f} GB/s (read+write), read bandwidth "
        f"{header.get('read_gbps') or 0:.1f} GB/s ({header.get('read_probe', 'sum')}); matmul TFLOP/s: {rates}; "
        f"load average {header['load_avg']}"
    )
    _warn_load(header)
    extra = f" (+ {', '.join(baselines)} where a case has it)" if baselines else ""
    limit = "none" if mem_limit is None else f"{mem_limit / 2**30:.1f} GiB"
    print(
        f"impls: {', '.join(impls)}{extra}; torch = the plain-PyTorch baseline (genkern.bench.baselines; "
        f"torch.compile: of it); ratio = torch time / impl time (>1: faster than plain PyTorch); "
        f"bwd = {BWD_METHOD}"
    )
    print(
        f"ratio IQR: torch q1 / impl q3 - torch q3 / impl q1; a target passes at its conservative end "
        f"(baseline q1 / impl q3; bandwidth: at the impl's q3 time) from >= {MIN_ROUNDS} rounds, "
        f"'{NOISE}' when only the medians meet it"
    )
    print(
        f"TFLOP/s: the op's flops (see its case module) / median time; %mm: of the measured matmul rate in the "
        f"case's dtype (16-bit: at least float32's); peak MiB: allocated during one call "
        f"beyond the inputs (and a retained graph); memory limit {limit} (--mem-limit)"
    )
    print(
        _COLS.format(
            "op",
            "case",
            "dtype",
            "dir",
            "impl",
            "median ms",
            "IQR ms",
            "ratio",
            "ratio IQR",
            "GB/s",
            "%copy",
            "TFLOP/s",
            "%mm",
            "peak MiB",
            "target / note",
        )
    )
    sys.stdout.flush()


def _warn_load(header: dict) -> None:
    cores = os.cpu_count() or 1
    if header["device"]["type"] == "cpu" and header["load_avg"] and header["load_avg"][0] >= cores:
        print(
            f"warning: load average {header['load_avg'][0]} on {cores} cores: other processes compete for the "
            "CPU and multi-threaded ops wait on them; ratios are unreliable (try --threads 1)"
        )


def _fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value * scale, spec)


def print_entry(entry: dict) -> None:
    """One row per impl of a (case, direction) entry, its targets and errors in the last column."""
    for impl, r in entry["impls"].items():
        notes = [f"{t['target']}: {_verdict(t)}" for t in entry["targets"] if t["impl"] == impl]
        if r["status"] != "ok":
            error = r["error"] if len(r["error"]) <= 90 else r["error"][:87] + "..."
            notes.insert(0, f"{r['status']}: {error}")
        peak = r.get("peak_mem_bytes")
        print(
            _COLS.format(
                entry["op"],
                entry["case"],
                entry["dtype"],
                entry["direction"],
                impl,
                _fmt(r.get("median_ms"), ".4f"),
                _fmt(r.get("iqr_ms"), ".4f"),
                _fmt(r.get("ratio"), ".2f"),
                _spread(r.get("ratio_low"), r.get("ratio_high")),
                _fmt(r.get("gbps"), ".1f"),
                _fmt(r.get("frac_copy_bw"), ".0%"),
                _fmt(r.get("tflops"), ".3g"),
                _fmt(r.get("frac_matmul"), ".0%"),
                _fmt(peak, ".1f", 2**-20),
                "; ".join(notes),
            )
        )
    sys.stdout.flush()


def _spread(low, high) -> str:
    return "-" if low is None or high is None else f"{low:.2f}-{high:.2f}"


def _verdict(t: dict) -> str:
    if t["value"] is None:
        return t["verdict"]
    conservative = "" if t.get("conservative") is None else f", conservative {t['conservative']:.2f}"
    return f"{t['verdict']} ({t['value']:.2f}{conservative})"


# --- the results file -----------------------------------------------------------------


def write_results(out_dir: str, header: dict, entries) -> str:
    """Merges `entries` into <out_dir>/<device slug>.json by op and case key; atomic.

    The top-level header is the latest run's; an entry kept from an earlier run was measured under
    other threads, load and limits, so every entry carries its own run's header under "run" (an entry
    that has one keeps it; older files' entries without one are left as they are).
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, header["device"]["slug"] + ".json")
    data = _load(path)
    results = data.get("results") if isinstance(data.get("results"), dict) else {}
    run = run_header(header)
    for e in entries:
        e = e if "run" in e else {**e, "run": run}
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
    print(f"genkern bench: {path} is unreadable ({reason}); moved it to {kept} and starting afresh", file=sys.stderr)
    return {}
