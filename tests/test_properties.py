"""Property-based tests (hypothesis): every C++ op against its float64 reference over drawn
shapes, strides, dtypes and values, with NaN/inf placement and masked positions.

Each property draws a case (a dict: shapes, dtype, layouts, a seed, and which special values go
where), builds the tensors from it and holds the op to the rule of DESIGN.md
(utils.assert_close_rule): error vs the float64 reference at most 2x the plain-PyTorch error in
the same dtype plus a small floor; where the rounded reference is inf or NaN, the op gives that
same value. Values are seeded normals at a drawn scale (so shrinking stays meaningful) with
special values placed by index: NaN, +-inf and huge finite values (the dtype's own: 1e14 and
3e38 in float32). Huge finite values in one tensor share one sign, so that no sum cancels them
(a cancelled float32 sum of 1e14 terms depends on the order of its terms in any impl).

The properties state the correct behaviour, where it is not written down elsewhere:
- a key a query must not see (causally masked, or past a cache row's length) does not change
  that query's output, whatever it holds;
- overlapping k_new/v_new with the cache they are written into either raises or acts as if
  they were copied first.

Reproducible and bounded: derandomize=True (the same examples every run, no example database),
deadline=None (a loaded machine is not a failure) and MAX_EXAMPLES examples per property.
A failure prints the minimal case hypothesis shrank it to.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import genkern
import utils
from genkern.reference import attention as ref_attention
from genkern.reference import gan_loss as ref_gan
from genkern.reference import kv_decode as ref_kv
from genkern.reference import reparam_kl as ref_reparam
from utils import assert_close_rule, one_thread  # noqa: F401 (autouse fixture)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F32, F64, F16, BF16)
HUGE = {F32: (1e14, 3e38), BF16: (1e14, 3e38), F16: (6e4,), F64: (1e14, 1e300)}
MAX_EXAMPLES = 60
SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # no "explain" phase: on a failure it reruns the op hundreds of times (minutes on 2 cores)
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    # one_thread is function scoped on purpose: one setting for all examples of a test.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
CPP = pytest.mark.parametrize("impl", ["cpp"])  # the conftest fixture fails the test if cpp is not built


# --- building tensors from a drawn case -------------------------------------------------------


def specials(dtype):
    """A strategy for (kind, [positions in [0, 1)]): one special value (NaN, +-inf, a huge finite
    value or none) at up to three flat positions. One kind per tensor, so that a NaN elsewhere
    never hides what a huge value does."""
    kinds = ["none", "nan", "inf", "-inf"] + [f"huge{i}" for i in range(len(HUGE[dtype]))]
    return st.tuples(st.sampled_from(kinds), st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=3))


def special_value(kind, dtype, sign=1.0):
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(kind) or sign * HUGE[dtype][int(kind[4:])]


def place(t, where, dtype, sign=1.0):
    """t (float64) with the special value of `where` = (kind, positions) placed at flat positions."""
    t = t.clone()
    flat = t.view(-1)
    kind, positions = where or ("none", [])
    if kind == "none" or flat.numel() == 0:
        return t
    for pos in positions:
        flat[int(pos * flat.numel())] = special_value(kind, dtype, sign)
    return t


def values(shape, dtype, seed, scale, where=(), sign=1.0):
    """Seeded N(0, scale^2) values of `shape` (float64) with specials placed, rounded to dtype."""
    return place(utils.randn(shape, F64, seed=seed, scale=scale), where, dtype, sign).to(dtype)


def laid_out(t, layout):
    """t's values in a drawn memory layout: contiguous, all dims reversed in memory, every other
    element of a wider buffer, or (4-d) stored as (B, T, H, D) and viewed as (B, H, T, D)."""
    if layout == "swap12" and t.dim() == 4:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout in ("transpose", "slice") and t.dim() >= 1 and t.numel() > 0:
        return utils.make_noncontiguous(t, layout)
    return t.contiguous()


LAYOUTS = st.sampled_from(["contiguous", "transpose", "slice", "swap12"])


def finite(*ts):
    return all(bool(torch.isfinite(t).all()) for t in ts if t is not None)


def grads_by_rule(outs, leaves, upstream, ref_fn, names):
    """Gradients of the op's `outs` w.r.t. `leaves` against those of ref_fn on float64 copies
    and on same-dtype copies (the rule); ref_fn(*leaves) returns the reference outputs."""
    got = torch.autograd.grad(outs, leaves, upstream, allow_unused=True, materialize_grads=True)
    l64 = [x.detach().double().requires_grad_() for x in leaves]
    ls = [x.detach().clone().requires_grad_() for x in leaves]
    o64, os_ = ref_fn(*l64), ref_fn(*ls)
    w64 = torch.autograd.grad(o64, l64, [u.double() for u in upstream], allow_unused=True, materialize_grads=True)
    ws = torch.autograd.grad(os_, ls, upstream, allow_unused=True, materialize_grads=True)
    for name, g, a, b in zip(names, got, w64, ws):
        assert_close_rule(g, a, b, name=f"grad {name}")


# --- reparameterize_kl --------------------------------------------------------------------------


@st.composite
def reparam_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))) + (draw(st.integers(1, 17)),)
    prior = draw(st.sampled_from(["none", "mu", "logvar", "both"]))
    return {
        "dtype": dtype,
        "shape": shape,
        "prior": prior,
        "prior_shape": draw(st.sampled_from(["full", "D", "scalar"])),
        "layout": draw(LAYOUTS),
        "seed": draw(st.integers(0, 2**16)),
        "scale": draw(st.sampled_from([0.01, 1.0, 4.0])),
        "special": draw(st.sampled_from(["mu", "logvar", "eps", "prior_mu", "prior_logvar"])),
        "where": draw(specials(dtype)),
        "sign": draw(st.sampled_from([1.0, -1.0])),
    }


def reparam_inputs(c):
    """mu, logvar, eps, prior_mu, prior_logvar of the case, in its dtype and layout."""
    shape, dtype, seed = c["shape"], c["dtype"], c["seed"]
    pshape = {"full": shape, "D": shape[-1:], "scalar": ()}[c["prior_shape"]]
    names = ("mu", "logvar", "eps", "prior_mu", "prior_logvar")
    wanted = {"mu", "logvar", "eps"} | {f"prior_{p}" for p in ("mu", "logvar") if c["prior"] in (p, "both")}
    out = {}
    for i, name in enumerate(names):
        if name not in wanted:
            out[name] = None
            continue
        where = c["where"] if name == c["special"] else ()
        t = values(pshape if name.startswith("prior") else shape, dtype, seed + i, c["scale"], where, c["sign"])
        out[name] = laid_out(t, c["layout"])
    return out


@CPP
@SETTINGS
@given(c=reparam_cases())
def test_reparameterize_kl(impl, c):
    x = reparam_inputs(c)
    leaves = [x[k].detach().requires_grad_() for k in x if x[k] is not None]
    names = [k for k in x if x[k] is not None]

    def run(fn, ts, **kw):
        a = dict(zip(names, ts))
        return fn(a["mu"], a["logvar"], a["eps"], prior_mu=a.get("prior_mu"), prior_logvar=a.get("prior_logvar"), **kw)

    z, kl = run(genkern.reparameterize_kl, leaves, impl=impl)
    z64, kl64 = run(ref_reparam.reparameterize_kl, [t.detach().double() for t in leaves])
    zs, kls = run(ref_reparam.reparameterize_kl, [t.detach() for t in leaves])
    assert_close_rule(z, z64, zs, name="z")
    assert_close_rule(kl, kl64, kls, name="kl")
    if finite(*leaves):
        up = [utils.randn(z.shape, z.dtype, seed=c["seed"] + 9), utils.randn(kl.shape, kl.dtype, seed=c["seed"] + 10)]
        grads_by_rule((z, kl), leaves, up, lambda *ts: run(ref_reparam.reparameterize_kl, ts), names)


# --- GAN losses ---------------------------------------------------------------------------------


@st.composite
def gan_cases(draw, dtype):
    side, kind = draw(st.sampled_from(["d", "g"])), draw(st.sampled_from(ref_gan.KINDS))
    reduction = draw(st.sampled_from(ref_gan.REDUCTIONS))
    shape = draw(st.sampled_from([(1,), (5,), (33,), (4, 1), (3, 1, 2, 3)]))
    other = shape if reduction == "none" else draw(st.sampled_from([shape, (7,), (2, 1, 3, 3)]))
    label = draw(st.sampled_from([1.0, 0.9])) if side == "d" and kind in ref_gan.LABEL_KINDS else 1.0
    return {
        "dtype": dtype,
        "side": side,
        "kind": kind,
        "reduction": reduction,
        "label": label,
        "real_shape": shape,
        "fake_shape": other,
        "layout": draw(LAYOUTS),
        "seed": draw(st.integers(0, 2**16)),
        "scale": draw(st.sampled_from([0.5, 2.0, 30.0])),
        "real_where": draw(specials(dtype)),
        "fake_where": draw(specials(dtype)),
        "signs": draw(st.sampled_from([(1.0, -1.0), (-1.0, 1.0), (1.0, 1.0), (-1.0, -1.0)])),
    }


def gan_call(c, real, fake, impl=None):
    """The case's loss on (real, fake): the op with `impl`, else the reference."""
    kind, reduction = c["kind"], c["reduction"]
    if c["side"] == "d":
        if impl is None:
            return ref_gan.discriminator_loss(real, fake, kind, reduction=reduction, real_label=c["label"])
        return genkern.discriminator_loss(real, fake, kind, reduction=reduction, real_label=c["label"], impl=impl)
    real = real if kind == "relativistic" else None
    if impl is None:
        return ref_gan.generator_loss(fake, kind, real_logits=real, reduction=reduction)
    return genkern.generator_loss(fake, kind, real_logits=real, reduction=reduction, impl=impl)


