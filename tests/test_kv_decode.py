"""genkern.attention_with_kvcache and genkern.KVCache against a float64 computation.

The expected output is computed independently of genkern.reference.kv_decode: the new
keys/values are written into float64 copies of the caches, and each row b attends with
genkern.reference.attention (causal, bottom-right aligned) over its filled slice
[0, n_b) only, so stale positions cannot reach it. "Correct" is the rule of DESIGN.md
(utils.assert_close_rule): the error vs that float64 result is at most 2x the error of
the plain-PyTorch op (genkern.reference.kv_decode) in the same dtype plus a small floor,
and float32/float64 results are also within utils.ABS_TOL of it.

The cache writes are exact: the caches must hold k_new/v_new bit for bit at
L_b .. L_b + Tnew - 1 and be bitwise unchanged elsewhere (stale NaN included).

impl="torch" is genkern.reference.kv_decode itself, so it is never held to that rule
(it would compare the reference with itself): its output is held to `loop_kvcache`, the
math written out in float64 one query at a time, within utils.ABS_TOL. The torch impl's
other tests check what the reference does not already assume: the cache writes, the
spec's zeros and stale values, the input checks, and that it is the reference.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import genkern
import utils
from genkern.reference import attention as ref_attention
from genkern.reference import kv_decode as reference
from utils import assert_close_rule, one_thread  # noqa: F401 (autouse fixture)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
I32 = torch.int32
HEADS = {"gqa": (8, 2), "mqa": (4, 1), "mha": (4, 4)}  # (H, Hkv)
IMPLS = ("torch", "cpp")
SMAX = 40


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's storage as integers: torch.equal on these compares bit patterns (NaN == NaN)."""
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bits(got, want, name):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype}"
    same = bits(got) == bits(want)
    assert bool(same.all()), f"{name}: {int((~same).sum())} elements differ, first at {(~same).nonzero()[0].tolist()}"


def ragged_lengths(b, tnew, smax, with_new):
    """B = 4 row lengths: an empty row, a short one, a full one and one in between.

    With k_new the full row is L = Smax - Tnew (full after the write). Without, a row
    shorter than Tnew leaves its first queries without a visible position.
    """
    assert b == 4
    if with_new:
        return [0, 1, smax - tnew, min(7, smax - tnew)]
    return [0, 1, smax, min(7 + tnew, smax)]


def make_case(heads, tnew, d, dtype, *, with_new=True, lengths=None, smax=SMAX, b=4, seed=0, stale="random"):
    """q (B, H, Tnew, D) scaled so softmax rows are peaked, caches (B, Hkv, Smax, D),
    int32 lengths, and k_new/v_new (or None). stale="nonfinite" fills every position
    past the end of each row (after the write) with NaN, +inf and -inf."""
    h, hkv = HEADS[heads] if isinstance(heads, str) else heads
    q = utils.randn((b, h, tnew, d), dtype, seed=seed, scale=2.0)
    k_cache = utils.randn((b, hkv, smax, d), dtype, seed=seed + 1)
    v_cache = utils.randn((b, hkv, smax, d), dtype, seed=seed + 2)
    lengths = ragged_lengths(b, tnew, smax, with_new) if lengths is None else lengths
    k_new = utils.randn((b, hkv, tnew, d), dtype, seed=seed + 3) if with_new else None
    v_new = utils.randn((b, hkv, tnew, d), dtype, seed=seed + 4) if with_new else None
    if stale == "nonfinite":
        junk = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype).repeat(smax)  # (3 * Smax,)
        for row, n in enumerate(lengths):
            end = n + (tnew if with_new else 0)
            for c in (k_cache, v_cache):
                c[row, :, end:] = junk[: smax - end, None]
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=I32), k_new, v_new


def expected(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale=None):
    """(out64, k_cache_after, v_cache_after): the float64 output from each row's filled
    slice, and the caches (their dtype) with k_new/v_new written at L_b .. L_b + Tnew - 1."""
    b, h, tnew, d = q.shape
    k_after, v_after = k_cache.clone(), v_cache.clone()
    out = torch.zeros(q.shape, dtype=F64)
    for row, n in enumerate(cache_seqlens.tolist()):
        if k_new is not None:
            k_after[row, :, n : n + tnew] = k_new[row]
            v_after[row, :, n : n + tnew] = v_new[row]
            n += tnew
        if n == 0:
            continue  # the row sees nothing: zeros
        k64, v64 = k_after[row : row + 1, :, :n].double(), v_after[row : row + 1, :, :n].double()
        out[row] = ref_attention.attention(q[row : row + 1].double(), k64, v64, True, scale)[0]
    return out, k_after, v_after


def loop_kvcache(q, k_after, v_after, lengths, scale=None):
    """The float64 output (B, H, Tnew, D) from the caches after the write and each row's
    length n_b after it, written out one query at a time and independently of
    genkern.reference: query i of head h in row b reads KV head h // (H // Hkv) at
    positions j = 0 .. i + n_b - Tnew (the bottom-right rule within the filled part, so
    j < n_b); softmax as exp / sum. A query that sees no position gets 0."""
    b, h, tnew, d = q.shape
    hkv = k_after.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(q.shape, dtype=F64)
    for row, n in enumerate(lengths):
        for hi in range(h):
            c = hi // (h // hkv)
            for i in range(tnew):
                seen = i + n - tnew + 1  # positions 0 .. seen - 1
                if seen <= 0:
                    continue
                keys, values = k_after[row, c, :seen].double(), v_after[row, c, :seen].double()
                x = (keys * q[row, hi, i].double()).sum(-1) * scale  # (seen,) scores
                e = torch.exp(x - x.max())
                out[row, hi, i] = (e.unsqueeze(-1) * values).sum(0) / e.sum()
    return out


