"""Pictures beside a results file: speed-up bars per op and case, and a roofline chart.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend change, no
display needed) and written atomically, so a reader never sees half a PNG. Each picture is made
from a results file's entries (genkern.bench.report.write_results) and its header's measured
limits: the copy and read bandwidth and the matmul rate of the device.
"""

from __future__ import annotations

import math

from genkern._io import atomic_path
from genkern.bench.summary import BASELINES, entry_bound

COLORS = {"torch": "#4c72b0", "torch.compile": "#dd8452", "sdpa": "#55a868"}


def figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def times_axis(ax) -> None:
    """A log y axis labelled 0.5x, 1x, 2x (not 10^0)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    label = FuncFormatter(lambda v, _: f"{v:.3g}x")
    ax.yaxis.set_major_formatter(label)
    ax.yaxis.set_minor_formatter(label)
    ax.tick_params(axis="y", which="both", labelsize=6)


def save(fig, path: str) -> str:
    """Writes `fig` to `path` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def entries_of(data: dict) -> list:
    """The entries of a results file, in file order (op, then case key)."""
    return [e for per_op in data.get("results", {}).values() for e in per_op.values() if "impls" in e]


def speedup_chart(data: dict, path: str) -> str | None:
    """One panel per op: the fast impl's speed-up over each baseline, a bar group per case and direction."""
    ops: dict = {}
    for e in entries_of(data):
        ops.setdefault(e["op"], []).append(e)
    if not ops:
        return None
    fig = figure(max(8, 0.5 * max(len(v) for v in ops.values()) + 4), 3.2 * len(ops))
    for i, (op, entries) in enumerate(ops.items()):
        ax = fig.add_subplot(len(ops), 1, i + 1)
        width = 0.8 / len(BASELINES)
        for j, base in enumerate(BASELINES):
            xs, ys = [], []
            for k, e in enumerate(entries):
                got, ref = e["impls"].get(e.get("fast_impl"), {}), e["impls"].get(base, {})
                if base != e.get("fast_impl") and got.get("status") == ref.get("status") == "ok":
                    xs.append(k + (j - 1) * width)
                    ys.append(ref["median_ms"] / got["median_ms"])
            if ys:
                ax.bar(xs, ys, width, label=f"vs {base}", color=COLORS[base])
        ax.axhline(1.0, color="black", linewidth=0.8)
        times_axis(ax)
        ax.set_xticks(range(len(entries)))
        labels = [f"{e['case']} {e['dtype']} {e['direction']}" for e in entries]
        ax.set_xticklabels(labels, fontsize=6, rotation=20, ha="right")
        ax.set_ylabel("speed-up (x)")
        ax.set_title(f"{op}: {entries[0].get('fast_impl')} over the baselines (>1: faster)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:  # no bars when no baseline ran
            ax.legend(fontsize=7)
    return save(fig, path)


def roofline_chart(data: dict, path: str) -> str | None:
    """Left: TFLOP/s against flops per byte under the matmul ceiling and the copy-bandwidth slope (cases that
    count flops); right: achieved GB/s of the memory-bound cases under the copy and read bandwidth."""
    entries = [e for e in entries_of(data) if e["impls"].get(e.get("fast_impl"), {}).get("status") == "ok"]
    compute = [e for e in entries if e.get("flops") and e.get("bytes")]
    memory = [e for e in entries if not e.get("flops") and e.get("bytes") and entry_bound(e) in ("copy", "read")]
    if not (compute or memory):
        return None
    fig = figure(13, 5)
    _roofline(fig.add_subplot(1, 2, 1), compute, data)
    _bandwidth(fig.add_subplot(1, 2, 2), memory, data)
    fig.suptitle(f"{data.get('device', {}).get('name', '?')}: achieved against the measured limits", fontsize=10)
    return save(fig, path)


def _roofline(ax, entries, data):
    copy = data.get("copy_gbps") or 0
    rates = {k: v for k, v in (data.get("matmul_tflops") or {}).items() if v}
    ais = [e["flops"] / e["bytes"] for e in entries] or [1.0]
    xs = [10**p for p in _steps(math.log10(min(ais) / 4), math.log10(max(ais) * 4))]
    for dtype, rate in rates.items():
        ax.plot(xs, [min(rate, copy * x / 1e3) for x in xs], label=f"ceiling: {dtype} matmul {rate:.3g} TFLOP/s")
    for e in entries:
        r = e["impls"][e["fast_impl"]]
        ax.scatter(e["flops"] / e["bytes"], r["tflops"], s=14)
        ax.annotate(f"{e['case']} {e['direction']}", (e["flops"] / e["bytes"], r["tflops"]), fontsize=5)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flops / byte)")
    ax.set_ylabel("achieved TFLOP/s (fast impl)")
    ax.set_title(f"roofline (bandwidth slope: copy {copy:.1f} GB/s)", fontsize=9)
    if rates or entries:
        ax.legend(fontsize=6)


def _steps(lo, hi, n=50):
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _bandwidth(ax, entries, data):
    for name, key, style in (("copy", "copy_gbps", "-"), ("read", "read_gbps", "--")):
        if data.get(key):
            ax.axhline(data[key], color="black", linestyle=style, linewidth=0.8, label=f"{name} {data[key]:.1f} GB/s")
    for k, e in enumerate(entries):
        r = e["impls"][e["fast_impl"]]
        ax.bar(k, r["gbps"], color="#55a868" if entry_bound(e) == "read" else "#4c72b0")
    ax.set_xticks(range(len(entries)))
    labels = [f"{e['op']} {e['case']} {e['direction']}" for e in entries]
    ax.set_xticklabels(labels, fontsize=5, rotation=60, ha="right")
    ax.set_ylabel("achieved GB/s (fast impl)")
    ax.set_title("memory-bound cases against the measured bandwidth", fontsize=9)
    if entries:
        ax.legend(fontsize=6)


def write_pictures(results_path: str, data: dict) -> list:
    """<results stem>-speedup.png and <results stem>-roofline.png beside `results_path`; the paths written."""
    stem = results_path[: -len(".json")] if results_path.endswith(".json") else results_path
    written = [speedup_chart(data, f"{stem}-speedup.png"), roofline_chart(data, f"{stem}-roofline.png")]
    return [p for p in written if p]
