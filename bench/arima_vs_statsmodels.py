"""ARIMA fit time against statsmodels on the real series statsmodels bundles: prints a table.

Each fit is timed in this one process, single-threaded (BLAS threads pinned to 1 before numpy loads),
as the median CPU time of ``--repeats`` runs for both libraries, so the ratio is not skewed by other
load on the machine. The default grid is p, q <= 2, d <= 2 on seven series (189 fits) plus the high orders
that were slowest; ``--slow`` prints only the fits whose ratio is above ``--over``.

    python bench/arima_vs_statsmodels.py                      # the whole grid, a few minutes
    python bench/arima_vs_statsmodels.py --cases infl:4,1,4 nile:8,1,8 --repeats 5
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the series as the tests read them
from arima_series import SERIES, load_series  # noqa: E402

HIGH_ORDERS = [
    ("infl", (4, 1, 4)),
    ("realgdp", (1, 1, 2)),
    ("nile", (0, 2, 2)),
    ("nile", (8, 1, 8)),
    ("unemp", (6, 0, 6)),
]


def median_seconds(fit, repeats: int):
    """Median wall time of ``fit()`` over repeats, and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.process_time()
        out = fit()
        times.append(time.process_time() - start)
    return statistics.median(times), out


def compare(y: np.ndarray, order, repeats: int):
    """(genkern seconds, statsmodels seconds, genkern llf, statsmodels llf) for one fit."""
    from statsmodels.tsa.arima.model import ARIMA as SM

    from genkern.models.arima import ARIMA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_s, ours = median_seconds(lambda: ARIMA(order).fit(y), repeats)
        ref_s, ref = median_seconds(lambda: SM(y, order=order).fit(), repeats)
    return ours_s, ref_s, ours.llf, ref.llf


def parse_case(text: str):
    name, order = text.split(":")
    return name, tuple(int(v) for v in order.split(","))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", type=parse_case, help="name:p,d,q ... (default: the grid + high orders)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow", action="store_true", help="print only fits with ratio above --over")
    parser.add_argument("--over", type=float, default=2.0)
    args = parser.parse_args(argv)
    cases = (
        args.cases
        or [(name, order) for name in SERIES for order in itertools.product(range(3), range(3), range(3))] + HIGH_ORDERS
    )
    data = {name: load_series(name) for name in {name for name, _ in cases}}
    print(f"{'series':9} {'order':10} {'genkern s':>10} {'statsm. s':>10} {'ratio':>6} {'llf diff':>10}")
    total_ours = total_ref = 0.0
    over = []
    for name, order in cases:
        ours_s, ref_s, llf, ref_llf = compare(data[name], order, args.repeats)
        total_ours, total_ref = total_ours + ours_s, total_ref + ref_s
        ratio = ours_s / ref_s
        if ratio > args.over:
            over.append((name, order, ratio))
        if not args.slow or ratio > args.over:
            print(
                f"{name:9} {str(order):10} {ours_s:10.3f} {ref_s:10.3f} {ratio:6.2f} {llf - ref_llf:10.3g}", flush=True
            )
    totals = f"total: genkern {total_ours:.2f} s, statsmodels {total_ref:.2f} s"
    print(f"{totals}, {len(over)} of {len(cases)} over {args.over}x")
    for name, order, ratio in over:
        print(f"  over: {name} {order} {ratio:.2f}x")


if __name__ == "__main__":
    main()