def assert_near(got, want64, name):
    """|got - want64| <= utils.ABS_TOL[got.dtype] * max(1, max |want64|)."""
    assert got.shape == want64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want64.shape)}"
    tol = utils.ABS_TOL[got.dtype] * max(1.0, want64.abs().max().item())
    err = (got.double() - want64).abs().max().item()
    assert err <= tol, f"{name} ({got.dtype}): max error {err:.3e} > {tol:.3e}"


def assert_out(impl, out, q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, scale=None):
    """out against the float64 result of the call on the caches as they were before it:
    a kernel by the rule (2x the reference's error in out's dtype), the torch impl (the
    reference) against loop_kvcache."""
    out64, k_after, v_after = expected(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
    if impl == "torch":
        n = cache_seqlens.long() + (q.shape[2] if k_new is not None else 0)
        assert_near(out, loop_kvcache(q, k_after, v_after, n.tolist(), scale), "out")
        return
    kc, vc, lengths = k_cache.clone(), v_cache.clone(), cache_seqlens.clone()
    out_same = reference.attention_with_kvcache(q, kc, vc, lengths, k_new, v_new, scale)
    assert_close_rule(out, out64, out_same, name="out")


def run_op(impl, q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, **kw):
    with torch.no_grad():
        return genkern.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, impl=impl, **kw)


