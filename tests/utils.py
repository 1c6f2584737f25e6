"""Shared test helpers: which impls run where, tolerances, input makers, comparisons.

The math lives in genkern.reference (imported, never copied here).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zlib

import pytest
import torch

import genkern
from genkern import _dispatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)

# --- which impl runs on which device, in which dtypes ----------------------------------


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def impl_device(impl: str) -> torch.device:
    """Triton runs on the GPU when there is one, else on CPU tensors under the interpreter."""
    if impl == "triton" and HAS_CUDA:
        return torch.device("cuda")
    return torch.device("cpu")


def impl_dtypes(impl: str) -> tuple:
    if impl == "triton":
        # No float64 in the Triton kernels; the interpreter mishandles bfloat16.
        return (torch.float32, torch.float16, torch.bfloat16) if HAS_CUDA else (torch.float32, torch.float16)
    return ALL_DTYPES


IMPLS = ("torch", "cpp", "triton")
KERNEL_IMPLS = ("cpp", "triton")  # the impls that draw the counter-based noise themselves


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def impl_dtype_params(impls=IMPLS, dtypes=None):
    """pytest params (impl, dtype) for every dtype each impl supports (optionally restricted)."""
    out = []
    for impl in impls:
        for dt in impl_dtypes(impl):
            if dtypes is None or dt in dtypes:
                out.append(pytest.param(impl, dt, id=f"{impl}-{_dtype_id(dt)}"))
    return out


def require_impl(impl: str) -> None:
    """Fails (not skips) when an impl that should run here cannot; see tests/conftest.py."""
    if impl == "torch":
        return
    state = genkern.info()["impls"][impl]
    if state["available"]:
        return
    allow_no_cpp = os.environ.get("GENKERN_ALLOW_NO_CPP", "") == "1"
    if impl == "cpp":
        if allow_no_cpp:
            pytest.skip(f"cpp impl unavailable (allowed by GENKERN_ALLOW_NO_CPP=1): {state['reason']}")
        pytest.fail(f"cpp impl unavailable: {state['reason']} (set GENKERN_ALLOW_NO_CPP=1 to skip instead)")
    if impl == "triton" and not triton_installed():
        pytest.skip("triton is not installed")
    if impl == "triton" and allow_no_cpp and not genkern.info()["impls"]["cpp"]["available"]:
        # The Triton ops' schemas live in genkern._C: no C++ build, no Triton ops either.
        pytest.skip(f"triton impl unavailable without genkern._C (GENKERN_ALLOW_NO_CPP=1): {state['reason']}")
    pytest.fail(f"{impl} impl unavailable: {state['reason']}")


# --- tolerances and comparisons --------------------------------------------------------

# Floor of the low-precision rule, relative to max(1, max |reference|). float32/float64
# allow a reordered sum over D (kernels accumulate in a different order than torch.sum).
FLOOR = {torch.float64: 1e-11, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# The kernels' noise (cpp, triton; every dtype: float64 widens the float32 noise) and
# reference.philox_normal compute Box-Muller in float32 from the same Philox words, with
# different log/sqrt/cos/sin implementations. Measured max |kernel noise - philox_normal|:
# 1.07e-6 over every draw of the tests that use NOISE_ATOL (test_reparam_kl.py,
# test_latent.py; cpp float32/float64 and the Triton interpreter, 145k draws) and 1.9e-6 over
# 4M cpp draws. The bound is ~4.7x the first. Real noise bugs (wrong counter, key, word
# order or pairing) give O(1) differences in most elements.
NOISE_ATOL = 5e-6

# float32/float64 results must also be this close (relative to max(1, max |reference|)),
# whatever plain PyTorch does (the 2x rule alone passes an impl as far off as plain PyTorch).
ABS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# The spec (genkern.reference, impl="torch") against independently written float64 formulas,
# as (rel, floor): |out - formula| <= rel * |formula| + floor * max(1, max |formula|).
# float64 (~45 ulps) and float32 (~34 ulps): rounding of the terms and their sums.
# float16/bfloat16 are computed in float32 and rounded to the dtype once: one ulp (eps) of
# each value; the floor covers values near zero left by a float32 sum that cancels.
# Measured worst error / allowed: float64 0.02, float32 0.5, float16/bfloat16 0.33.
SPEC_TOL = {
    torch.float64: (1e-14, 1e-14),
    torch.float32: (4e-6, 2e-6),
    torch.float16: (2.0**-10, 2.0**-11),
    torch.bfloat16: (2.0**-7, 2.0**-8),
}


def _fmt_worst(err, allowed, out, ref):
    i = int(torch.argmax((err - allowed).flatten()))
    return (
        f"worst at flat index {i}: out={out.flatten()[i].item()!r} ref={ref.flatten()[i].item()!r} "
        f"err={err.flatten()[i].item():.3e} allowed={allowed.flatten()[i].item():.3e}"
    )


def assert_close_rule(out, ref64, same_dtype, *, extra_atol=None, name="out", absolute=True):
    """The low-precision rule: max |out - ref64| <= 2 * max |same_dtype - ref64| + floor.

    out: the impl's result; ref64: the float64 reference; same_dtype: the plain-PyTorch
    reference computed in out's dtype. floor = FLOOR[dtype] * max(1, max |ref64|).
    extra_atol: optional elementwise allowance added on top (e.g. the noise rounding).
    absolute=False skips the ABS_TOL bound, for a float32 result computed from
    float16/bfloat16 inputs (attention's lse), where only the rule applies.
    Overflow: where the float64 value rounded to out's dtype is inf (or NaN), out must
    hold that same value. Where it is finite, out must be finite too, unless plain
    PyTorch in out's dtype also overflows there (then out may equal that result).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == same_dtype.dtype, f"{name}: dtype {out.dtype} != {same_dtype.dtype}"
    out64, same64 = out.detach().double().cpu(), same_dtype.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    rounded = ref64.to(out.dtype).double()

    def same_value(a, b):
        return (a == b) | (torch.isnan(a) & torch.isnan(b))

    finite = torch.isfinite(rounded)
    bad = ~finite & ~same_value(out64, rounded)
    assert not bool(bad.any()), (
        f"{name}: where the reference is {rounded[bad][:5].tolist()}, got {out64[bad][:5].tolist()}"
    )
    like_plain = finite & ~torch.isfinite(out64) & same_value(out64, same64)
    check = finite & ~like_plain
    assert bool(torch.isfinite(out64[check]).all()), (
        f"{name}: non-finite {out64[check & ~torch.isfinite(out64)][:5].tolist()} where the reference is "
        f"{ref64[check & ~torch.isfinite(out64)][:5].tolist()}"
    )
    if not bool(check.any()):
        return
    o, r = out64[check], ref64[check]
    s_ok = finite & torch.isfinite(same64)
    base = (same64[s_ok] - ref64[s_ok]).abs().max() if bool(s_ok.any()) else torch.tensor(0.0, dtype=torch.float64)
    scale = max(1.0, ref64[finite].abs().max().item())
    extra = (
        torch.zeros(o.shape, dtype=torch.float64)
        if extra_atol is None
        else extra_atol.detach().double().cpu().expand(ref64.shape)[check]
    )
    allowed = 2 * base + FLOOR[out.dtype] * scale + extra
    err = (o - r).abs()
    assert bool((err <= allowed).all()), f"{name} ({out.dtype}): {_fmt_worst(err, allowed, o, r)}"
    if absolute and out.dtype in ABS_TOL:
        tol = ABS_TOL[out.dtype] * scale + extra
        assert bool((err <= tol).all()), f"{name} ({out.dtype}, absolute): {_fmt_worst(err, tol, o, r)}"


def assert_matches_formula(out, want64, *, name="out"):
    """The spec's `out` (any dtype) against `want64`, an independent float64 formula (SPEC_TOL).

    Where the formula rounds to inf in out's dtype, out must be that inf; elsewhere finite.
    """
    assert out.shape == want64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(want64.shape)}"
    out64, want64 = out.detach().double().cpu(), want64.detach().double().cpu()
    rounded = want64.to(out.dtype).double()
    finite = torch.isfinite(rounded)
    assert torch.equal(out64[~finite], rounded[~finite]), f"{name}: {out64[~finite][:5].tolist()} for inf"
    if not bool(finite.any()):
        return
    o, w = out64[finite], want64[finite]
    assert bool(torch.isfinite(o).all()), f"{name}: non-finite {o[~torch.isfinite(o)][:5].tolist()} for finite values"
    rel, floor = SPEC_TOL[out.dtype]
    allowed = rel * w.abs() + floor * max(1.0, w.abs().max().item())
    err = (o - w).abs()
    assert bool((err <= allowed).all()), f"{name} ({out.dtype}) against the formula: {_fmt_worst(err, allowed, o, w)}"


