"""gpu-check's one-page summary (summary.md) and its machine-readable twin (check.json)."""

from __future__ import annotations

import glob
import json
import os

from genkern._io import write_atomic
from genkern.bench.plots import entries_of, write_pictures
from genkern.bench.summary import summary_lines


def _tail(path: str, n: int = 3) -> list:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip() for line in f.readlines()[-n:]]
    except OSError:
        return []


def _stage_rows(results) -> list:
    rows = ["| stage | status | seconds | log |", "|---|---|---|---|"]
    for r in results:
        log = os.path.join("logs", os.path.basename(r["log"])) if r.get("log") else r.get("why", "")
        rows.append(f"| {r['stage']} | {r['status']} | {r.get('seconds', '-')} | {log} |")
    return rows


def _bench_section(out: str) -> list:
    lines = []
    for path in sorted(glob.glob(os.path.join(out, "results", "*.json"))):
        with open(path) as f:
            data = json.load(f)
        pictures = write_pictures(path, data)
        head = (
            f"{data['device']['name']}: copy {data.get('copy_gbps', 0):.0f} GB/s, read "
            f"{data.get('read_gbps') or 0:.0f} GB/s ({data.get('read_probe', 'sum')}), matmul TFLOP/s "
            + ", ".join(f"{k} {v:.3g}" for k, v in (data.get("matmul_tflops") or {}).items() if v)
        )
        lines += [f"### {os.path.basename(path)}", "", head, "", "```", *summary_lines(entries_of(data)), "```"]
        lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in pictures] + [""]
    return lines or ["no results file was written", ""]


def write_summary(out: str, results, device: str, seconds: float) -> str:
    """Writes <out>/summary.md and <out>/check.json; returns the summary's path."""
    failed = [r for r in results if r["status"] != "ok"]
    verdict = "every stage passed" if not failed else f"{len(failed)} of {len(results)} stages did not pass"
    lines = [f"# genkern gpu-check on {device}: {verdict} ({seconds:.0f} s)", "", *_stage_rows(results), ""]
    for r in failed:
        if r.get("log"):
            lines += [f"{r['stage']} ({r['status']}), the end of its log:", "```", *_tail(r["log"], 8), "```", ""]
    lines += ["## Benchmarks", "", *_bench_section(out)]
    lines += ["## Profile", "", "```", *_tail(os.path.join(out, "logs", "profile.log"), 12), "```", ""]
    lines += ["## Training runs", ""]
    lines += [f"- {r['stage']}: {(_tail(r['log'], 2) or [''])[0]}" for r in results if r["stage"].startswith("train-")]
    lines.append("")
    path = os.path.join(out, "summary.md")
    write_atomic(path, "\n".join(lines))
    check = {"device": device, "seconds": round(seconds, 1), "stages": results}
    write_atomic(os.path.join(out, "check.json"), json.dumps(check, indent=1) + "\n")
    return path