def check(impl, q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *, scale=None):
    """Runs the op (it writes into the given caches) and checks its output (assert_out),
    the caches and cache_seqlens against `expected`. Returns out."""
    _, k_want, v_want = expected(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    lengths_before = cache_seqlens.clone()
    out = run_op(impl, q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert_same_bits(k_cache, k_want, "k_cache")
    assert_same_bits(v_cache, v_want, "v_cache")
    assert torch.equal(cache_seqlens, lengths_before) and cache_seqlens.dtype == I32, "cache_seqlens changed"
    assert bool(torch.isfinite(out).all()), "non-finite output"
    assert_out(impl, out, q, k_before, v_before, lengths_before, k_new, v_new, scale)
    # A row that sees no position gives exactly zeros.
    tnew = q.shape[2]
    for row, n in enumerate(lengths_before.tolist()):
        n += tnew if k_new is not None else 0
        empty = max(0, tnew - n)
        assert bool((out[row, :, :empty] == 0).all()), f"row {row}: queries that see nothing must give 0"
    return out


# --- values --------------------------------------------------------------------------------


def _value_params():
    out = []
    for dtype in (F32, F64):
        for d in (16, 64, 128):
            for tnew in (1, 3, 17):
                for heads in ("gqa", "mqa"):
                    out.append(pytest.param("cpp", dtype, d, tnew, heads, id=f"cpp-{_dt(dtype)}-D{d}-T{tnew}-{heads}"))
    return out


@pytest.mark.parametrize("with_new", (True, False), ids=("new", "no_new"))
@pytest.mark.parametrize("impl,dtype,d,tnew,heads", _value_params())
def test_values(impl, dtype, d, tnew, heads, with_new):
    check(impl, *make_case(heads, tnew, d, dtype, with_new=with_new, seed=_seed(d, tnew, heads, with_new)))


@pytest.mark.parametrize("with_new", (True, False), ids=("new", "no_new"))
@pytest.mark.parametrize("heads", ("gqa", "mqa", "mha"))
@pytest.mark.parametrize("tnew", (1, 3, 17))
@pytest.mark.parametrize("dtype", (F64, F32), ids=_dt)
def test_reference_values(dtype, tnew, heads, with_new):
    # The reference (impl="torch") against loop_kvcache on ragged rows: an empty one, a
    # short one (without k_new its first queries see nothing), a full one, one between.
    seed = _seed("ref", tnew, heads, with_new)
    check("torch", *make_case(heads, tnew, 16, dtype, with_new=with_new, seed=seed))


@pytest.mark.parametrize("with_new", (True, False), ids=("new", "no_new"))
@pytest.mark.parametrize("dtype", (F16, BF16, F32, F64), ids=_dt)
def test_torch_impl_is_the_reference(dtype, with_new):
    # Dispatch: impl="torch" gives genkern.reference.kv_decode's output and cache writes
    # bit for bit, out in q's dtype, the default scale 1/sqrt(D).
    args = make_case("gqa", 3, 16, dtype, with_new=with_new, seed=_seed("is-ref", with_new))
    q, kc, vc, sl, kn, vn = (None if x is None else x.clone() for x in args)
    out = run_op("torch", q, kc, vc, sl, kn, vn)
    q2, kc2, vc2, sl2, kn2, vn2 = args
    want = reference.attention_with_kvcache(q2, kc2, vc2, sl2, kn2, vn2)
    assert out.dtype == dtype and torch.equal(out, want)
    assert_same_bits(kc, kc2, "k_cache")
    assert_same_bits(vc, vc2, "v_cache")


@pytest.mark.parametrize("with_new", (True, False), ids=("new", "no_new"))
@pytest.mark.parametrize("heads", ("gqa", "mqa", "mha"))
@pytest.mark.parametrize("tnew", (1, 3, 17))
@pytest.mark.parametrize("d", (16, 40, 64, 128))
@pytest.mark.parametrize("dtype", (F16, BF16), ids=_dt)
@pytest.mark.parametrize("impl", ("cpp",))
def test_low_precision(impl, dtype, d, tnew, heads, with_new):
    check(impl, *make_case(heads, tnew, d, dtype, with_new=with_new, seed=_seed("lp", d, tnew, heads, with_new)))


@pytest.mark.parametrize("scale", (0.3, 2.0))
@pytest.mark.parametrize("impl", IMPLS)
def test_scale(impl, scale):
    check(impl, *make_case("gqa", 3, 64, F32, seed=_seed("scale", scale)), scale=scale)


@pytest.mark.parametrize("impl", IMPLS)
def test_default_scale_is_inverse_sqrt_d(impl):
    args = make_case("gqa", 3, 64, F32, seed=5)
    a = run_op(impl, *[x.clone() for x in args])
    b = run_op(impl, *[x.clone() for x in args], scale=1 / 8)
    assert torch.equal(a, b)


@pytest.mark.parametrize("lengths", ([0, 0, 0, 0], [SMAX - 3] * 4, [5, 5, 5, 5]), ids=("all-empty", "all-full", "even"))
@pytest.mark.parametrize("impl", IMPLS)
def test_uniform_lengths(impl, lengths):
    check(impl, *make_case("gqa", 3, 16, F32, lengths=lengths, seed=_seed("uniform", lengths)))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_empty_without_new_gives_zeros(impl):
    q, kc, vc, sl, _, _ = make_case("gqa", 3, 16, F32, with_new=False, lengths=[0, 0, 0, 0], stale="nonfinite")
    out = run_op(impl, q, kc, vc, sl)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("impl", ("cpp",))
def test_long_cache(impl):
    # Lengths across several key blocks of a kernel (and an odd Smax).
    smax = 1025
    check(impl, *make_case("gqa", 3, 64, F32, lengths=[1000, 0, 513, smax - 3], smax=smax, seed=11))
    check(impl, *make_case("mqa", 1, 128, F32, lengths=[1024, 257, 0, 31], smax=smax, seed=12))


@pytest.mark.parametrize("impl", ("cpp",))
def test_threaded_kernel(impl):
    # More threads than rows and heads, and fewer: the work split must not change the
    # result beyond rounding, nor the cache writes at all.
    for threads in (3, 64):
        torch.set_num_threads(threads)
        for heads, tnew, d, dtype, with_new, smax in (
            ("gqa", 1, 64, F32, True, SMAX),
            ("mqa", 17, 16, F32, False, SMAX),
            ("gqa", 3, 128, F64, True, 300),
            ("gqa", 3, 64, BF16, True, 300),
        ):
            lengths = None if smax == SMAX else [299 - tnew, 0, 140, 7]
            check(
                impl,
                *make_case(
                    heads,
                    tnew,
                    d,
                    dtype,
                    with_new=with_new,
                    lengths=lengths,
                    smax=smax,
                    seed=_seed("threads", heads, tnew),
                ),
            )


# --- the in-place write, stale values, layouts -----------------------------------------------


@pytest.mark.parametrize("with_new", (True, False), ids=("new", "no_new"))
@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params(IMPLS))
def test_stale_nonfinite_never_reach_output(impl, dtype, with_new):
    # Output bits must not depend on what lies past each row's end: NaN/inf there
    # gives the same output, bit for bit, as zeros there.
    seed = _seed("stale", with_new)
    q, kc, vc, sl, kn, vn = make_case("gqa", 17, 64, dtype, with_new=with_new, seed=seed, stale="nonfinite")
    kc0, vc0 = kc.clone(), vc.clone()
    kc0[~torch.isfinite(kc0)] = 0
    vc0[~torch.isfinite(vc0)] = 0
    if dtype in (F32, F64):
        out = check(impl, q, kc, vc, sl, kn, vn)
    else:
        out = run_op(impl, q, kc, vc, sl, kn, vn)
        assert bool(torch.isfinite(out).all())
    out0 = run_op(impl, q, kc0, vc0, sl, kn, vn)
    assert_same_bits(out, out0, "out with stale NaN/inf vs stale zeros")


@pytest.mark.parametrize("impl", IMPLS)
def test_caches_as_layer_views_of_one_buffer(impl):
    # (2, L, B, Hkv, Smax, D): keys and values of every layer in one buffer, as a model keeps them.
    q, kc, vc, sl, kn, vn = make_case("gqa", 3, 32, F32, seed=21)
    buf = utils.randn((2, 3) + tuple(kc.shape), F32, seed=22)
    buf[0, 1], buf[1, 1] = kc, vc
    before = buf.clone()
    _, k_want, v_want = expected(q, kc, vc, sl, kn, vn)
    out = run_op(impl, q, buf[0, 1], buf[1, 1], sl, kn, vn)
    assert_out(impl, out, q, kc, vc, sl, kn, vn)
    want = before.clone()
    want[0, 1], want[1, 1] = k_want, v_want
    assert_same_bits(buf, want, "the buffer (only layer 1 of k and v may change)")


def _noncontiguous(t, layout):
    if layout == "bthd":  # (B, T, H, D) storage, as the model's projections produce it
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "d_strided":  # the head dim is not the unit stride
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "slice":  # every other head of a buffer with twice the heads
        buf = torch.full((t.shape[0], 2 * t.shape[1]) + tuple(t.shape[2:]), math.nan, dtype=t.dtype)
        buf[:, 1::2] = t
        return buf[:, 1::2]
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ("bthd", "d_strided", "slice"))
@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params(("cpp",), dtypes=(F32, BF16)))
def test_noncontiguous_q_and_new(impl, dtype, layout):
    args = make_case("gqa", 3, 32, dtype, seed=_seed("nc", layout))
    q, kc, vc, sl, kn, vn = args
    qn, knn, vnn = (_noncontiguous(x, layout) for x in (q, kn, vn))
    assert not any(x.is_contiguous() for x in (qn, knn, vnn))
    assert all(torch.equal(a, b) for a, b in ((q, qn), (kn, knn), (vn, vnn)))
    kc2, vc2 = kc.clone(), vc.clone()
    out = run_op(impl, q, kc, vc, sl, kn, vn)
    out_n = run_op(impl, qn, kc2, vc2, sl, knn, vnn)
    assert_same_bits(kc2, kc, "k_cache")
    assert_same_bits(vc2, vc, "v_cache")
    tol = dict(rtol=0, atol=0) if dtype == BF16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_n, out, **tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_caches_in_bshd_layout(impl):
    # Caches stored (B, Smax, Hkv, D) and viewed as (B, Hkv, Smax, D): last dim still unit-stride.
    q, kc, vc, sl, kn, vn = make_case("gqa", 3, 32, F32, seed=31)
    kt, vt = (c.transpose(1, 2).contiguous().transpose(1, 2) for c in (kc, vc))
    assert not kt.is_contiguous() and kt.stride(-1) == 1
    check(impl, q, kt, vt, sl, kn, vn)


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_steps_match_full_attention(impl):
    # Token by token through one cache equals causal attention over the whole sequence.
    b, (h, hkv), t, d = 2, HEADS["gqa"], 13, 16
    q = utils.randn((b, h, t, d), F32, seed=41, scale=2.0)
    k = utils.randn((b, hkv, t, d), F32, seed=42)
    v = utils.randn((b, hkv, t, d), F32, seed=43)
    kc, vc = torch.full((b, hkv, 16, d), math.nan), torch.full((b, hkv, 16, d), math.nan)
    sl = torch.zeros(b, dtype=I32)
    outs = []
    for i in range(t):
        outs.append(run_op(impl, q[:, :, i : i + 1], kc, vc, sl, k[:, :, i : i + 1], v[:, :, i : i + 1]))
        sl += 1
    want64 = ref_attention.attention(q.double(), k.double(), v.double(), True)
    want32 = ref_attention.attention(q, k, v, True)
    assert_close_rule(torch.cat(outs, dim=2), want64, want32)
    assert torch.equal(kc[:, :, :t], k) and torch.equal(vc[:, :, :t], v)


