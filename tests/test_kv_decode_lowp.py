"""The C++ kv_decode kernel on float16/bfloat16 caches, which it reads in their own type.

Each case runs genkern.attention_with_kvcache(impl="cpp") and holds its output to the
float64 spec (genkern.reference.kv_decode on float64 copies) under the rule of DESIGN.md
(utils.assert_close_rule: at most 2x the error of the plain-PyTorch op in the same dtype,
plus a small floor), over what the kernel's row loop has to get right in 16-bit rows:
windows, key_lo, ragged lengths (an empty row, rows across several key blocks), grouped
query heads, Tnew 1 and 4, head sizes that are not a multiple of a vector, rows split into
chunks across threads. Values past a row's end, or hidden from every query of it by the
window or key_lo, may hold NaN or inf: they must never reach an output, bit for bit.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import genkern
import utils
from genkern.reference import kv_decode as reference
from utils import assert_close_rule, one_thread  # noqa: F401 (autouse fixture)

F16, BF16, F64, I32 = torch.float16, torch.bfloat16, torch.float64, torch.int32
LOWP = (BF16, F16)


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_case(dtype, *, heads=(8, 2), tnew=1, d=64, lengths=(0, 3, 70, 200), smax=257, seed=0):
    """q (B, H, Tnew, D) scaled so softmax rows are peaked, caches (B, Hkv, Smax, D), int32
    lengths (B,) and k_new/v_new (B, Hkv, Tnew, D): row b holds lengths[b] + Tnew positions."""
    (h, hkv), b = heads, len(lengths)
    q = utils.randn((b, h, tnew, d), dtype, seed=seed, scale=2.0)
    k_cache, v_cache = (utils.randn((b, hkv, smax, d), dtype, seed=seed + i) for i in (1, 2))
    k_new, v_new = (utils.randn((b, hkv, tnew, d), dtype, seed=seed + i) for i in (3, 4))
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=I32), k_new, v_new


def run(impl, case, left=-1, key_lo=None):
    """The op's output; it writes k_new/v_new into copies of the caches, not into the case's."""
    q, kc, vc, lens, kn, vn = case
    with torch.no_grad():
        return genkern.attention_with_kvcache(
            q, kc.clone(), vc.clone(), lens, kn, vn, window_size=(left, -1), key_lo=key_lo, impl=impl
        )


def check(case, left=-1, key_lo=None):
    """The cpp output against the float64 spec under the 2x rule; returns it."""
    q, kc, vc, lens, kn, vn = case
    out = run("cpp", case, left, key_lo)
    assert out.dtype == q.dtype and out.shape == q.shape
    with torch.no_grad():
        args64 = (q.double(), kc.double(), vc.double(), lens, kn.double(), vn.double())
        out64 = reference.attention_with_kvcache(*args64, window_size=(left, -1), key_lo=key_lo)
        out_same = reference.attention_with_kvcache(
            q, kc.clone(), vc.clone(), lens, kn, vn, window_size=(left, -1), key_lo=key_lo
        )
    assert bool(torch.isfinite(out).all()), "non-finite output"
    assert_close_rule(out, out64, out_same, name="out")
    return out


@pytest.mark.parametrize("d", (16, 24, 72, 128, 200))
@pytest.mark.parametrize("tnew", (1, 4))
@pytest.mark.parametrize("heads", ((8, 2), (4, 1), (4, 4)), ids=("gqa", "mqa", "mha"))
@pytest.mark.parametrize("dtype", LOWP, ids=_dt)
def test_values(dtype, heads, tnew, d):
    check(make_case(dtype, heads=heads, tnew=tnew, d=d, seed=_seed("values", dtype, heads, tnew, d)))


@pytest.mark.parametrize("key_lo", (None, (0, 2, 9, 150)), ids=("no_key_lo", "key_lo"))
@pytest.mark.parametrize("left", (-1, 0, 5, 100))
@pytest.mark.parametrize("tnew", (1, 4))
@pytest.mark.parametrize("dtype", LOWP, ids=_dt)
def test_window_and_key_lo(dtype, tnew, left, key_lo):
    lo = None if key_lo is None else torch.tensor(key_lo, dtype=I32)
    check(make_case(dtype, tnew=tnew, d=128, seed=_seed("window", dtype, tnew, left)), left, lo)


@pytest.mark.parametrize("tnew", (1, 4))
@pytest.mark.parametrize("dtype", LOWP, ids=_dt)
def test_rows_split_across_threads(dtype, tnew):
    # Long rows and more threads than rows: rows are split into chunks merged afterwards.
    torch.set_num_threads(4)
    case = make_case(dtype, tnew=tnew, d=128, lengths=(1500, 0, 700), smax=1600, seed=_seed("split", dtype, tnew))
    check(case)
    check(case, left=600, key_lo=torch.tensor([100, 0, 3], dtype=I32))


def _poison(case, tnew, left, key_lo, what):
    """The case's caches with `what` at every position no query of its row sees: past the row's
    end (stale), before key_lo, and before the window of the row's first query."""
    q, kc, vc, lens, kn, vn = case
    kc, vc = kc.clone(), vc.clone()
    for b, length in enumerate(lens.tolist()):
        n = length + tnew
        first = max(key_lo[b] if key_lo is not None else 0, n - tnew - left if left >= 0 else 0)
        for c in (kc, vc):
            c[b, :, n:] = what
            c[b, :, : min(first, length)] = what  # positions >= length are written by k_new/v_new
    return q, kc, vc, lens, kn, vn


