"""The report of `genkern compare`: each family's runs aggregated over seeds, the environment,
the files (compare.json, samples.png) and the text table.

Everything here reads the plain dicts of the report, so the table renders from compare.json alone.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import torch

LOSS_KEY = {"vae": "loss", "gan": "d_loss", "transformer": "loss"}  # the final training loss reported
LOSS_MEANING = {
    "vae": "negative ELBO, nats per image",
    "gan": "discriminator loss",
    "transformer": "cross-entropy, nats per pixel",
}


def stats(values) -> dict | None:
    """mean, std over seeds (ddof=1; 0 for a single seed), min, max; None when nothing to aggregate."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def aggregate(fam: str, runs: list) -> dict:
    """One family's runs summarised over seeds; diverged runs count against stability only."""
    ok = [r for r in runs if not r["diverged"]]
    liks = [r["likelihood"] for r in ok]
    first = liks[0] if liks else {"kind": None, "note": "every run diverged", "num_samples": None}
    likelihood = {
        "kind": first["kind"],
        "note": first["note"],
        "num_samples": first.get("num_samples"),
        "bits_per_dim": stats(v["bits_per_dim"] for v in liks),
    }
    if first["kind"] == "bound":
        likelihood["elbo_bits_per_dim"] = stats(v["elbo_bits_per_dim"] for v in liks)
        likelihood["iw_bits_per_dim"] = stats(v["iw_bits_per_dim"] for v in liks)
    frechet = stats(r["frechet"] for r in ok)
    final_loss = stats(r["final_loss"] for r in ok)
    return {
        "likelihood": likelihood,
        "frechet": frechet,
        "classes_covered": stats(r["classes_covered"] for r in ok),
        "confidence": stats(r["confidence"] for r in ok),
        "train_s": stats(r["train_s"] for r in ok),
        "wall_s": stats(r["wall_s"] for r in ok),
        "steps_per_s": stats(r["steps_per_s"] for r in ok),
        "samples_per_s": stats(r["samples_per_s"] for r in ok),
        "stability": {
            "final_loss_name": f"{LOSS_KEY[fam]} ({LOSS_MEANING[fam]})",
            "final_loss": final_loss,
            "frechet": frechet,
            "diverged": len(runs) - len(ok),
            "runs": len(runs),
        },
        "runs": runs,
    }


def environment(dev: torch.device) -> dict:
    """Versions and hardware the numbers were measured on."""
    import genkern

    env = {
        "genkern": genkern.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if dev.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(dev)
    return env


def write_report(out: Path, report: dict, panels: dict) -> None:
    """compare.json, and samples.png: one panel of samples per family (and one of the data), side by side."""
    from genkern._io import write_atomic
    from genkern.train.plots import side_by_side

    write_atomic(out / "compare.json", json.dumps(report, indent=1) + "\n")
    s = report["settings"]
    side_by_side(
        panels,
        out / "samples.png",
        title=f"digits, {s['steps']} steps x batch {s['batch_size']} for each family (first seed)",
    )


def _fmt(stat, spec: str = ".3g", spread: bool = False) -> str:
    if stat is None:
        return "-"
    text = format(stat["mean"], spec)
    return f"{text} ±{format(stat['std'], spec)}" if spread and stat["n"] > 1 else text


def format_table(report: dict) -> str:
    """The report as a text table: one row per family, then the data's own reference row."""
    s = report["settings"]
    head = (
        f"{len(s['seeds'])} seeds x {s['steps']} steps x batch {s['batch_size']} for every family "
        f"on digits ({s['device']}); mean ±std over seeds"
    )
    cols = (
        "family",
        "bits/dim",
        "Frechet",
        "classes",
        "conf",
        "train s",
        "steps/s",
        "samples/s",
        "final loss",
        "diverged",
    )
    rows = []
    for fam, r in report["families"].items():
        lik = r["likelihood"]
        if lik["kind"] == "exact":
            bpd = f"{_fmt(lik['bits_per_dim'], '.3f')} exact"
        elif lik["kind"] == "bound":
            bpd = f"<={_fmt(lik['iw_bits_per_dim'], '.3f')} (elbo {_fmt(lik['elbo_bits_per_dim'], '.3f')})"
        else:
            bpd = "none (implicit)" if "implicit" in lik["note"] else "-"
        st = r["stability"]
        rows.append(
            (
                fam,
                bpd,
                _fmt(r["frechet"], ".3g", True),
                _fmt(r["classes_covered"], ".1f"),
                _fmt(r["confidence"], ".2f"),
                _fmt(r["train_s"], ".1f"),
                _fmt(r["steps_per_s"], ".3g"),
                _fmt(r["samples_per_s"], ".3g"),
                f"{_fmt(st['final_loss'], '.3g', True)} {LOSS_KEY[fam]}",
                f"{st['diverged']}/{st['runs']}",
            )
        )
    ref = report["reference"]
    rows.append(
        (
            "data (test)",
            "-",
            f"{ref['frechet']:.3g}",
            f"{ref['classes_covered']:.1f}",
            f"{ref['confidence']:.2f}",
            "-",
            "-",
            "-",
            "-",
            "-",
        )
    )
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = lambda row: "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()  # noqa: E731
    lik_notes = [f"  {f}: {r['likelihood']['note']}" for f, r in report["families"].items()]
    return "\n".join(
        [
            head,
            line(cols),
            line(["-" * w for w in widths]),
            *map(line, rows),
            "bits/dim (test digits):",
            *lik_notes,
            f"data (test): {ref['note']}",
            f"total {report['wall_s']:.0f} s",
        ]
    )