# --- errors --------------------------------------------------------------------------------


def _full_case():
    """Row 2 holds Smax - 3 positions: 3 new tokens fit exactly, 4 do not."""
    return make_case("gqa", 4, 16, F32, lengths=[0, 1, SMAX - 3, 5], seed=51)


@pytest.mark.parametrize("with_new", (True, False), ids=("new", "no_new"))
@pytest.mark.parametrize("impl", IMPLS)
def test_writing_past_smax_raises_before_writing(impl, with_new):
    q, kc, vc, sl, kn, vn = _full_case()
    if not with_new:
        sl, kn, vn = torch.tensor([0, 1, SMAX + 1, 5], dtype=I32), None, None
    kc0, vc0, sl0 = kc.clone(), vc.clone(), sl.clone()
    with pytest.raises(ValueError, match=r"the KV cache is full.*max_seq_len=40"):
        run_op(impl, q, kc, vc, sl, kn, vn)
    assert_same_bits(kc, kc0, "k_cache")
    assert_same_bits(vc, vc0, "v_cache")
    assert torch.equal(sl, sl0)


@pytest.mark.parametrize("impl", IMPLS)
def test_max_seqlen_bounds_the_lengths(impl):
    # A caller-known bound replaces the host read of cache_seqlens: the same results when
    # it holds, and the room check uses it (a bound past the real lengths can refuse).
    q, kc, vc, sl, kn, vn = make_case("gqa", 4, 16, F32, lengths=[0, 1, SMAX - 4, 5], seed=52)
    want = check(impl, q, kc.clone(), vc.clone(), sl, kn, vn)
    got = run_op(impl, q, kc.clone(), vc.clone(), sl, kn, vn, max_seqlen=SMAX - 4)
    assert torch.equal(got, want)
    kc3 = kc.clone()
    with pytest.raises(ValueError, match=r"a row of length 37 plus 4 new tokens exceeds max_seq_len=40"):
        run_op(impl, q, kc3, vc.clone(), torch.zeros_like(sl), kn, vn, max_seqlen=SMAX - 3)
    assert_same_bits(kc3, kc, "k_cache")
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match=r"^max_seqlen must be an int >= 0 or None"):
            run_op(impl, q, kc.clone(), vc.clone(), sl, kn, vn, max_seqlen=bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_negative_length_raises(impl):
    q, kc, vc, sl, kn, vn = _full_case()
    kc0 = kc.clone()
    with pytest.raises(ValueError, match=r"cache_seqlens must be >= 0"):
        run_op(impl, q, kc, vc, torch.tensor([0, -1, 3, 5], dtype=I32), kn, vn)
    assert_same_bits(kc, kc0, "k_cache")


def _bad_cases():
    q, kc, vc, sl, kn, vn = make_case("gqa", 3, 16, F32, seed=61)
    r = lambda *s: torch.randn(*s)  # noqa: E731
    return [
        ("seqlens-int64", dict(sl=sl.long()), TypeError, r"^cache_seqlens must be an int32 tensor, got torch.int64"),
        ("seqlens-float", dict(sl=sl.float()), TypeError, r"^cache_seqlens must be an int32 tensor"),
        ("seqlens-list", dict(sl=[0, 1, 2, 3]), TypeError, r"^cache_seqlens must be an int32 tensor, got list"),
        ("seqlens-shape", dict(sl=sl[:3]), ValueError, r"^cache_seqlens must have shape \(B,\) = \(4,\)"),
        ("seqlens-2d", dict(sl=sl[None]), ValueError, r"^cache_seqlens must have shape"),
        ("seqlens-device", dict(sl=torch.empty(4, dtype=I32, device="meta")), ValueError, r"^cache_seqlens is on meta"),
        ("k_new-only", dict(vn=None), ValueError, r"k_new and v_new must be given together"),
        ("v_new-only", dict(kn=None), ValueError, r"k_new and v_new must be given together"),
        (
            "k_new-shape",
            dict(kn=kn[:, :, :2]),
            ValueError,
            r"^k_new must have shape \(B, Hkv, Tnew, D\) = \(4, 2, 3, 16\)",
        ),
        ("v_new-heads", dict(vn=r(4, 1, 3, 16)), ValueError, r"^v_new must have shape"),
        ("k_new-dtype", dict(kn=kn.double()), TypeError, r"^k_new has dtype torch.float64 but q has torch.float32"),
        ("k_new-list", dict(kn=kn.tolist()), TypeError, r"^k_new must be a torch.Tensor, got list"),
        ("v_new-device", dict(vn=torch.empty(4, 2, 3, 16, device="meta")), ValueError, r"^v_new is on meta"),
        ("q-3d", dict(q=q[0]), ValueError, r"^q must be 4-d"),
        ("q-int", dict(q=q.long()), TypeError, r"^q must be float16, bfloat16, float32 or float64"),
        ("k_cache-3d", dict(kc=kc[0], vc=vc[0]), ValueError, r"^k_cache and v_cache must be \(B, Hkv, Smax, D\)"),
        ("cache-shapes", dict(vc=vc[:, :, :-1]), ValueError, r"^k_cache and v_cache must be .* of one shape"),
        ("cache-batch", dict(kc=kc[:3], vc=vc[:3]), ValueError, r"^k_cache must be \(B=4, Hkv, Smax, D=16\)"),
        ("cache-head-dim", dict(kc=r(4, 2, SMAX, 24), vc=r(4, 2, SMAX, 24)), ValueError, r"^k_cache must be \(B=4"),
        (
            "heads-not-multiple",
            dict(kc=r(4, 3, SMAX, 16), vc=r(4, 3, SMAX, 16)),
            ValueError,
            r"H=8 must be a multiple of the cache's heads Hkv=3",
        ),
        ("k_cache-dtype", dict(kc=kc.double(), vc=vc.double()), TypeError, r"^k_cache has dtype torch.float64"),
        ("v_cache-dtype", dict(vc=vc.half()), TypeError, r"^v_cache has dtype torch.float16"),
        ("k_cache-device", dict(kc=torch.empty(kc.shape, device="meta")), ValueError, r"^k_cache is on meta"),
        (
            "k_cache-strided-d",
            dict(kc=kc.transpose(-1, -2).contiguous().transpose(-1, -2)),
            ValueError,
            r"^k_cache must have a contiguous last dim",
        ),
        (
            "v_cache-strided-d",
            dict(vc=torch.randn(4, 2, SMAX, 32)[..., ::2]),
            ValueError,
            r"^v_cache must have a contiguous last dim",
        ),
        ("tnew-0", dict(q=q[:, :, :0], kn=kn[:, :, :0], vn=vn[:, :, :0]), ValueError, r"need B, Tnew, D, Smax >= 1"),
        (
            "batch-0",
            dict(q=q[:0], kc=kc[:0], vc=vc[:0], sl=sl[:0], kn=kn[:0], vn=vn[:0]),
            ValueError,
            r"need B, Tnew, D, Smax >= 1",
        ),
        (
            "smax-0",
            dict(kc=kc[:, :, :0], vc=vc[:, :, :0], sl=torch.zeros(4, dtype=I32)),
            ValueError,
            r"need B, Tnew, D, Smax >= 1",
        ),
        ("scale-nan", dict(scale=math.nan), ValueError, r"^scale must be finite"),
        ("scale-tensor", dict(scale=torch.tensor(0.5)), TypeError, r"^scale must be a Python float"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input(impl, case):
    _, kw, exc, match = case
    q, kc, vc, sl, kn, vn = make_case("gqa", 3, 16, F32, seed=61)
    a = dict(q=q, kc=kc, vc=vc, sl=sl, kn=kn, vn=vn, scale=None)
    a.update(kw)
    snapshot = [x.clone() for x in (a["kc"], a["vc"]) if x.device.type == "cpu"]
    with pytest.raises(exc, match=match):  # grad mode on, as by default (nothing requires grad)
        genkern.attention_with_kvcache(a["q"], a["kc"], a["vc"], a["sl"], a["kn"], a["vn"], scale=a["scale"], impl=impl)
    after = [x for x in (a["kc"], a["vc"]) if x.device.type == "cpu"]
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(after, snapshot)), "a cache was written"


def test_bogus_impl():
    with pytest.raises(ValueError, match="impl"):
        run_op("bogus", *make_case("gqa", 1, 16, F32))


@pytest.mark.parametrize("name", ("q", "k_cache", "v_cache", "k_new", "v_new"))
@pytest.mark.parametrize("impl", IMPLS)
def test_requires_grad_refused_with_grad_mode_on(impl, name):
    args = dict(zip(("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new"), make_case("gqa", 3, 16, F32)))
    args[name].requires_grad_()
    kc0 = args["k_cache"].detach().clone()
    with torch.enable_grad(), pytest.raises(RuntimeError, match=r"attention_with_kvcache has no backward"):
        genkern.attention_with_kvcache(**args, impl=impl)
    assert torch.equal(args["k_cache"].detach(), kc0)


@pytest.mark.parametrize("mode", ("no_grad", "inference_mode"))
@pytest.mark.parametrize("impl", IMPLS)
def test_requires_grad_fine_without_grad_mode(impl, mode):
    args = make_case("gqa", 3, 16, F32, seed=71)
    leaves = [x if x.dtype == I32 else x.clone().requires_grad_() for x in args]
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        out = genkern.attention_with_kvcache(*leaves, impl=impl)
    assert not out.requires_grad
    torch.testing.assert_close(out, run_op(impl, *make_case("gqa", 3, 16, F32, seed=71)), rtol=0, atol=0)


# --- the C++ op itself ---------------------------------------------------------------------


def _cpp_op():
    utils.require_impl("cpp")
    return torch.ops.genkern.kv_decode_cpp


@pytest.mark.parametrize("case", ("new-past-smax", "no-new-past-smax", "negative"))
def test_raw_cpp_op_checks_lengths(case):
    # torch.ops.genkern.kv_decode_cpp is public too: it checks every row's bound before
    # writing anything (a Python exception, never an out-of-bounds write).
    op = _cpp_op()
    q, kc, vc, sl, kn, vn = _full_case()  # 4 new tokens: row 2 (Smax - 3) overflows
    if case == "no-new-past-smax":
        sl, kn, vn = torch.tensor([0, 1, SMAX + 1, 5], dtype=I32), None, None
    elif case == "negative":
        sl = torch.tensor([0, -2, 3, 5], dtype=I32)
    kc0, vc0, sl0 = kc.clone(), vc.clone(), sl.clone()
    with pytest.raises((ValueError, RuntimeError)) as info:
        op(q, kc, vc, sl, kn, vn, 0.25)
    assert not isinstance(info.value, NotImplementedError), f"the C++ kernel is not registered: {info.value}"
    assert_same_bits(kc, kc0, "k_cache")
    assert_same_bits(vc, vc0, "v_cache")
    assert torch.equal(sl, sl0)


def _opcheck_samples():
    out = []
    for i, (heads, tnew, d, dtype, with_new) in enumerate(
        [
            ("gqa", 1, 16, F32, True),
            ("mqa", 3, 64, F32, False),
            ("gqa", 17, 16, F64, True),
            ("mha", 3, 32, F16, True),
            ("gqa", 3, 32, BF16, False),
        ]
    ):
        q, kc, vc, sl, kn, vn = make_case(heads, tnew, d, dtype, with_new=with_new, seed=80 + i)
        if i == 1:
            q = _noncontiguous(q, "bthd")
        out.append((q, kc, vc, sl, kn, vn, 1.0 / math.sqrt(d)))
    return out


def test_opcheck():
    op = _cpp_op().default
    for args in _opcheck_samples():
        # The op writes k_new/v_new into the caches: running it again writes the same
        # values, so opcheck's repeated calls see the same caches and results.
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_cpp():
    _cpp_op()
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return compile_fx(gm, example_inputs)

    def fn(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
        out = genkern.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, impl="cpp")
        return out.sin()

    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    args = make_case("gqa", 3, 32, F32, seed=91)
    results = []
    with torch.no_grad():
        for run in (fn, compiled):
            q, kc, vc, sl, kn, vn = (x.clone() for x in args)
            out = run(q, kc, vc, sl, kn, vn)
            results.append((out, kc, vc, sl))
    assert any("kv_decode_cpp" in g for g in graphs), "the compiled graph does not call the C++ kernel"
    for name, e, c in zip(("out", "k_cache", "v_cache", "cache_seqlens"), *results):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    _, k_want, v_want = expected(*args)
    assert_same_bits(results[1][1], k_want, "k_cache after the compiled call")
    assert_same_bits(results[1][2], v_want, "v_cache after the compiled call")
    # The bound is still checked before anything is written (a runtime assert of the graph).
    q, kc, vc, _, kn, vn = (x.clone() for x in args)
    kc0 = kc.clone()
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError)) as info:
        compiled(q, kc, vc, torch.tensor([0, 1, SMAX - 2, 5], dtype=I32), kn, vn)
    assert not isinstance(info.value, NotImplementedError), info.value
    assert_same_bits(kc, kc0, "k_cache after a refused compiled call")