def gan_upstream(c, out, n):
    """Never ones: ~n for "mean" (O(1) gradients), as tests/test_gan_loss.py does."""
    if c["reduction"] == "none":
        g = utils.randn(out.shape, F64, seed=c["seed"] + 5)
        return torch.where(g.abs() < 0.05, 0.5, g).to(out.dtype)
    return torch.tensor(0.75 * (n if c["reduction"] == "mean" else 1), dtype=out.dtype)


@pytest.mark.parametrize("impl,dtype", utils.impl_dtype_params(("cpp", "triton")))
@SETTINGS
@given(data=st.data())
def test_gan_losses(impl, dtype, data):
    # One property per dtype (each its own examples): a special value's effect depends on the dtype.
    c = data.draw(gan_cases(dtype), label="case")
    rs, fs = c["signs"]
    real = laid_out(values(c["real_shape"], dtype, c["seed"], c["scale"], c["real_where"], rs), c["layout"])
    fake = laid_out(values(c["fake_shape"], dtype, c["seed"] + 1, c["scale"], c["fake_where"], fs), c["layout"])
    leaves = [real.detach().requires_grad_(), fake.detach().requires_grad_()]
    out = gan_call(c, *leaves, impl=impl)
    ref64 = gan_call(c, *(t.detach().double() for t in leaves))
    assert_close_rule(out, ref64, gan_call(c, *(t.detach() for t in leaves)), name="loss")
    up = gan_upstream(c, out, max(real.numel(), fake.numel()))
    grads_by_rule((out,), leaves, (up,), lambda r, f: gan_call(c, r, f), ("real", "fake"))


