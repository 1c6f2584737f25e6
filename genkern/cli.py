"""The command line: `genkern <command>` (also `python -m genkern <command>`).

Errors are one line on stderr and a non-zero exit, never a traceback
(set GENKERN_DEBUG=1 to see the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_info(args) -> int:
    from genkern._info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"genkern {data['genkern']}  python {data['python']}  torch {data['torch']}  "
          f"triton {data['triton'] or 'not installed'}  cuda {data['cuda'] or 'none'}")
    for dev in data["devices"]:
        extra = f", {dev['capability']}, {dev['memory_gib']} GiB" if dev["type"] == "cuda" else \
            f", {dev['threads']} threads"
        print(f"device  {dev['type']}: {dev['name']}{extra}")
    print(f"default impl: {data['default_impl']} (GENKERN_IMPL)")
    for name, state in data["impls"].items():
        status = "on " if state["available"] else "off"
        detail = state.get("build", "") if state["available"] else state["reason"]
        print(f"impl  {name:7s} {status}  {detail}")
    return 0


def _cmd_bench(args) -> int:
    from genkern.bench import runner

    return runner.run(args)


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _cmd_profile(args) -> int:
    import torch

    from genkern import profiling

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    report = profiling.profile_generation(args.model, batch_sizes=args.batch, context_lengths=args.context,
                                          new_tokens=args.new_tokens, modes=modes, device=args.device,
                                          dtype=dtype, out=args.out, plot=not args.no_plot)
    print(profiling.format_table(report))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'profile.json')}" + ("" if args.no_plot else " and profile.png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genkern", description="Fast kernels for generative models.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    p = sub.add_parser("info", help="versions, devices and the state of each impl")
    p.add_argument("--json", action="store_true", help="print the info as JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="benchmark every hot path against plain PyTorch on this device")
    from genkern.bench import runner

    runner.add_arguments(p)
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("profile", help="time autoregressive generation: prefill, per-token latency, tokens/s")
    p.add_argument("--model", default="small",
                   help="a preset (tiny, small: 6 layers x 256, medium) or a TransformerLM checkpoint directory")
    p.add_argument("--batch", type=_ints, default=(1,), help="comma-separated batch sizes (default 1)")
    p.add_argument("--context", type=_ints, default=(128, 512, 1024),
                   help="comma-separated prompt lengths (default 128,512,1024)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoding steps timed per run (default 32)")
    p.add_argument("--modes", default="genkern,torch,no_cache",
                   help="genkern (KV cache, genkern's kernels), torch (KV cache, plain PyTorch), no_cache")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--out", default="profile-results", help="directory for profile.json and profile.png")
    p.add_argument("--no-plot", action="store_true", help="skip the latency plot")
    p.set_defaults(func=_cmd_profile)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("genkern: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line, not a traceback
        if os.environ.get("GENKERN_DEBUG"):
            raise
        lines = str(exc).strip().splitlines() or [""]
        print(f"genkern {args.command}: error: {type(exc).__name__}: {lines[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