# --- genkern.KVCache -----------------------------------------------------------------------


def test_kvcache_shapes():
    c = genkern.KVCache(3, 2, 4, 32, 16, dtype=F64)
    for buf in (c.k, c.v):
        assert buf.shape == (3, 2, 4, 32, 16) and buf.dtype == F64 and buf.device.type == "cpu"
        assert bool((buf == 0).all())
    assert c.seqlens.shape == (2,) and c.seqlens.dtype == I32 and bool((c.seqlens == 0).all())
    assert c.num_layers == 3 and c.batch_size == 2 and c.max_seq_len == 32
    assert c.nbytes == 2 * 3 * 2 * 4 * 32 * 16 * 8 + 2 * 4
    assert genkern.KVCache(1, 1, 1, 1, 1, dtype=BF16).nbytes == 2 * 2 + 4
    assert "KVCache(num_layers=3" in repr(c)


def test_kvcache_layer_views():
    c = genkern.KVCache(3, 2, 4, 32, 16)
    for i in (0, 2, -1, -3):
        k, v = c.layer(i)
        assert k.shape == v.shape == (2, 4, 32, 16)
        assert k.data_ptr() == c.k[i].data_ptr() and v.data_ptr() == c.v[i].data_ptr()
    k, _ = c.layer(1)
    k.fill_(1.0)  # a view: writes reach the buffer
    assert bool((c.k[1] == 1).all()) and bool((c.k[0] == 0).all()) and bool((c.k[2] == 0).all())
    for i in (3, -4):
        with pytest.raises(IndexError, match=f"layer {i} out of range for 3 layers"):
            c.layer(i)


