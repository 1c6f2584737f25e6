"""The Triton split-KV decoding launcher (genkern.triton.kv_decode) against the float64 reference.

Without a GPU it runs under the Triton interpreter on CPU tensors (float32, float16; few, small
cases: the interpreter is slow). "Correct" is the rule of DESIGN.md (utils.assert_close_rule) for
the output, and exact equality for the caches: k_new/v_new land at L_b .. L_b + Tnew - 1 and no
other element of the cache buffers changes. Every case fills the positions past L_b with NaN
(stale entries that must not reach the output) and keeps the caches as layer views of a 5-d
buffer. The AOT test compiles every kernel x config for sm_80 and sm_90 without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import utils
from genkern.reference.kv_decode import attention_with_kvcache as reference
from genkern.reference.kv_decode import write_new
from utils import assert_close_rule

pytest.importorskip("triton")
from genkern.triton import kv_decode as tri  # noqa: E402  (after conftest sets TRITON_INTERPRET)

ROOT = Path(__file__).resolve().parents[1]
DEVICE = utils.impl_device("triton")
DTYPES = utils.impl_dtypes("triton")
LAYERS, LAYER = 2, 1  # the caches are layer LAYER of (LAYERS, B, Hkv, Smax, D) buffers

# (B, H, Hkv, Tnew, Smax, D, lengths L_b, with k_new/v_new): ragged rows with an empty row and a
# full one (n_b = Smax); Tnew = 3 without new keys and L_b = 2 leaves query 0 seeing nothing.
CASES = [
    (4, 4, 2, 1, 150, 40, (0, 37, 149, 90), True),  # GQA, one decoding step
    (3, 4, 1, 3, 200, 64, (0, 2, 200), False),  # MQA, keys already in the cache
    (3, 2, 2, 3, 70, 16, (0, 67, 20), True),  # MHA, a block of 3 new tokens
    (2, 8, 1, 3, 90, 40, (59, 87), True),  # G * Tnew = 24 rows: two query tiles
]


def _cid(case):
    b, h, hkv, t, s, d, _, new = case
    return f"B{b}H{h}Hkv{hkv}T{t}S{s}D{d}" + ("-new" if new else "")


def _inputs(case, dtype, seed, q_layout="bthd"):
    """(q, k_cache, v_cache, seqlens, k_new, v_new, k_buf, v_buf): q and the new keys as
    (B, T, H, D) buffers seen as (B, H, T, D) ("bthd") or contiguous; caches are layer views."""
    b, h, hkv, t, s, d, lens, new = case
    q = utils.randn((b, t, h, d), dtype, DEVICE, seed=seed).transpose(1, 2)
    if q_layout != "bthd":
        q = q.contiguous()
    bufs = [utils.randn((LAYERS, b, hkv, s, d), dtype, DEVICE, seed=seed + i) for i in (1, 2)]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    stale = torch.arange(s, device=DEVICE).view(1, 1, s, 1) >= seqlens.view(b, 1, 1, 1).long()
    for buf in bufs:
        buf[LAYER].masked_fill_(stale, float("nan"))
    kn = vn = None
    if new:
        kn, vn = (utils.randn((b, t, hkv, d), dtype, DEVICE, seed=seed + i).transpose(1, 2) for i in (3, 4))
    return q, bufs[0][LAYER], bufs[1][LAYER], seqlens, kn, vn, bufs[0], bufs[1]


def check(q, k_cache, v_cache, seqlens, k_new, v_new, k_buf, v_buf, scale, view=lambda buf: buf[LAYER]):
    """Runs the launcher; checks the output against the reference and the buffers holding the
    caches (k_cache = view(k_buf)) exactly."""
    expect = [t.clone() for t in (k_buf, v_buf)]
    if k_new is not None:
        write_new(view(expect[0]), view(expect[1]), seqlens, k_new, v_new)
    plain_caches = [k_cache.clone(), v_cache.clone()]  # plain PyTorch in q's dtype
    out = tri.kv_decode(q, k_cache, v_cache, seqlens, k_new, v_new, scale)
    for got, want in zip((k_buf, v_buf), expect):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    truth = reference(*utils.to64(q, *plain_caches), seqlens, *utils.to64(k_new, v_new), scale)
    same = reference(q, *plain_caches, seqlens, k_new, v_new, scale)
    assert out.is_contiguous() and out.dtype == q.dtype
    assert_close_rule(out, truth, same)
    n = seqlens.long() + (0 if k_new is None else q.shape[2])
    assert bool((out[n == 0] == 0).all()), "rows with n_b = 0 give zeros"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_cid)
def test_matches_reference(case, dtype):
    i = CASES.index(case)
    args = _inputs(case, dtype, seed=10 * i, q_layout="bthd" if i % 2 == 0 else "bhtd")
    check(*args, scale=1.0 / math.sqrt(case[5]))


def test_query_that_sees_nothing():
    # Tnew = 3 over L_b = 2 cached positions, keys already there: query 0 sees j <= -1.
    q, k, v, seqlens, _, _, kb, vb = _inputs((1, 2, 1, 3, 40, 16, (2,), False), torch.float32, seed=3)
    out = check(q, k, v, seqlens, None, None, kb, vb, scale=0.5)
    assert bool((out[:, :, 0] == 0).all()) and bool(out[:, :, 1:].abs().sum(-1).gt(0).all())


def test_oddly_strided_cache():
    # Positions D + 4 elements apart (not a multiple of 8): the element-wise path, still in place.
    b, h, hkv, t, s, d = 2, 4, 2, 1, 50, 24
    wide = [utils.randn((LAYERS, b, hkv, s, d + 4), torch.float32, DEVICE, seed=i) for i in (1, 2)]
    view = lambda w: w[LAYER, ..., :d]  # noqa: E731
    k, v = view(wide[0]), view(wide[1])
    assert k.stride(2) % 8
    q = utils.randn((b, h, t, d), torch.float32, DEVICE, seed=3)
    kn, vn = (utils.randn((b, hkv, t, d), torch.float32, DEVICE, seed=i) for i in (4, 5))
    check(q, k, v, torch.tensor([0, 49], dtype=torch.int32, device=DEVICE), kn, vn, *wide, scale=0.3, view=view)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(d=12), "head dim"),
        (dict(d=36), "head dim"),
        (dict(hkv=3), "H % Hkv"),
        (dict(dtype=torch.float64), "float16, bfloat16 or float32"),
        (dict(lens=torch.int64), "cache_seqlens"),
        (dict(cache_last_stride=2), "unit-stride last dim"),
        (dict(new_shape=(1, 2, 2, 16)), "k_new"),
    ],
)
def test_bad_input(bad, match):
    d, hkv, dtype = bad.get("d", 16), bad.get("hkv", 2), bad.get("dtype", torch.float32)
    q = torch.randn(1, 4, 1, d, dtype=dtype, device=DEVICE)
    k = torch.randn(1, hkv, 8, d * bad.get("cache_last_stride", 1), dtype=dtype, device=DEVICE)[
        ..., :: bad.get("cache_last_stride", 1)
    ]
    kn = torch.randn(bad.get("new_shape", (1, hkv, 1, d)), dtype=dtype, device=DEVICE)
    lens = torch.zeros(1, dtype=bad.get("lens", torch.int32), device=DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        tri.kv_decode(q, k, k.clone(), lens, kn, kn, 0.5)


# Ahead-of-time compiles of every kernel x config: tests/test_triton_aot.py.


# --- on a GPU: the autotuned, compiled kernels at model sizes ------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [64, 40, 128, 256])
@pytest.mark.parametrize("tnew, new", [(1, True), (4, True), (1, False)])
def test_gpu_model_sizes(d, tnew, new, dtype):
    lens = (0, 1, 517, 2047 - tnew, 1500, 33)
    case = (6, 16, 4 if tnew == 1 else 2, tnew, 2047, d, lens if new else (0, 3, 517, 2047, 1500, 33), new)
    check(*_inputs(case, dtype, seed=d + tnew), scale=1.0 / math.sqrt(d))
