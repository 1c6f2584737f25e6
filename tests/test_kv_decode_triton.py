"""The Triton split-KV decoding launcher (genkern.triton.kv_decode) against the float64 reference.

Without a GPU it runs under the Triton interpreter on CPU tensors (float32, float16; few, small
cases: the interpreter is slow). "Correct" is the rule of DESIGN.md (utils.assert_close_rule) for
the output, and exact equality for the caches: k_new/v_new land at L_b .. L_b + Tnew - 1 and no
other element of the cache buffers changes. Every case fills the positions past L_b with NaN
(stale entries that must not reach the output) and keeps the caches as layer views of a 5-d
buffer. The AOT test compiles every kernel x config for sm_80 and sm_90 without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
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


# --- ahead-of-time compile: every kernel x config for sm_80 and sm_90, no GPU needed ----------

MAX_STACK = 16  # bytes per thread
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # opt-in shared memory per block


@pytest.mark.slow
def test_every_kernel_and_config_compiles(tmp_path, record_property):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels do not compile
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "genkern.triton._aot", "genkern.triton.kv_decode", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(proc.stdout)
    assert out.exists(), proc.stderr[-4000:]
    rows = json.loads(out.read_text())
    record_property("aot_report", proc.stdout)
    failed = [f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']}: {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed[:5])
    assert proc.returncode == 0, proc.stderr[-4000:]

    # Rows come case by case (dtype, then arch, inside): the cases carry num_stages, the rows do not.
    cases = list(tri.aot_cases())  # interpreted here: only names and configs are read
    combos = {(a, d) for a in ("sm_80", "sm_90") for d in ("fp32", "fp16", "bf16")}
    assert len(rows) == len(cases) * len(combos)
    for i, case in enumerate(cases):
        mine = rows[i * len(combos) : (i + 1) * len(combos)]
        assert {(r["arch"], r["dtype"]) for r in mine} == combos
        assert all(r["config"] == dict(case["constexprs"], num_warps=case["num_warps"]) for r in mine)

    def seen(kernel, *keys):
        return {tuple(c["constexprs"].get(k, c.get(k)) for k in keys) for c in cases if c["kernel"].__name__ == kernel}

    assert {r["kernel"] for r in rows} == {f"_kv_decode_{k}_kernel" for k in ("append", "split", "combine")}
    assert seen("_kv_decode_split_kernel", "SU", "BLOCK_D", "BLOCK_N", "num_warps", "num_stages") == {
        (8, bd, *c) for bd, configs in tri.CONFIGS.items() for c in configs
    } | {(1, bd, *tri.STRIDED_CONFIG) for bd in tri.BLOCK_DS}
    assert all(tri.CONFIGS[bd] for bd in tri.BLOCK_DS), "every head dim keeps a config"
    assert seen("_kv_decode_split_kernel", "BLOCK_M") == {(tri.BLOCK_M,)}
    assert seen("_kv_decode_append_kernel", "BLOCK_D", "SU") == {(bd, su) for bd in tri.BLOCK_DS for su in (1, 8)}
    assert seen("_kv_decode_combine_kernel", "BLOCK_D", "BLOCK_S") == {(bd, tri.MAX_SPLITS) for bd in tri.BLOCK_DS}
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], where
        # ptxas may spill a word or two at odd configs; more than that is a register-pressure bug.
        assert r.get("local", 0) == 0 and r.get("stack", 0) <= MAX_STACK, f"{where} spills to local memory"


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