@pytest.mark.parametrize("impl", IMPLS)
def test_kvcache_attend_and_advance(impl):
    # Two layers, a prefill of 5 tokens, then 3 single steps, then a chunk of 4: each
    # attend equals the op on the layer's views, and advance moves every row.
    layers, b, (h, hkv), smax, d = 2, 3, HEADS["gqa"], 16, 16
    c = genkern.KVCache(layers, b, hkv, smax, d)
    c.k.fill_(math.nan)  # stale everywhere: nothing unwritten may be read
    c.v.fill_(math.nan)
    k_mirror, v_mirror = c.k.clone(), c.v.clone()
    sl = torch.zeros(b, dtype=I32)
    for step, tnew in enumerate((5, 1, 1, 1, 4)):
        for i in range(layers):
            seed = _seed("kvc", step, i)
            q = utils.randn((b, h, tnew, d), F32, seed=seed, scale=2.0)
            kn = utils.randn((b, hkv, tnew, d), F32, seed=seed + 1)
            vn = utils.randn((b, hkv, tnew, d), F32, seed=seed + 2)
            with torch.no_grad():
                got = c.attend(i, q, kn, vn, impl=impl)
            want = run_op(impl, q, k_mirror[i], v_mirror[i], sl, kn, vn)
            assert torch.equal(got, want), f"step {step} layer {i}"
            assert_same_bits(c.k, k_mirror, "k")
            assert_same_bits(c.v, v_mirror, "v")
            assert torch.equal(c.seqlens, sl), "attend must not advance"
        c.advance(tnew)
        sl += tnew
        assert torch.equal(c.seqlens, sl) and c.seqlens.dtype == I32
    assert c.seqlens.tolist() == [12] * b