@pytest.mark.parametrize("what", (math.nan, math.inf, -math.inf), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("tnew", (1, 4))
@pytest.mark.parametrize("dtype", LOWP, ids=_dt)
def test_hidden_nonfinite_never_reach_output(dtype, tnew, what):
    # Output bits must not depend on what the positions no query sees hold: NaN/inf there gives
    # the output of zeros there. Within the window of a row's first query, a later one (Tnew = 4)
    # loads positions it does not see; those hold finite values, as they do in a model's cache.
    left, key_lo = 40, (0, 2, 9, 150)
    case = make_case(dtype, tnew=tnew, d=128, seed=_seed("hidden", dtype, tnew))
    lo = torch.tensor(key_lo, dtype=I32)
    out = check(_poison(case, tnew, left, key_lo, what), left, lo)
    torch.testing.assert_close(out, run("cpp", _poison(case, tnew, left, key_lo, 0.0), left, lo), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOWP, ids=_dt)
def test_masked_new_key_never_reaches_an_earlier_query(dtype):
    # With Tnew = 4, new token 2 is seen by queries 2 and 3 only: a NaN in its key or value
    # must leave queries 0 and 1 as they were, in the rows that the kernel widens in registers.
    case = make_case(dtype, tnew=4, d=64, seed=_seed("masked-new", dtype))
    q, kc, vc, lens, kn, vn = case
    clean = run("cpp", case)
    for poisoned in ("k", "v"):
        kn2, vn2 = kn.clone(), vn.clone()
        (kn2 if poisoned == "k" else vn2)[:, :, 2] = math.nan
        got = run("cpp", (q, kc, vc, lens, kn2, vn2))
        torch.testing.assert_close(got[:, :, :2], clean[:, :, :2], rtol=0, atol=0)
        assert not bool(torch.isfinite(got[:, :, 2:]).any()), f"queries 2, 3 do not see the NaN in new {poisoned} 2"


@pytest.mark.parametrize("dtype", (BF16, F16, torch.float32), ids=_dt)
@pytest.mark.parametrize("d", (20, 5))
def test_raw_op_takes_head_sizes_off_the_vector_width(dtype, d):
    # The public function takes multiples of 8 only; the op itself takes any head size, and its
    # row loads must then stop at the row's end (the last D % 8 values, without masked loads).
    q, kc, vc, lens, kn, vn = make_case(dtype, d=d, tnew=2, seed=_seed("raw", d))
    out = torch.ops.genkern.kv_decode_cpp(q, kc.clone(), vc.clone(), lens, kn, vn, 1 / math.sqrt(d), -1, None)
    with torch.no_grad():
        args64 = (q.double(), kc.double(), vc.double(), lens, kn.double(), vn.double())
        out64 = reference.attention_with_kvcache(*args64)
        out_same = reference.attention_with_kvcache(q, kc.clone(), vc.clone(), lens, kn, vn)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert_close_rule(out, out64, out_same, name="out")