# --- the reference, evaluated the ways the tests need --------------------------------


def seed_like_op(generator: torch.Generator | None, device) -> int:
    """The seed genkern.ops.reparam_kl._draw_seed draws from (a clone of) `generator`."""
    gen_device = torch.device(device) if generator is None else generator.device
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device=gen_device, generator=generator))


def clone_generator(gen: torch.Generator) -> torch.Generator:
    g = torch.Generator(device=gen.device)
    g.set_state(gen.get_state())
    return g


def kernel_noise(seed: int, shape, device="cpu") -> torch.Tensor:
    """The cpp/triton noise for an output of `shape` (row-major element index), float32."""
    from genkern.reference.reparam_kl import philox_normal

    numel = 1
    for s in shape:
        numel *= s
    return philox_normal(seed, numel, device=device).view(shape)


def to64(*ts):
    return tuple(None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts)


# --- input makers ----------------------------------------------------------------------


def make_inputs(shape, dtype, device="cpu", *, gen=None, mu_scale=1.0, logvar_scale=1.0):
    """Random mu, logvar (never zeros) of `shape`, rounded to `dtype`."""
    gen = gen or torch.Generator().manual_seed(zlib.crc32(repr((tuple(shape), str(dtype))).encode()))
    mu = (torch.randn(shape, generator=gen, dtype=torch.float64) * mu_scale).to(dtype)
    logvar = (torch.randn(shape, generator=gen, dtype=torch.float64) * logvar_scale).to(dtype)
    return mu.to(device), logvar.to(device)