# --- flash_attention --------------------------------------------------------------------------

HEADS = st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3), (4, 1)])  # (H, Hkv): MHA, MQA, GQA
HEAD_DIMS = st.sampled_from([16, 24, 40, 64])
POISONS = st.sampled_from(["nan", "inf", "-inf", "huge0", "none"])


@st.composite
def attention_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    causal = draw(st.booleans())
    s = draw(st.integers(1, 40))
    return {
        "dtype": dtype,
        "b": draw(st.integers(1, 2)),
        "heads": draw(HEADS),
        "t": draw(st.integers(1, 40)),
        "s": s,
        "d": draw(HEAD_DIMS),
        "causal": causal,
        "layouts": tuple(draw(LAYOUTS) for _ in range(3)),
        "seed": draw(st.integers(0, 2**16)),
        "q_scale": draw(st.sampled_from([0.1, 1.0, 4.0])),
        # causal only: keys j >= cut hold one special value in K and one in V (the queries that
        # see none of them are checked against the clean inputs)
        "cut": draw(st.integers(0, s)) if causal else s,
        "k_poison": draw(POISONS),
        "v_poison": draw(POISONS),
    }


def attention_inputs(c):
    """Clean q, k, v (float64 values rounded to the dtype) and k, v with keys >= cut poisoned."""
    (h, hkv), dtype, seed = c["heads"], c["dtype"], c["seed"]
    q = values((c["b"], h, c["t"], c["d"]), dtype, seed, c["q_scale"])
    k = values((c["b"], hkv, c["s"], c["d"]), dtype, seed + 1, 1.0)
    v = values((c["b"], hkv, c["s"], c["d"]), dtype, seed + 2, 1.0)
    poisoned = [t.clone() for t in (k, v)]
    for t, kind in zip(poisoned, (c["k_poison"], c["v_poison"])):
        if kind != "none":
            t[:, :, c["cut"] :] = special_value(kind, dtype)
    return q, k, v, *poisoned


