"""`genkern bench` options: the parser's arguments, their checked values, and the impls they select."""

from __future__ import annotations

import os

import torch

from genkern.bench import COMPILE, DIRECTIONS, FAST, MIN_ROUNDS

QUICK_BUDGET_S, BUDGET_S = 0.05, 1.0
QUICK_REPEATS, REPEATS = MIN_ROUNDS, 100  # a quick run still gets enough rounds for its quartiles


def add_arguments(parser) -> None:
    """Adds the `genkern bench` options to an argparse parser."""
    parser.add_argument("--op", help="only this op (e.g. reparameterize_kl)")
    parser.add_argument("--sizes", help="comma-separated size labels, e.g. 256x64,4096x1024 (any size an op takes)")
    parser.add_argument("--quick", action="store_true", help="the smallest cases, few repeats: finishes in seconds")
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


def resolve_device(name) -> torch.device:
    """The `--device` to run on (default: cuda if available, else cpu); ValueError for one torch cannot use."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name}")
    return device


def size_labels(sizes) -> list | None:
    """The `--sizes` labels, or None (every size) when the option is not given."""
    return [s.strip() for s in sizes.split(",") if s.strip()] if sizes else None


def check_numbers(args) -> None:
    """ValueError for a count or limit out of range (an argparse `type` checks only that it parses)."""
    if any(n is not None and n < 1 for n in (args.threads, args.repeats)):
        raise ValueError("--threads and --repeats must be >= 1")
    if args.mem_limit is not None and args.mem_limit < 0:
        raise ValueError("--mem-limit must be >= 0")


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
