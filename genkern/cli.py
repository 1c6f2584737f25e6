"""The command line: `genkern <command>` (also `python -m genkern <command>`).

Errors are one line on stderr and a non-zero exit, never a traceback
(set GENKERN_DEBUG=1 to see the traceback). Numeric flags are checked before
anything runs: a value that cannot be used is refused naming its flag, never
replaced by a default nor left to fail deep inside.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

SEED_MAX = 2**63 - 1  # a seed is a non-negative int64 (what every torch generator takes)


def _cmd_info(args) -> int:
    from genkern._info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"genkern {data['genkern']}  python {data['python']}  torch {data['torch']}  "
        f"triton {data['triton'] or 'not installed'}  cuda {data['cuda'] or 'none'}"
    )
    for dev in data["devices"]:
        extra = (
            f", {dev['capability']}, {dev['memory_gib']} GiB"
            if dev["type"] == "cuda"
            else f", {dev['threads']} threads"
        )
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


def _cmd_gpu_check(args) -> int:
    from genkern.bench.gpu_check import run_check

    if not (math.isfinite(args.deadline) and args.deadline > 0):
        raise ValueError(f"--deadline must be a positive number of seconds, got {args.deadline}")
    return run_check(args.out, tiny=args.dry_run, build=args.build, deadline_s=args.deadline)


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _check_counts(args, flags: dict) -> None:
    """Refuses {flag: (attribute, least value)} below the least (None: not given, the default applies)."""
    for flag, (name, least) in flags.items():
        value = getattr(args, name)
        if value is not None and value < least:
            wanted = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise ValueError(f"{flag} must be {wanted}, got {value}")


def _check_seed(flag: str, value) -> None:
    if value is not None and not 0 <= value <= SEED_MAX:
        raise ValueError(f"{flag} must be an integer in 0 .. 2**63-1 ({SEED_MAX}), got {value}")


def _check_rate(flag: str, value) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a positive finite number, got {value}")


def _cmd_profile(args) -> int:
    import torch

    from genkern import profiling

    _check_counts(args, {"--new-tokens": ("new_tokens", 2)})

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    report = profiling.profile_generation(
        args.model,
        batch_sizes=args.batch,
        context_lengths=args.context,
        new_tokens=args.new_tokens,
        modes=modes,
        device=args.device,
        dtype=dtype,
        out=args.out,
        plot=not args.no_plot,
    )
    print(profiling.format_table(report))
    if args.out:
        print(f"wrote {os.path.join(args.out, 'profile.json')}" + ("" if args.no_plot else " and profile.png"))
    return 0


def _impl(text: str) -> str:
    """An --impl value, checked where every impl name is (genkern._dispatch.check_impl)."""
    from genkern._dispatch import check_impl

    try:
        return check_impl(text, "--impl")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_impl_argument(p) -> None:
    from genkern._dispatch import IMPLS

    p.add_argument("--impl", type=_impl, metavar="{" + ",".join(IMPLS) + "}", help="kernels the model uses")


def _setting(text: str) -> tuple:
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true/false, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _cmd_train(args) -> int:
    from genkern.train.trainer import train

    if args.out is None and args.resume is None:
        raise ValueError("--out DIR is required for a new run (or --resume DIR to continue one)")
    counts = ("steps", "batch_size", "eval_every", "ckpt_every", "log_every")
    _check_counts(args, {"--" + name.replace("_", "-"): (name, 1) for name in counts})
    _check_rate("--lr", args.lr)
    _check_seed("--seed", args.seed)
    model = dict(args.set) if args.set else None
    result = train(
        args.family,
        data=args.data,
        steps=args.steps,
        out=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        model=model,
        impl=args.impl,
        device=args.device,
        resume=args.resume,
        eval_every=args.eval_every,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        progress=not args.quiet,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        final = result.summary.get("final", {})
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in final.items())
        print(f"{args.family}: step {result.step}, {shown}")
        if result.out is not None:
            print(f"wrote {result.out}")
    return 0


def _cmd_sample(args) -> int:
    import torch

    from genkern.train.trainer import load_trained

    _check_counts(args, {"-n": ("n", 1)})
    _check_seed("--seed", args.seed)
    if not args.out.lower().endswith((".png", ".txt")):
        raise ValueError(f"--out must name a .png file (or a .txt file for a text model), got {args.out!r}")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out: directory {parent!r} does not exist")
    model, fam, meta = load_trained(args.checkpoint, device=args.device, impl=args.impl)
    is_text = meta["config"].get("data", {}).get("name") == "text"
    if args.out.lower().endswith(".txt") and not is_text:
        raise ValueError(f"--out must name a .png file for a model trained on images or points, got {args.out!r}")
    samples = fam.samples(model, args.n, torch.Generator().manual_seed(args.seed))
    # A text model writes decoded text: to a .txt --out as given, else beside the .png name.
    written = fam.plot(samples, None, args.out, title=f"{fam.name}, step {meta['step']}") or args.out
    print(f"wrote {written} ({args.n} samples of the {fam.name} at step {meta['step']})")
    return 0


def _add_train_parser(sub) -> None:
    from genkern.train.families import FAMILY_NAMES

    p = sub.add_parser("train", help="train a model family (VAE, GAN, ...) with checkpoints and logs")
    p.add_argument("family", choices=FAMILY_NAMES, help="the model family")
    p.add_argument(
        "--data", help="digits (default), ring (2-D points) or text (language models); on --resume, the run's own data"
    )
    p.add_argument("--steps", type=int, help="total optimizer steps (a resumed run continues up to it)")
    p.add_argument("--out", help="run directory (new or empty) for checkpoints, logs and sample grids")
    p.add_argument("--resume", help="a run directory to continue from its latest checkpoint")
    p.add_argument("--seed", type=int, help="initialisation, data order and noise: 0 .. 2**63-1 (default 0)")
    p.add_argument("--batch-size", type=int, help="global batch size (split across torchrun processes)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the family's)")
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        metavar="KEY=VALUE",
        help="a model config setting, e.g. --set latent_dim=8 (repeatable)",
    )
    _add_impl_argument(p)
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--eval-every", type=int, default=500, help="steps between evaluations (default 500)")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints (default 500)")
    p.add_argument("--log-every", type=int, default=50, help="steps between log rows (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("sample", help="draw samples from a trained checkpoint into a PNG grid")
    p.add_argument("--checkpoint", required=True, help="a run directory or one of its checkpoints")
    p.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument(
        "--out",
        default="samples.png",
        help="the PNG to write (default samples.png); a text "
        "model writes text, to this name with .txt for .png, or to a .txt name",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed: 0 .. 2**63-1 (default 0)")
    _add_impl_argument(p)
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.set_defaults(func=_cmd_sample)


def _cmd_compare(args) -> int:
    from genkern.compare import compare

    _check_counts(args, {"--seeds": ("seeds", 1), "--steps": ("steps", 1), "--threads": ("threads", 1)})
    compare(
        quick=args.quick,
        large=True if args.large else None,
        out=args.out,
        seeds=args.seeds,
        steps=args.steps,
        device=args.device,
        threads=args.threads,
        progress=True,
    )
    print(f"wrote {os.path.join(args.out, 'compare.json')} and samples.png")
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
    p = sub.add_parser("gpu-check", help="build, test, benchmark, profile and train on a GPU into one folder")
    p.add_argument("--out", default="gpu-check-results", help="the folder for logs, results, pictures, summary.md")
    p.add_argument("--build", action="store_true", help="build genkern first (`make setup`)")
    p.add_argument(
        "--dry-run", action="store_true", help="every stage at tiny sizes on the CPU (TRITON_INTERPRET=1): seconds"
    )
    p.add_argument("--deadline", type=float, default=480, help="start no stage after this many seconds (default 480)")
    p.set_defaults(func=_cmd_gpu_check)
    p = sub.add_parser("profile", help="time autoregressive generation: prefill, per-token latency, tokens/s")
    p.add_argument(
        "--model",
        default="small",
        help="a preset (tiny, small: 6 layers x 256, medium), a TransformerLM checkpoint directory "
        "or a `genkern train transformer` run directory",
    )
    p.add_argument("--batch", type=_ints, default=(1,), help="comma-separated batch sizes (default 1)")
    p.add_argument(
        "--context", type=_ints, default=(128, 512, 1024), help="comma-separated prompt lengths (default 128,512,1024)"
    )
    p.add_argument("--new-tokens", type=int, default=32, help="decoding steps timed per run (default 32)")
    p.add_argument(
        "--modes",
        default="genkern,torch,no_cache",
        help="genkern (KV cache, genkern's kernels), torch (a cached loop on torch's SDPA), no_cache (SDPA)",
    )
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--out", default="profile-results", help="directory for profile.json and profile.png")
    p.add_argument("--no-plot", action="store_true", help="skip the latency plot")
    p.set_defaults(func=_cmd_profile)
    _add_train_parser(sub)
    p = sub.add_parser("compare", help="VAE vs GAN vs Transformer on the digits under one training budget")
    p.add_argument("--quick", action="store_true", help="2 seeds x 80 steps: well under a minute on a CPU")
    p.add_argument("--large", action="store_true", help="bigger models and budget (the default on CUDA)")
    p.add_argument(
        "--out", default="compare-results", help="directory for compare.json and samples.png (default compare-results)"
    )
    p.add_argument("--seeds", type=int, help="number of seeds per family (default 3, --quick 2)")
    p.add_argument("--steps", type=int, help="optimizer steps per run, the same for every family")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default 1 on a CPU device: small models)")
    p.set_defaults(func=_cmd_compare)
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