@CPP
@SETTINGS
@given(c=attention_cases())
def test_flash_attention(impl, c):
    q, k, v, kp, vp = attention_inputs(c)
    causal, t, s = c["causal"], c["t"], c["s"]
    leaves = [laid_out(x, lay).detach().requires_grad_() for x, lay in zip((q, kp, vp), c["layouts"])]
    out, lse = genkern.flash_attention(*leaves, causal=causal, return_lse=True, impl=impl)
    # Query i sees keys j <= i + S - T: the first `sees_clean` queries see no poisoned key.
    sees_clean = min(t, max(0, c["cut"] - (s - t))) if causal else t
    o64, l64 = ref_attention.attention(q.double(), k.double(), v.double(), causal, None, True)
    o_same, l_same = ref_attention.attention(q, k, v, causal, None, True)
    rows = slice(0, sees_clean)
    assert_close_rule(out[:, :, rows], o64[:, :, rows], o_same[:, :, rows], name="out (queries that see no poison)")
    assert_close_rule(lse[:, :, rows], l64[:, :, rows], l_same[:, :, rows], name="lse", absolute=q.dtype in (F32, F64))
    if (c["cut"] < s and c["k_poison"] + c["v_poison"] != "nonenone") or s == 1:
        return  # gradients: on clean inputs; S == 1 needs test_attention's own dk allowance
    g_out, g_lse = utils.randn(out.shape, q.dtype, seed=c["seed"] + 3), utils.randn(lse.shape, F32, seed=c["seed"] + 4)

    def ref(*ts):
        o, lse_ = ref_attention.attention(*ts, causal, None, True)
        return o, lse_

    got = torch.autograd.grad((out, lse), leaves, (g_out, g_lse))
    l64s = [x.detach().double().requires_grad_() for x in leaves]
    lss = [x.detach().clone().requires_grad_() for x in leaves]
    w64 = torch.autograd.grad(ref(*l64s), l64s, (g_out.double(), g_lse))
    ws = torch.autograd.grad(ref(*lss), lss, (g_out, g_lse))
    for name, g, a, b in zip(("dq", "dk", "dv"), got, w64, ws):
        assert_close_rule(g, a, b, name=name)


# --- attention_with_kvcache ---------------------------------------------------------------------


@st.composite
def kvcache_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    b, tnew, smax = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(5, 24))
    with_new = draw(st.booleans())
    room = smax - tnew if with_new else smax
    return {
        "dtype": dtype,
        "heads": draw(HEADS),
        "d": draw(HEAD_DIMS),
        "tnew": tnew,
        "smax": smax,
        "with_new": with_new,
        "lengths": draw(st.lists(st.integers(0, room), min_size=b, max_size=b)),
        "cache_layout": draw(st.sampled_from(["contiguous", "swap12", "padded"])),
        "q_layout": draw(LAYOUTS),
        "seed": draw(st.integers(0, 2**16)),
        "k_garbage": draw(POISONS),
        "v_garbage": draw(POISONS),
    }


def cache_view(t, layout):
    """A cache with a contiguous last dim: (B, Smax, Hkv, D) storage, or a slice of a longer one."""
    if layout == "swap12":
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "padded":
        buf = torch.zeros(t.shape[0], t.shape[1], t.shape[2] + 3, t.shape[3], dtype=t.dtype)
        buf[:, :, : t.shape[2]] = t
        return buf[:, :, : t.shape[2]]
    return t.clone()


def kvcache_inputs(c):
    """q, caches holding garbage at every position >= each row's length before the call, lengths, k/v_new."""
    (h, hkv), dtype, seed, d = c["heads"], c["dtype"], c["seed"], c["d"]
    b, tnew, smax = len(c["lengths"]), c["tnew"], c["smax"]
    q = laid_out(values((b, h, tnew, d), dtype, seed, 2.0), c["q_layout"])
    caches = []
    for i, kind in enumerate((c["k_garbage"], c["v_garbage"])):
        t = values((b, hkv, smax, d), dtype, seed + 1 + i, 1.0)
        for row, n in enumerate(c["lengths"]):
            if kind != "none":
                t[row, :, n:] = special_value(kind, dtype)
        caches.append(cache_view(t, c["cache_layout"]))
    new = [values((b, hkv, tnew, d), dtype, seed + 3 + i, 1.0) if c["with_new"] else None for i in range(2)]
    return q, *caches, torch.tensor(c["lengths"], dtype=torch.int32), *new


