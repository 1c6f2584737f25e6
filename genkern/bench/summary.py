"""The end-of-run summary: per op, the fast impl's speed-ups, its share of the machine limit, its targets.

A run prints hundreds of rows; a reader wants one line per op: how much faster the fast impl is
than each baseline (worst and best over the op's cases and directions, so a slow case is not
hidden behind an average), how close it gets to what the machine can do (copy or read bandwidth
for the memory-bound ops, the measured matmul rate for attention: `Case.bound`), and every
target's verdict, with the failed ones named.
"""

from __future__ import annotations

from genkern.bench import COMPILE, FAIL, NOISE, NOT_APPLICABLE, PASS, SDPA

BASELINES = ("torch", COMPILE, SDPA)
# The share of the machine limit each bound reads, from an impl's results (genkern.bench.report.summarize).
_SHARE = {"copy": "frac_copy_bw", "read": "frac_read_bw", "matmul": "frac_matmul"}
_LIMIT_NAME = {"copy": "copy bw", "read": "read bw", "matmul": "matmul"}
_COLS = "{:<18} {:<9} {:>17} {:>17} {:>17} {:>20}  {}"


def entry_bound(entry: dict) -> str | None:
    """The limit an entry is read against: its own "bound", else matmul when it counts flops, else copy."""
    if "bound" in entry:
        return entry["bound"]
    return "matmul" if entry.get("flops") else ("copy" if entry.get("bytes") else None)


def op_summaries(entries) -> dict:
    """{op: {"fast", "speedups": {baseline: [(ratio, key)]}, "shares": [(share, key, bound)], "targets": [...]}}."""
    ops: dict = {}
    for e in entries:
        key = f"{e['case']}/{e['dtype']}/{e['direction']}"
        fast = e.get("fast_impl", "torch")
        s = ops.setdefault(e["op"], {"fast": fast, "speedups": {}, "shares": [], "targets": []})
        got = e["impls"].get(fast, {})
        for base in BASELINES:
            ref = e["impls"].get(base, {})
            if base != fast and got.get("status") == "ok" and ref.get("status") == "ok":
                s["speedups"].setdefault(base, []).append((ref["median_ms"] / got["median_ms"], key))
        bound = entry_bound(e)
        share = got.get(_SHARE.get(bound, "")) if got.get("status") == "ok" else None
        if share is not None:
            s["shares"].append((share, key, bound))
        s["targets"] += [{**t, "key": key} for t in e.get("targets", [])]
    return ops


def _span(pairs, fmt) -> str:
    if not pairs:
        return "-"
    values = [v for v, _ in pairs]
    return format(min(values), fmt) if len(values) == 1 else f"{min(values):{fmt}} .. {max(values):{fmt}}"


def _shares(shares) -> str:
    if not shares:
        return "-"
    names = sorted({_LIMIT_NAME[b] for _, _, b in shares})
    return f"{_span([(v, k) for v, k, _ in shares], '.0%')} {'/'.join(names)}"


def _counts(targets) -> str:
    counts = {v: sum(t["verdict"] == v for t in targets) for v in (PASS, NOISE, FAIL, NOT_APPLICABLE)}
    return ", ".join(f"{n} {v}" for v, n in counts.items() if n) or "no targets"


def summary_lines(entries) -> list:
    """The summary as lines of text (printed at the end of a run, and written into gpu-check's summary.md)."""
    ops = op_summaries(entries)
    if not ops:
        return []
    lines = [
        "summary: the fast impl's speed-up over each baseline (worst .. best over the op's cases and directions), "
        "its share of the machine limit (worst .. best), its targets",
        _COLS.format("op", "fast", "vs torch", "vs torch.compile", "vs sdpa", "share of limit", "targets"),
    ]
    for op, s in ops.items():
        sp = [_span(s["speedups"].get(b, []), ".2f") + ("x" if s["speedups"].get(b) else "") for b in BASELINES]
        lines.append(_COLS.format(op, s["fast"], *sp, _shares(s["shares"]), _counts(s["targets"])))
        for base in BASELINES:
            pairs = s["speedups"].get(base, [])
            if len(pairs) > 1:
                (lo, lo_key), (hi, hi_key) = min(pairs), max(pairs)
                lines.append(f"  vs {base}: worst {lo:.2f}x ({lo_key}), best {hi:.2f}x ({hi_key})")
        for t in s["targets"]:
            if t["verdict"] == FAIL:
                value = "did not run" if t["value"] is None else f"{t['value']:.2f}"
                lines.append(f"  FAIL {t['key']}: {t['target']} ({t['impl']}: {value})")
    return lines


def print_op_summary(entries) -> None:
    for line in summary_lines(entries):
        print(line)