def test_kvcache_advance_per_row():
    c = genkern.KVCache(1, 3, 1, 10, 16)
    c.advance(torch.tensor([2, 0, 5]))
    assert c.seqlens.tolist() == [2, 0, 5] and c.seqlens.dtype == I32
    c.advance(torch.tensor([1, 3, 0], dtype=I32))
    assert c.seqlens.tolist() == [3, 3, 5]
    c.advance(2)
    assert c.seqlens.tolist() == [5, 5, 7]
    c.advance(torch.tensor([0, 0, 3]))  # row 2 is now full
    assert c.seqlens.tolist() == [5, 5, 10]
    # Row 2 is full: one more token there does not fit, and nothing is written.
    q = torch.randn(3, 1, 1, 16)
    kn = torch.randn(3, 1, 1, 16)
    k0 = c.k.clone()
    with torch.no_grad(), pytest.raises(ValueError, match="the KV cache is full"):
        c.attend(0, q, kn, kn.clone(), impl="torch")
    assert_same_bits(c.k, k0, "k")
    c.advance(-5)
    assert c.seqlens.tolist() == [0, 0, 5]
    with torch.no_grad():
        c.attend(0, q, kn, kn.clone(), impl="torch")  # fits again


@pytest.mark.parametrize(
    "n",
    (1, 7, torch.tensor([0, 8, 0]), torch.tensor([0, 0, 1]), -3, torch.tensor([0, -4, 0])),
    ids=("int-1", "int-7", "row-8", "row-1", "int-neg", "row-neg"),
)
def test_kvcache_advance_out_of_range_leaves_state(n):
    c = genkern.KVCache(1, 3, 1, 10, 16)
    c.advance(torch.tensor([2, 3, 10]))
    with pytest.raises(ValueError, match=r"leaves a row outside 0..max_seq_len=10"):
        c.advance(n)
    assert c.seqlens.tolist() == [2, 3, 10]
    # The host-side maximum is unchanged too: after freeing 3 positions of row 2, 3 new
    # tokens fit and 4 do not.
    c.advance(torch.tensor([0, 0, -3]))
    assert c.seqlens.tolist() == [2, 3, 7]
    r = lambda t: torch.randn(3, 1, t, 16)  # noqa: E731
    with torch.no_grad():
        c.attend(0, r(3), r(3), r(3), impl="torch")
        with pytest.raises(ValueError, match="the KV cache is full"):
            c.attend(0, r(4), r(4), r(4), impl="torch")


