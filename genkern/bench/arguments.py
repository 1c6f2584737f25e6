"""`genkern bench` options: the parser's arguments, their checked values, and the impls they select."""

from __future__ import annotations

import math
import os
import re

import torch

from genkern.bench import COMPILE, DIRECTIONS, FAST, MIN_ROUNDS

QUICK_BUDGET_S, BUDGET_S = 0.05, 1.0
QUICK_REPEATS, REPEATS = MIN_ROUNDS, 100  # a quick run still gets enough rounds for its quartiles


def add_arguments(parser) -> None:
    """Adds the `genkern bench` options to an argparse parser."""
    parser.add_argument("--op", help="only this op (e.g. reparameterize_kl)")
    parser.add_argument("--sizes", help="comma-separated size labels, e.g. 256x64,4096x1024 (any size an op takes)")
    parser.add_argument("--quick", action="store_true", help="the smallest cases, few repeats: finishes in seconds")
    parser.add_argument(
        "--full",
        action="store_true",
        help="every listed case (the whole sweep); default: one representative case per op at its targets' sizes",
    )
    parser.add_argument("--direction", choices=DIRECTIONS, action="append", help="only these directions (repeatable)")
    parser.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available, else cpu)")
    parser.add_argument(
        "--impl",
        default="auto",
        choices=("auto", "cpp", "triton", "torch"),
        help="the fast impl to compare with plain PyTorch (auto: cpp on CPU, triton on CUDA)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"at most this many timed runs per impl (default 100; quick 10; below {MIN_ROUNDS} no target can pass)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help=f"timing seconds per case and direction, after the first {MIN_ROUNDS} rounds (default 1, quick 0.05)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch and the C++ kernels (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument(
        "--mem-limit",
        type=float,
        metavar="GIB",
        help="skip an impl estimated to need more memory than this many GiB "
        "(default: half the memory available at the start; 0: no limit)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join("bench", "results"),
        help="results directory (default bench/results, under the current directory)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 if an impl failed or a target was missed")
    parser.add_argument("--no-plots", action="store_true", help="write no pictures beside the results file")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULTS.json",
        help="compare results files (two or more) side by side: a table, and a chart written into --out; times nothing",
    )


def resolve_device(name) -> torch.device:
    """The `--device` to run on (default: cuda if available, else cpu); ValueError for one torch cannot use."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name}")
    return device


# A dimension in a size label: a number at the start or after "x", "-" or "kv" (not the 16 of "bf16"), with its sign.
_DIMENSION = re.compile(r"(?:^|(?<=[xv-]))(-?\d+)")


def size_labels(sizes) -> list | None:
    """The `--sizes` labels, or None (every size) when the option is not given.

    ValueError for a label with a dimension below 1 ("0x0", "-1x4", "...-kv0"): a case module's
    make_case may build it (an empty tensor times nothing) or, with no --op, be left out silently.
    """
    if sizes is None:
        return None
    labels = [s.strip() for s in sizes.split(",") if s.strip()]
    if not labels:
        raise ValueError(f"--sizes must name at least one size label, got {sizes!r}")
    for label in labels:
        if any(int(d) < 1 for d in _DIMENSION.findall(label.lower())):
            raise ValueError(f"--sizes: every dimension must be a positive integer, got {label!r}")
    return labels


def check_numbers(args) -> None:
    """ValueError naming the flag for a count, time or limit out of range (an argparse `type` checks only
    that it parses: "nan", "inf" and "-1" parse as floats)."""
    for flag, value in (("--threads", args.threads), ("--repeats", args.repeats)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget >= 0):
        raise ValueError(f"--budget must be a finite number of seconds >= 0, got {args.budget}")
    if args.mem_limit is not None and not (math.isfinite(args.mem_limit) and args.mem_limit >= 0):
        raise ValueError(f"--mem-limit must be a finite number of GiB >= 0 (0: no limit), got {args.mem_limit}")


def check_cases(cases) -> None:
    """ValueError for a case whose sizes are not all positive: what a make_case built from `--sizes`."""
    for case in cases:
        bad = {k: v for k, v in case.sizes.items() if isinstance(v, int) and not isinstance(v, bool) and v < 1}
        if bad:
            raise ValueError(f"--sizes: {case.op} case {case.name!r} has sizes below 1: {bad}")


def budget_s(args) -> float:
    """Timing seconds per case and direction: `--budget`, else the default of a quick or a full run."""
    return args.budget if args.budget is not None else (QUICK_BUDGET_S if args.quick else BUDGET_S)


def max_repeats(args) -> int:
    """Timed runs per impl at most: `--repeats`, else the default of a quick or a full run."""
    return args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else REPEATS)


# --- which impls run ------------------------------------------------------------------


def fast_impl(device, impl="auto") -> str:
    """The impl `--impl` names; "auto" (or FAST) is cpp on CPU and triton on CUDA."""
    if impl in (None, "auto", FAST):
        return "triton" if torch.device(device).type == "cuda" else "cpp"
    return impl


def impls_for(device, impl="auto", compile=True) -> list:
    """The impls to time, the plain-PyTorch baseline ("torch") first."""
    fast = fast_impl(device, impl)
    return ["torch"] + ([fast] if fast != "torch" else []) + ([COMPILE] if compile else [])


def case_impls(case, impls) -> list:
    """`impls` with the case's own baselines (e.g. sdpa) added before torch.compile."""
    extra = [b for b in case.baselines if b not in impls]
    at = impls.index(COMPILE) if COMPILE in impls else len(impls)
    tail = list(impls[at:]) if case.compiles else [i for i in impls[at:] if i != COMPILE]
    return list(impls[:at]) + extra + tail