def kvcache_expected(q, k_cache, v_cache, lengths, k_new, v_new):
    """(out64, k_after, v_after): each row attends (float64 reference) to its filled slice only."""
    k_after, v_after = k_cache.clone(), v_cache.clone()
    out = torch.zeros(q.shape, dtype=F64)
    tnew = q.shape[2]
    for row, n in enumerate(lengths.tolist()):
        if k_new is not None:
            k_after[row, :, n : n + tnew], v_after[row, :, n : n + tnew] = k_new[row], v_new[row]
            n += tnew
        if n:
            kv = (x[row : row + 1, :, :n].double() for x in (k_after, v_after))
            out[row] = ref_attention.attention(q[row : row + 1].double(), *kv, True)[0]
    return out, k_after, v_after


def assert_same_bits(got, want, name):
    """Bitwise equal (NaN included): the cache writes are exact."""
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert bool(same.all()), f"{name}: {int((~same).sum())} elements differ, first at {(~same).nonzero()[0].tolist()}"


@CPP
@SETTINGS
@given(c=kvcache_cases())
def test_attention_with_kvcache(impl, c):
    q, kc, vc, lengths, k_new, v_new = kvcache_inputs(c)
    out64, k_want, v_want = kvcache_expected(q, kc, vc, lengths, k_new, v_new)
    kcs, vcs = kc.clone(), vc.clone()
    with torch.inference_mode():
        out = genkern.attention_with_kvcache(q, kc, vc, lengths, k_new, v_new, impl=impl)
        out_same = ref_kv.attention_with_kvcache(q, kcs, vcs, lengths.clone(), k_new, v_new)
    assert_same_bits(kc, k_want, "k_cache")
    assert_same_bits(vc, v_want, "v_cache")
    assert bool(torch.isfinite(out).all()), "garbage past a row's length reached the output"
    assert_close_rule(out, out64, out_same, name="out")


@st.composite
def overlap_cases(draw):
    smax, tnew = draw(st.integers(4, 24)), draw(st.integers(1, 4))
    length = draw(st.integers(0, smax - tnew))
    return {
        "dtype": draw(st.sampled_from([F32, F64])),
        "smax": smax,
        "tnew": tnew,
        "length": length,
        # k_new = the cache's own positions start .. start + tnew - 1 (overlapping the write or not)
        "start": draw(st.integers(0, smax - tnew)),
        "seed": draw(st.integers(0, 2**16)),
    }


@CPP
@SETTINGS
@given(c=overlap_cases())
def test_kvcache_new_overlapping_cache(impl, c):
    # k_new/v_new that are views of the cache they are written into: refused with an error that
    # leaves the cache as it was, or the result of copying them first.
    dtype, smax, tnew, start = c["dtype"], c["smax"], c["tnew"], c["start"]
    q = values((1, 2, tnew, 16), dtype, c["seed"], 1.0)
    kc, vc = (values((1, 1, smax, 16), dtype, c["seed"] + i, 1.0) for i in (1, 2))
    lengths = torch.tensor([c["length"]], dtype=torch.int32)
    k_new, v_new = kc[:, :, start : start + tnew], vc[:, :, start : start + tnew]
    out64, k_want, v_want = kvcache_expected(q, kc, vc, lengths, k_new.clone(), v_new.clone())
    k_before, v_before = kc.clone(), vc.clone()
    try:
        with torch.inference_mode():
            out = genkern.attention_with_kvcache(q, kc, vc, lengths, k_new, v_new, impl=impl)
    except (ValueError, RuntimeError):
        assert_same_bits(kc, k_before, "k_cache after a refusal")
        assert_same_bits(vc, v_before, "v_cache after a refusal")
        return
    assert_same_bits(kc, k_want, "k_cache")
    assert_same_bits(vc, v_want, "v_cache")
    out_same = ref_kv.attention_with_kvcache(q, k_before, v_before, lengths, k_new.clone(), v_new.clone())
    assert_close_rule(out, out64, out_same, name="out")
