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