@pytest.mark.parametrize(
    "n,exc",
    (
        (1.0, TypeError),
        (True, TypeError),
        ("2", TypeError),
        (torch.tensor([1.0, 1.0, 1.0]), ValueError),
        (torch.tensor([1, 1]), ValueError),
        (torch.tensor(1), ValueError),
    ),
    ids=("float", "bool", "str", "float-tensor", "short-tensor", "0d-tensor"),
)
def test_kvcache_advance_bad_type(n, exc):
    c = genkern.KVCache(1, 3, 1, 10, 16)
    with pytest.raises(exc):
        c.advance(n)
    assert c.seqlens.tolist() == [0, 0, 0]


def test_kvcache_max_len():
    c = genkern.KVCache(1, 3, 1, 10, 16)
    assert c.max_len == 0
    c.advance(torch.tensor([2, 0, 5]))
    assert c.max_len == 5
    c.advance(3)
    assert c.max_len == 8
    c.advance(torch.tensor([0, 0, -6]))
    assert c.max_len == 5 and c.seqlens.tolist() == [5, 3, 2]
    with pytest.raises(AttributeError):
        c.max_len = 1  # read-only: the lengths move with advance and reset
    c.reset()
    assert c.max_len == 0


def test_kvcache_write():
    # write stores k_new/v_new where attend would, attends to nothing and keeps the lengths.
    b, hkv, smax, d = 3, 2, 12, 16
    c = genkern.KVCache(2, b, hkv, smax, d)
    c.advance(torch.tensor([0, 4, 7]))
    k_mirror, v_mirror = c.k.clone(), c.v.clone()
    kn = utils.randn((b, hkv, 5, d), F32, seed=81)
    vn = utils.randn((b, hkv, 5, d), F32, seed=82)
    c.write(1, kn, vn)
    reference.write_new(k_mirror[1], v_mirror[1], c.seqlens, kn, vn)
    assert_same_bits(c.k, k_mirror, "k")
    assert_same_bits(c.v, v_mirror, "v")
    assert c.seqlens.tolist() == [0, 4, 7] and c.max_len == 7
    with pytest.raises(ValueError, match=r"the KV cache is full: a row of length 7 plus 6 new tokens"):
        c.write(0, utils.randn((b, hkv, 6, d), F32, seed=83), utils.randn((b, hkv, 6, d), F32, seed=84))
    assert_same_bits(c.k, k_mirror, "k after a refused write")
    bad = [
        ((b, hkv + 1, 2, d), (b, hkv + 1, 2, d), ValueError, r"^k_new must have shape \(B=3, Hkv=2, Tnew, D=16\)"),
        ((b, hkv, 2, d), (b, hkv, 3, d), ValueError, r"^v_new must have shape"),
        ((b, hkv, 2), (b, hkv, 2), ValueError, r"^k_new must have shape"),
    ]
    for ks, vs, exc, match in bad:
        with pytest.raises(exc, match=match):
            c.write(0, torch.randn(ks), torch.randn(vs))
    with pytest.raises(TypeError, match=r"^v_new must be a floating-point tensor"):
        c.write(0, kn, torch.ones(kn.shape, dtype=torch.int64))
    with pytest.raises(IndexError, match="layer 2 out of range"):
        c.write(2, kn, vn)


def test_kvcache_reset():
    c = genkern.KVCache(2, 2, 1, 8, 16)
    c.advance(torch.tensor([8, 3]))
    ptrs = (c.k.data_ptr(), c.v.data_ptr())
    c.reset()
    assert c.seqlens.tolist() == [0, 0] and (c.k.data_ptr(), c.v.data_ptr()) == ptrs
    with torch.no_grad():  # the whole row fits again
        q = torch.randn(2, 1, 8, 16)
        c.attend(1, q, q.clone(), q.clone(), impl="torch")
    c.advance(8)
    assert c.seqlens.tolist() == [8, 8]


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(num_layers=0), ValueError, r"^num_layers must be a positive int, got 0"),
        (dict(batch_size=-1), ValueError, r"^batch_size must be a positive int"),
        (dict(num_kv_heads=2.0), ValueError, r"^num_kv_heads must be a positive int, got 2.0"),
        (dict(max_seq_len=True), ValueError, r"^max_seq_len must be a positive int, got True"),
        (dict(head_dim=None), ValueError, r"^head_dim must be a positive int"),
        (dict(dtype=torch.int32), TypeError, r"^dtype must be a floating torch.dtype"),
        (dict(dtype="float32"), TypeError, r"^dtype must be a floating torch.dtype"),
    ],
    ids=("layers-0", "batch-neg", "heads-float", "len-bool", "dim-none", "dtype-int", "dtype-str"),
)
def test_kvcache_bad_args(kw, exc, match):
    sizes = dict(num_layers=2, batch_size=2, num_kv_heads=1, max_seq_len=8, head_dim=16)
    dtype = kw.pop("dtype", F32)
    sizes.update(kw)
    with pytest.raises(exc, match=match):
        genkern.KVCache(**sizes, dtype=dtype)
