"""`genkern bench --compare A.json B.json [...]`: the same cases side by side across devices.

For every case (op, size, dtype, direction) that at least two of the files hold: each file's
fast-impl time, its speed-up over plain PyTorch, and its achieved GB/s or TFLOP/s, then the
machines' measured limits. The chart draws, per common case, each device's fast-impl speed
relative to the first file (>1: faster than the first device).
"""

from __future__ import annotations

import json
import os

from genkern.bench.plots import entries_of, figure, save, times_axis

_W = 30


def load(path: str) -> dict:
    """A results file; ValueError (one line) when it cannot be read or is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--compare: cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"--compare: {path} is not a genkern bench results file (no 'results')")
    return data


def _key(e: dict) -> tuple:
    return e["op"], f"{e['case']}/{e['dtype']}/{e['direction']}"


def _fast(e: dict) -> dict:
    r = e["impls"].get(e.get("fast_impl"), {})
    return r if r.get("status") == "ok" else {}


def common_cases(files: list) -> list:
    """[(op, key)] held (with a fast impl that ran) by at least two of the results files, in first-seen order."""
    seen: dict = {}
    for data in files:
        for e in entries_of(data):
            if _fast(e):
                seen.setdefault(_key(e), set()).add(id(data))
    return [k for k, ids in seen.items() if len(ids) >= 2]


def _cell(e: dict | None) -> str:
    r = _fast(e) if e else {}
    if not r:
        return "-"
    rate = f"{r['tflops']:.3g} TF/s" if r.get("tflops") else (f"{r['gbps']:.1f} GB/s" if r.get("gbps") else "")
    return f"{r['median_ms']:.3g} ms {r.get('ratio') or 0:.2f}x {rate}"


def table_lines(names: list, files: list, cases: list) -> list:
    """The comparison table as lines: the limits of each device, then one row per common case."""
    by_file = [{_key(e): e for e in entries_of(d)} for d in files]
    lines = ["  ".join([f"{'':<58}"] + [f"{n[:_W]:<{_W}}" for n in names])]
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
    bandwidth = [f"copy {d.get('copy_gbps') or 0:.0f} read {d.get('read_gbps') or 0:.0f} GB/s" for d in files]
    matmul = [
        " ".join(f"{short.get(k, k)} {v:.3g}" for k, v in (d.get("matmul_tflops") or {}).items() if v) for d in files
    ]
    lines.append("  ".join([f"{'measured limits':<58}"] + [f"{x[:_W]:<{_W}}" for x in bandwidth]))
    lines.append("  ".join([f"{'measured matmul TFLOP/s':<58}"] + [f"{x[:_W]:<{_W}}" for x in matmul]))
    lines.append("cell: fast impl median, speed-up over plain PyTorch on that device, achieved GB/s or TFLOP/s")
    for op, key in cases:
        cells = [_cell(f.get((op, key))) for f in by_file]
        lines.append("  ".join([f"{op[:17]:<17} {key[:40]:<40}"] + [f"{c[:_W]:<{_W}}" for c in cells]))
    return lines


def chart(names: list, files: list, cases: list, path: str) -> str | None:
    """Per common case, each device's fast-impl speed relative to the first file's (log scale)."""
    if not cases:
        return None
    by_file = [{_key(e): e for e in entries_of(d)} for d in files]
    fig = figure(max(8, 0.45 * len(cases) + 3), 5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(files)
    for j, (name, entries) in enumerate(zip(names, by_file)):
        xs, ys = [], []
        for k, case in enumerate(cases):
            base, here = _fast(by_file[0].get(case) or {}), _fast(entries.get(case) or {})
            if base and here:
                xs.append(k + j * width)
                ys.append(base["median_ms"] / here["median_ms"])
        ax.bar(xs, ys, width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    times_axis(ax)
    ax.set_xticks([k + width * (len(files) - 1) / 2 for k in range(len(cases))])
    ax.set_xticklabels([f"{op} {key}" for op, key in cases], fontsize=6, rotation=60, ha="right")
    ax.set_ylabel(f"speed relative to {names[0]} (fast impl; >1: faster)")
    ax.legend(fontsize=7)
    return save(fig, path)


def run_compare(paths, out_dir: str) -> int:
    """Prints the table, writes compare-<slugs>.png into `out_dir`; the exit code (2: unusable input)."""
    if len(paths) < 2:
        raise ValueError(f"--compare needs at least two results files, got {len(paths)}")
    files = [load(p) for p in paths]
    names = [d.get("device", {}).get("slug") or os.path.basename(p) for d, p in zip(files, paths)]
    cases = common_cases(files)
    for line in table_lines(names, files, cases):
        print(line)
    if not cases:
        print("no case is held by two of these files: nothing to compare side by side")
        return 0
    os.makedirs(out_dir, exist_ok=True)
    path = chart(names, files, cases, os.path.join(out_dir, "compare-" + "-vs-".join(names) + ".png"))
    print(f"wrote {path}")
    return 0
