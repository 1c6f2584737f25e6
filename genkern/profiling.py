"""Profiling autoregressive generation: prefill time, per-token latency, tokens/s, KV-cache bytes.

`profile_generation` (and `genkern profile`) times a TransformerLM three ways at each
batch size and context length:

    genkern    the KV cache with genkern's kernels (impl "auto": C++ on CPU, Triton on CUDA)
    torch      a plain cached loop in PyTorch: the new keys/values stored in the preallocated
               cache by slice copy, then torch's SDPA over the filled part
               (genkern.bench.baseline_models: what a PyTorch user writes, not genkern's spec)
    no_cache   the whole context through the model with attention on torch's SDPA
               (is_causal=True), for every token

The three run the same weights and the same code around the attention (embeddings, norms,
MLPs, projections); only the attention step and the cache differ.

A context length C means a prompt of C tokens, then `new_tokens` decoding steps.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from genkern._io import atomic_path, write_atomic
from genkern.bench.baseline_models import PlainKVCache, plain_sdpa
from genkern.generation import decode_one_token, prefill, sample_next
from genkern.models.transformer import ModelArgs, TransformerLM
from genkern.nn.attention import CausalAttention

PRESETS = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=4096),
    "small": dict(vocab_size=256, dim=256, n_layers=6, n_heads=8, max_seq_len=8192),
    "medium": dict(vocab_size=1024, dim=512, n_layers=12, n_heads=8, n_kv_heads=2, max_seq_len=16384),
}
MODES = ("genkern", "torch", "no_cache")
_IMPL = {"genkern": "auto", "torch": "torch", "no_cache": "torch"}
LABELS = {  # each mode's name (as in --modes and profile.json) and what it runs, for tables and plots
    "genkern": "genkern (KV cache)",
    "torch": "torch (cached SDPA)",
    "no_cache": "no_cache (SDPA)",
}


def load_model(model, device=None, dtype=torch.float32) -> TransformerLM:
    """A TransformerLM from a preset name, a checkpoint directory (config.json with the
    model's ModelArgs under "args", weights in model.safetensors), a `genkern train
    transformer` run directory or checkpoint, or a model itself."""
    if isinstance(model, TransformerLM):
        return model.to(device=device, dtype=dtype).eval()
    if isinstance(model, str) and model in PRESETS:
        torch.manual_seed(0)  # random weights: timing does not depend on them
        return TransformerLM(ModelArgs(**PRESETS[model])).to(device=device, dtype=dtype).eval()
    path = Path(str(model))
    if not path.is_dir():
        raise ValueError(f"model must be one of {', '.join(PRESETS)} or a checkpoint directory, got {model!r}")
    if (path / "latest.json").is_file() or _is_training_checkpoint(path):
        return _from_training_run(path, device, dtype)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config = json.loads((path / "config.json").read_text())
        net = TransformerLM(ModelArgs(**config["args"]))
        net.load_state_dict(load_file(str(path / "model.safetensors")))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ValueError(f"{path} is not a readable TransformerLM checkpoint: {exc}") from exc
    return net.to(device=device, dtype=dtype).eval()


def _is_training_checkpoint(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("format") == "genkern-checkpoint"
    except (OSError, ValueError, AttributeError):
        return False


def _from_training_run(path: Path, device, dtype) -> TransformerLM:
    """The TransformerLM of a `genkern train transformer` run directory or checkpoint."""
    from genkern.train.trainer import load_trained

    net, fam, _ = load_trained(path, device="cpu")
    if not isinstance(net, TransformerLM):
        raise ValueError(f"{path} holds a {fam.name} model, not a TransformerLM")
    return net.to(device=device, dtype=dtype).eval()


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


class _Timer:
    """Adds up the wall time between start() and stop() (synchronising CUDA at both ends)."""

    def __init__(self, device):
        self.device, self.total = device, 0.0

    def start(self, *hook_args):
        _sync(self.device)
        self.t0 = time.perf_counter()

    def stop(self, *hook_args):
        _sync(self.device)
        self.total += time.perf_counter() - self.t0


def _attention_share(model, step, device) -> float:
    """Fraction of one step's time spent in the model's attention calls (its CausalAttention
    modules, timed by forward hooks: the projections around them are not counted)."""
    timer = _Timer(device)
    handles = []
    for m in model.modules():
        if isinstance(m, CausalAttention):
            handles += [m.register_forward_pre_hook(timer.start), m.register_forward_hook(timer.stop)]
    try:
        _, total = _timed(step, device)
    finally:
        for h in handles:
            h.remove()
    return min(1.0, timer.total / total) if total > 0 else float("nan")


def _run_cached(model, ids, new_tokens, device, plain=False):
    """genkern's cached loop, or (plain) the plain cached loop: PlainSDPAAttention on a PlainKVCache."""
    b = ids.shape[0]
    lengths = torch.full((b,), ids.shape[1], device=ids.device)
    size = ids.shape[1] + new_tokens + 2
    cache = PlainKVCache.for_model(model, b, size) if plain else model.new_cache(b, size)
    logits, prefill_s = _timed(lambda: prefill(model, ids, lengths, cache), device)
    tok = sample_next(logits, do_sample=False)
    latencies = []
    for _ in range(new_tokens):
        logits, dt = _timed(lambda: decode_one_token(model, tok, cache), device)
        tok = sample_next(logits, do_sample=False)
        latencies.append(dt)
    share = _attention_share(model, lambda: decode_one_token(model, tok, cache), device)
    return prefill_s, latencies, share, cache.nbytes


def _run_no_cache(model, ids, new_tokens, device):
    tokens = ids
    latencies, prefill_s = [], None
    for _ in range(new_tokens + 1):
        logits, dt = _timed(lambda: model(tokens)[:, -1], device)
        if prefill_s is None:
            prefill_s = dt  # the first step is the prompt's forward
        else:
            latencies.append(dt)
        tokens = torch.cat([tokens, sample_next(logits, do_sample=False)[:, None]], dim=1)
    share = _attention_share(model, lambda: model(tokens), device)
    return prefill_s, latencies, share, 0


@torch.inference_mode()
def profile_one(model, mode, batch, context, new_tokens, device) -> dict:
    """One (mode, batch size, context length) measurement; the model's attention modules are
    PlainSDPAAttention during the "torch" and "no_cache" runs, and its own again afterwards."""
    model.args.impl = _IMPL[mode]
    gen = torch.Generator().manual_seed(batch * 100003 + context)
    ids = torch.randint(0, model.args.vocab_size, (batch, context), generator=gen).to(device)
    run = _run_no_cache if mode == "no_cache" else partial(_run_cached, plain=mode == "torch")
    with plain_sdpa(model) if mode != "genkern" else nullcontext():
        run(model, ids[:, : min(context, 8)], 2, device)  # warm-up (kernel builds, allocator)
        prefill_s, lat, share, kv_bytes = run(model, ids, new_tokens, device)
    lat_ms = sorted(t * 1e3 for t in lat)
    med = statistics.median(lat_ms)
    return {
        "mode": mode,
        "batch": batch,
        "context": context,
        "new_tokens": new_tokens,
        "prefill_ms": prefill_s * 1e3,
        "decode_ms_median": med,
        "decode_ms_p90": lat_ms[min(len(lat_ms) - 1, int(0.9 * len(lat_ms)))],
        "tokens_per_s": batch / (med / 1e3),
        "kv_cache_bytes": kv_bytes,
        "attention_share": share,
    }


def profile_generation(
    model="small",
    *,
    batch_sizes=(1,),
    context_lengths=(256, 1024),
    new_tokens=32,
    modes=MODES,
    device=None,
    dtype=torch.float32,
    out=None,
    plot=True,
    progress=True,
) -> dict:
    """Times generation (see the module docstring); returns the report, and with `out`
    writes profile.json (and profile.png: per-token latency against context length)."""
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
    for name, values in (("batch_sizes", batch_sizes), ("context_lengths", context_lengths)):
        if not values or any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name} must be positive ints, got {list(values)}")
    if not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int >= 2, got {new_tokens!r}")
    device = _check_device(device)
    net = load_model(model, device, dtype)
    longest = max(context_lengths) + new_tokens + 2
    if longest > net.args.max_seq_len:
        raise ValueError(
            f"context {max(context_lengths)} + {new_tokens} new tokens exceeds the model's "
            f"max_seq_len {net.args.max_seq_len}"
        )
    runs = [(m, b, c) for b in batch_sizes for c in context_lengths for m in modes]
    from tqdm.auto import tqdm

    rows = []
    impl_before = net.args.impl
    try:
        for m, b, c in tqdm(runs, desc="profile", disable=not progress):
            rows.append(profile_one(net, m, b, c, new_tokens, device))
    finally:
        net.args.impl = impl_before
    report = {
        "model": {k: v for k, v in vars(net.args).items()},
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "rows": rows,
        "speedups": _speedups(rows),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "profile.json", json.dumps(report, indent=2) + "\n")
        if plot:
            plot_latency(rows, out / "profile.png")
    return report


def _check_device(device) -> torch.device:
    """`device` (default: cuda if available, else cpu), refused with one clear line where it cannot run:
    an unknown device, cuda without a CUDA device (torch's own answer is an AssertionError from deep
    inside), a CUDA index past the last device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:  # torch's message lists every device type it knows
        raise ValueError(f"device must be cpu or cuda (cuda:N), got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda (cuda:N), got {str(device)!r}")
    return device


def _speedups(rows) -> list:
    """genkern's tokens/s over the plain cached loop's and over no cache's, per (batch, context)."""
    by = {(r["mode"], r["batch"], r["context"]): r["tokens_per_s"] for r in rows}
    out = []
    for (mode, b, c), tps in by.items():
        if mode != "genkern":
            continue
        row = {"batch": b, "context": c}
        for base in ("torch", "no_cache"):
            if (base, b, c) in by:
                row[f"vs_{base}"] = tps / by[(base, b, c)]
        out.append(row)
    return out


def plot_latency(rows, path):
    """Per-token decode latency (median) against context length, one line per mode and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key in sorted({(r["mode"], r["batch"]) for r in rows}):
        pts = sorted((r["context"], r["decode_ms_median"]) for r in rows if (r["mode"], r["batch"]) == key)
        ax.plot(*zip(*pts), marker="o", label=f"{LABELS[key[0]]}, batch {key[1]}")
    ax.set(
        xlabel="context length (tokens)",
        ylabel="per-token latency (ms, median)",
        xscale="log",
        yscale="log",
        title="decode latency",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)


def format_table(report) -> str:
    """The rows as a text table, each mode named by what it runs (LABELS), then genkern's speed-ups."""
    lines = [
        f"{'mode':20s} {'batch':>5s} {'context':>7s} {'prefill ms':>10s} {'decode ms':>9s} {'p90 ms':>7s} "
        f"{'tokens/s':>9s} {'KV MiB':>7s} {'attn %':>6s}"
    ]
    for r in report["rows"]:
        lines.append(
            f"{LABELS[r['mode']]:20s} {r['batch']:5d} {r['context']:7d} {r['prefill_ms']:10.2f} "
            f"{r['decode_ms_median']:9.3f} {r['decode_ms_p90']:7.3f} {r['tokens_per_s']:9.1f} "
            f"{r['kv_cache_bytes'] / 2**20:7.1f} {100 * r['attention_share']:6.1f}"
        )
    for s in report["speedups"]:
        parts = [f"{s[k]:.2f}x vs {LABELS[k[3:]]}" for k in ("vs_torch", "vs_no_cache") if k in s]
        lines.append(f"genkern tokens/s at batch {s['batch']}, context {s['context']}: {', '.join(parts)}")
    return "\n".join(lines)
