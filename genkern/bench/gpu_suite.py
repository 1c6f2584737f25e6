"""What `genkern gpu-check` runs: the GPU benchmark suite, the tests, the profile and the training runs.

The benchmark suite answers a GPU buyer's questions, against the device's measured copy
bandwidth and bf16 matmul rate (every results file's header):

- attention: bfloat16 and float16, D 64 and 128, causal and full, T 1k .. 16k at 16k tokens
  per batch, forward and backward, against SDPA (FlashAttention backend), TFLOP/s
  (genkern.bench.attention's CUDA cases); no torch.compile (40 shapes of compiles).
- decode: bfloat16, batch 1 .. 64, cache 1k .. 64k, grouped-query, against SDPA over the cache,
  HBM GB/s (genkern.bench.kv_decode's CUDA cases).
- reparameterize_kl and the GAN losses at 1M .. 64M elements, fwd+bwd (their targets' direction),
  % of copy bandwidth and against torch.compile.

Timing is short (10 rounds, then 0.05 s per entry): on a GPU the spread is small, and the run
must fit in minutes. A tiny variant of every stage runs on the CPU for the dry run.
"""

from __future__ import annotations

from genkern.bench import attention as attention_cases
from genkern.bench import gan_loss, kv_decode, listed_cases, reparam_kl

TIMING = ["--budget", "0.05", "--repeats", "30"]
TINY_TIMING = ["--quick", "--budget", "0", "--repeats", "2", "--no-compile", "--impl", "triton"]
GAN_VARIANTS = ("d-nonsaturating", "d-hinge", "g-nonsaturating")


def _cuda_only(module) -> list:
    return [c.name for c in listed_cases(module) if c.devices == ("cuda",)]


def suite_labels() -> dict:
    """{stage: (op, size labels)}: the GPU suite's cases, by the name they are listed under."""
    gan = [f"{v}-{1 << 20}x1" for v in GAN_VARIANTS] + [c.name for c in gan_loss.GPU_CASES]
    return {
        "bench-attention": ("attention", _cuda_only(attention_cases)),
        "bench-decode": ("kv_decode", _cuda_only(kv_decode)),
        "bench-reparam": ("reparameterize_kl", ["65536x512"] + [c.name for c in reparam_kl.GPU_CASES]),
        "bench-gan": ("gan_loss", gan),
    }


# The dry run: one tiny case per stage (every impl, on CPU tensors through the Triton interpreter).
_TINY = {
    "bench-attention": ["1x2x16x16-causal"],
    "bench-decode": ["1x2x32x16-kv1"],
    "bench-reparam": ["4x8"],
    "bench-gan": ["d-nonsaturating-8x1"],
}
_DIRECTIONS = {
    "bench-attention": ["fwd", "bwd"],
    "bench-decode": ["fwd"],
    "bench-reparam": ["fwd+bwd"],
    "bench-gan": ["fwd+bwd"],
}
# Timeouts (s) on an H100, about twice the expected time (the note in bench/README.md says why).
_TIMEOUTS = {"bench-attention": 240, "bench-decode": 90, "bench-reparam": 90, "bench-gan": 120}


def bench_stages(device: str, tiny: bool) -> list:
    """[(stage name, `genkern bench` arguments, timeout s)] of the suite (tiny: the dry run's)."""
    stages = []
    for name, (op, labels) in suite_labels().items():
        labels = _TINY[name] if tiny else labels
        args = ["--device", device, "--op", op, "--sizes", ",".join(labels)]
        args += [a for d in _DIRECTIONS[name] for a in ("--direction", d)]
        if name in ("bench-attention", "bench-decode"):
            args.append("--no-compile")
        stages.append((name, args + (TINY_TIMING if tiny else TIMING), _TIMEOUTS[name]))
    return stages


def test_args(tiny: bool) -> list:
    """pytest arguments: every test marked gpu and every Triton test (on a GPU they run on CUDA tensors)."""
    if tiny:
        return ["tests/test_kv_decode_triton.py", "-q", "-p", "no:cacheprovider", "-k", "gpu or sees_nothing"]
    return ["tests/", "-q", "-p", "no:cacheprovider", "-k", "gpu or triton", "--maxfail", "20"]


def profile_args(device: str, tiny: bool) -> list:
    if tiny:
        return ["--device", device, "--model", "tiny", "--context", "8", "--new-tokens", "2", "--no-plot"]
    return ["--device", device, "--model", "small", "--batch", "1,8", "--context", "512,2048", "--dtype", "bfloat16"]


def train_runs(device: str, tiny: bool) -> list:
    """[(family, `genkern train` arguments)]: a short run of each model family."""
    from genkern.train.families import FAMILY_NAMES

    steps = 2 if tiny else 200
    every = ["--eval-every", str(steps), "--ckpt-every", str(steps), "--log-every", str(max(1, steps // 10))]
    batch = ["--batch-size", "8"] if tiny else []
    return [(f, ["--device", device, "--steps", str(steps), "--quiet", *batch, *every]) for f in FAMILY_NAMES]
