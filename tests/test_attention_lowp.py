"""The C++ attention kernels in bfloat16/float16: forward, lse and gradients against the float64 reference under
the 2x rule (utils.assert_close_rule), through torch.ops.genkern directly; causal and full, windows, key spans,
packed sequences, grouped-query heads, odd lengths; NaN/inf in keys and values no row sees.

Where the CPU has the bfloat16/float16 matrix instructions (AMX) the block products run on them
(csrc/attention_lowp*.cpp), forward and backward; GENKERN_ATTN_LOWP=0 forces the path that widens the
inputs to float32. Every case runs on both paths, and on an AMX CPU the two must differ (the matrix path is
the one running) while both pass the rule.
"""

from __future__ import annotations

import math

import pytest
import torch

import genkern  # noqa: F401  (loads genkern._C: the ops below)
import utils
from genkern.reference.attention import attention as ref_attention
from genkern.reference.attention_varlen import attention_varlen as ref_varlen
from utils import assert_close_rule

BF16, F16, F32, F64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
ops = torch.ops.genkern


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The matrix path runs bfloat16 on AMX-BF16 and float16 on AMX-FP16 (when torch's oneDNN packs it).
MATRIX = {BF16: "amx_bf16" in cpu_flags(), F16: "amx_fp16" in cpu_flags()}


@pytest.fixture(autouse=True)
def _cpp():
    utils.require_impl("cpp")


@pytest.fixture(params=["matrix", "widened"])
def path(request, monkeypatch):
    """Runs the test on the matrix-instruction path (where the CPU has it) and on the widening path."""
    monkeypatch.setenv("GENKERN_ATTN_LOWP", "1" if request.param == "matrix" else "0")
    return request.param


def rand(shape, dtype, seed, scale=1.0):
    return utils.randn(shape, dtype, seed=seed, scale=scale)


def grads(fn, inputs, gout, glse, dtype):
    """out, lse and the gradients of sum(out * gout) + sum(lse * glse) of the reference in `dtype`."""
    xs = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    out, lse = fn(*xs)
    fin = torch.isfinite(lse)
    loss = (out * gout.to(dtype)).sum() + (torch.where(fin, lse, 0) * glse.to(lse.dtype)).sum()
    return (out.detach(), lse.detach()), torch.autograd.grad(loss, xs)


def check_all(fn, got, inputs, gout, glse, keep=None):
    """got = (out, lse, dq, dk, dv) of the kernels against the reference fn in float64 and in the inputs' dtype."""
    (o64, l64), g64 = grads(fn, inputs, gout, glse, F64)
    (osame, lsame), gsame = grads(fn, inputs, gout, glse, inputs[0].dtype)
    out, lse, *dx = got
    assert_close_rule(out, o64, osame, name="out")
    assert_close_rule(lse, l64, lsame.float(), name="lse", absolute=False)
    for name, a, w64, ws in zip(("dq", "dk", "dv"), dx, g64, gsame):
        if keep is not None and name != "dq":
            a, w64, ws = (x.transpose(-3, -2)[keep] if x.dim() == 4 else x[keep] for x in (a, w64, ws))
        assert_close_rule(a, w64, ws, name=name)


def run_dense(q, k, v, causal, window, spans, plant=None, seed=0):
    """attention_cpp_fwd/bwd against the reference; `plant` (B, S) marks keys no row sees, filled with NaN/inf
    after the reference ran."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    lo, hi = spans if spans is not None else (None, None)

    def fn(q_, k_, v_):
        return ref_attention(q_, k_, v_, causal, scale, True, window_size=window, key_spans=spans)

    gout, glse = rand(q.shape, q.dtype, seed + 7), rand(q.shape[:3], F32, seed + 8)
    kk, vv = k, v
    if plant is not None:
        kk, vv = k.clone(), v.clone()
        kk[:, 0][plant], vv[:, -1][plant] = float("nan"), float("inf")
        kk[:, -1][plant], vv[:, 0][plant] = float("-inf"), float("nan")
    out, lse = ops.attention_cpp_fwd(q, kk, vv, causal, scale, window[0], window[1], lo, hi)
    dq, dk, dv = ops.attention_cpp_bwd(gout, q, kk, vv, out, lse, glse, causal, scale, window[0], window[1], lo, hi)
    check_all(fn, (out, lse, dq, dk, dv), (q, k, v), gout, glse, keep=None if plant is None else ~plant)
    if plant is not None:
        assert (dk.transpose(1, 2)[plant] == 0).all() and (dv.transpose(1, 2)[plant] == 0).all()
    return out, lse, dq, dk, dv


def dense(b, h, hkv, t, s, d, dtype, seed):
    return (
        rand((b, h, t, d), dtype, seed, 2.0),
        rand((b, hkv, s, d), dtype, seed + 1),
        rand((b, hkv, s, d), dtype, seed + 2),
    )


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("t,s", [(1, 1), (17, 17), (113, 300), (300, 113), (300, 300)])
@pytest.mark.parametrize("d", [16, 64])
def test_dense(path, dtype, causal, t, s, d):
    q, k, v = dense(2, 4, 2, t, s, d, dtype, seed=t + s + d)
    run_dense(q, k, v, causal, (-1, -1), None, seed=t)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("window", [(0, 0), (5, -1), (-1, 7), (70, 3)], ids=str)
def test_windows(path, dtype, window):
    q, k, v = dense(1, 4, 1, 113, 300, 32, dtype, seed=3)
    run_dense(q, k, v, True, window, None)
    run_dense(q, k, v, False, window, None)


@pytest.mark.parametrize("kind", ["right", "random"])
def test_key_spans(path, kind):
    b, t, s = 3, 113, 130
    q, k, v = dense(b, 4, 2, t, s, 32, BF16, seed=5)
    g = torch.Generator().manual_seed(b)
    if kind == "right":
        lens = torch.randint(0, s + 1, (b,), generator=g)
        lo, hi = torch.zeros(b, t), lens.view(b, 1).expand(b, t)
    else:  # anything, outside [0, S] too, empty rows included
        lo, hi = torch.randint(-5, s + 5, (b, t), generator=g), torch.randint(-5, s + 5, (b, t), generator=g)
    run_dense(q, k, v, False, (-1, -1), (lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
def test_nan_inf_in_masked_keys(path, dtype):
    """NaN/inf in keys and values no row sees (below every row's key_lo, in a 64-key panel that rows do see in
    part) reach no result; with a causal window, rows below 37 see no key at all."""
    q, k, v = dense(1, 2, 1, 200, 200, 64, dtype, seed=9)
    plant = torch.zeros(1, 200, dtype=torch.bool)
    plant[:, :37] = True
    lo, hi = torch.full((1, 200), 37, dtype=torch.int32), torch.full((1, 200), 200, dtype=torch.int32)
    run_dense(q, k, v, True, (40, -1), (lo, hi), plant=plant)


PACKS = {"mixed": ([1, 17, 0, 113, 300], [1, 17, 0, 113, 300]), "t_ne_s": ([5, 0, 113, 40], [17, 3, 100, 0])}


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("pack", list(PACKS))
def test_packed(path, dtype, causal, pack):
    lq, lk = PACKS[pack]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = rand((sum(lq), 4, 32), dtype, 1, 2.0), rand((sum(lk), 2, 32), dtype, 2), rand((sum(lk), 2, 32), dtype, 3)
    args = (cu_q, cu_k, max(lq), max(lk), causal, 0.37, -1, -1)

    def fn(q_, k_, v_):
        return ref_varlen(q_, k_, v_, cu_q, cu_k, max(lq), max(lk), causal=causal, scale=0.37, return_lse=True)

    gout, glse = rand(q.shape, dtype, 7), rand((q.shape[1], q.shape[0]), F32, 8)
    out, lse = ops.attention_varlen_cpp_fwd(q, k, v, *args)
    dq, dk, dv = ops.attention_varlen_cpp_bwd(gout, q, k, v, out, lse, glse, *args)
    check_all(fn, (out, lse, dq, dk, dv), (q, k, v), gout, glse)


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("d", [64, 128])
def test_matrix_path_runs(monkeypatch, dtype, d):
    """Both paths pass the rule; on a CPU with the matrix instructions their results differ (the products round P
    to the input dtype), elsewhere the default is the widening path itself."""
    torch.set_num_threads(2)
    q, k, v = dense(1, 4, 4, 600, 600, d, dtype, seed=d)
    got = {}
    for mode in ("1", "0"):
        monkeypatch.setenv("GENKERN_ATTN_LOWP", mode)
        got[mode] = run_dense(q, k, v, True, (-1, -1), None)
    same = all(torch.equal(a, b) for a, b in zip(got["1"], got["0"]))
    assert same != MATRIX[dtype], f"matrix path expected to run: {MATRIX[dtype]}, results equal: {same}"
    # the backward too: each gradient of the matrix path differs from the widening path's (rounded P and dS)
    grads_differ = [not torch.equal(a, b) for a, b in zip(got["1"][2:], got["0"][2:])]
    assert grads_differ == [MATRIX[dtype]] * 3, f"matrix backward expected: {MATRIX[dtype]}, differ: {grads_differ}"