def make_noncontiguous(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of t's values with a non-contiguous layout (values equal to t).

    "transpose": stored (D, ..., rows) and transposed back; "slice": every other element
    of a twice-as-wide buffer; "expand": a stride-0 view (only when t's first dim is
    repeated, so the values are built from row 0).
    """
    if layout == "transpose":
        perm = list(range(t.dim()))[::-1]
        out = t.permute(perm).contiguous().permute(perm)
    elif layout == "slice":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        out = buf[..., ::2]
    elif layout == "expand":
        out = t[:1].expand(t.shape)
    else:
        raise ValueError(layout)
    return out


# --- subprocesses ------------------------------------------------------------------------


def run_python(code: str, env_overrides: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (fresh caches) with the environment changed."""
    env = dict(os.environ)
    for k, v in env_overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def resolve(impl, device, dtype):
    return _dispatch.resolve(impl, torch.device(device), dtype, "reparameterize_kl")


# --- generic random inputs ----------------------------------------------------------------


def randn(shape, dtype=torch.float32, device="cpu", *, seed: int, scale: float = 1.0) -> torch.Tensor:
    """Seeded N(0, scale^2) values of `shape` (drawn in float64, rounded to `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def interpreted(impl: str) -> bool:
    """True when `impl` runs under the (slow) Triton interpreter: keep its inputs small."""
    return impl == "triton" and not HAS_CUDA


@pytest.fixture(autouse=True)
def one_thread():
    """Imported by a test module: its tests run with one intra-op thread. On tiny tensors
    extra threads only add synchronisation, which costs 10-100x on a loaded shared machine;
    the threaded kernels keep their own tests with several threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class KernelCalls:
    """Counts the calls that reach kernel family `family` of a genkern.ops KernelOp (e.g.
    genkern.ops.attention.ATTENTION): proof that genkern's kernel, not a fallback, ran."""

    def __init__(self, monkeypatch, op, family: str):
        self.calls = 0
        key = (family, op._direction)  # the forward op's entry in the op's table
        kernel = op._ops[key]

        def counting(*args):
            self.calls += 1
            return kernel(*args)

        monkeypatch.setitem(op._ops, key, counting)
