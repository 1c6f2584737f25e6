"""genkern.reparameterize_kl: the kernels against the float64 reference, the reference against formulas.

"Correct" for the cpp/triton impls is the rule of DESIGN.md: error vs the float64
reference at most 2x the error of the plain-PyTorch computation in the same dtype, plus
a small floor (utils.assert_close_rule). With eps=None their noise must be
reference.philox_normal(seed) for the seed the op draws from the generator.
impl="torch" is the reference itself, so it is checked against independently written
float64 formulas instead (the textbook Gaussian KL of torch.distributions, per-element
Python floats, hand-derived gradients): see "the spec against independent formulas".
"""

from __future__ import annotations

import itertools
import math
import textwrap

import pytest
import torch

import genkern
import utils
from genkern.reference import reparam_kl as reference
from utils import KERNEL_IMPLS, NOISE_ATOL, assert_close_rule, assert_matches_formula, impl_device, impl_dtype_params

# Every D in {1, 3, 127, 1000} with 0..3 batch dims; numel <= 4000 (the Triton interpreter is slow).
SHAPES = [
    (1,),
    (7, 1),
    (2, 3, 1),
    (2, 1, 3, 1),
    (3,),
    (113, 3),
    (2, 5, 3),
    (4, 1, 2, 3),
    (127,),
    (9, 127),
    (2, 3, 127),
    (1, 2, 2, 127),
    (1000,),
    (3, 1000),
    (2, 2, 1000),
    (1, 2, 2, 1000),
    (1025, 1),
    (1025, 3),
]
EMPTY_SHAPES = [(0, 5), (3, 0), (0,), (2, 0, 4), (0, 0)]
EPS_MODES = ("given", "none")


def _sid(shape):
    return "x".join(map(str, shape)) or "scalar"


def _op(impl, mu, logvar, eps=None, **kw):
    return genkern.reparameterize_kl(mu, logvar, eps, impl=impl, **kw)


def _randn_like(t, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(t.dtype).to(t.device)


def _noise_for(impl, shape, dtype, device, gen):
    """The noise the op will draw from `gen` (read from a clone, so gen is untouched).

    Returns (noise, from_kernel): torch.randn for the torch impl, the counter-based
    Philox noise of the seed the op draws for cpp/triton.
    """
    clone = utils.clone_generator(gen)
    if impl == "torch":
        return torch.randn(shape, dtype=dtype, device=device, generator=clone), False
    return utils.kernel_noise(utils.seed_like_op(clone, device), shape, device), True


# --- values and gradients ---------------------------------------------------------------


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS))
def test_values(impl, dtype, shape, eps_mode):
    mu, logvar = utils.make_inputs(shape, dtype, impl_device(impl))
    check_op(impl, mu, logvar, eps_mode=eps_mode, grads=False)


@pytest.mark.parametrize("eps_mode", ("given", "given_requires_grad", "none"))
@pytest.mark.parametrize("shape", [(3,), (4, 127), (2, 3, 5), (1025, 3)], ids=_sid)
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS))
def test_gradients(impl, dtype, shape, eps_mode):
    mu, logvar = utils.make_inputs(shape, dtype, impl_device(impl))
    check_op(
        impl,
        mu,
        logvar,
        eps_mode="none" if eps_mode == "none" else "given",
        eps_requires_grad=eps_mode == "given_requires_grad",
    )


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_sid)
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS, dtypes=(torch.float32, torch.float16)))
def test_empty(impl, dtype, shape, eps_mode):
    mu, logvar = utils.make_inputs(shape, dtype, impl_device(impl))
    z, kl = check_op(impl, mu, logvar, eps_mode=eps_mode)
    if shape[-1] == 0:  # an empty sum over D: kl is 0 for every row
        assert bool((kl == 0).all())


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("layout", ("transpose", "slice", "expand"))
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS))
def test_noncontiguous(impl, dtype, layout, eps_mode):
    # The noise index is the row-major index of the logical element, whatever the layout.
    shape = (6, 4, 9)
    mu, logvar = utils.make_inputs(shape, dtype, impl_device(impl))
    eps = _randn_like(mu, 7) if eps_mode == "given" else None
    pm, plv = _randn_like(mu, 8, 0.5), _randn_like(mu, 9, 0.5)
    nc = lambda t: None if t is None else utils.make_noncontiguous(t, layout)  # noqa: E731
    mu, logvar, eps, pm, plv = map(nc, (mu, logvar, eps, pm, plv))
    assert not mu.is_contiguous()
    check_op(
        impl, mu, logvar, eps_mode=eps_mode, eps=eps, prior_mu=pm, prior_logvar=plv, eps_requires_grad=eps is not None
    )


PRIOR_CASES = [("none", None)] + [
    (which, pshape) for which in ("mu", "logvar", "both") for pshape in ("D", "scalar", "full", "1xD")
]


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("which,pshape", PRIOR_CASES, ids=[f"{w}-{s}" for w, s in PRIOR_CASES])
@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS, (torch.float32, torch.float64, torch.bfloat16)))
def test_priors(impl, dtype, which, pshape, eps_mode):
    shape = (4, 3, 5)
    device = impl_device(impl)
    mu, logvar = utils.make_inputs(shape, dtype, device)
    full = {"D": shape[-1:], "scalar": (), "full": shape, "1xD": (1, shape[-1])}.get(pshape)
    g = torch.Generator().manual_seed(11)
    pm = (torch.randn(full, generator=g, dtype=torch.float64) * 0.7).to(dtype).to(device) if full is not None else None
    plv = (torch.randn(full, generator=g, dtype=torch.float64) * 0.7).to(dtype).to(device) if full is not None else None
    check_op(
        impl,
        mu,
        logvar,
        eps_mode=eps_mode,
        prior_mu=pm if which in ("mu", "both") else None,
        prior_logvar=plv if which in ("logvar", "both") else None,
    )


@pytest.mark.parametrize("impl,dtype", impl_dtype_params(KERNEL_IMPLS, dtypes=(torch.float16,)))
def test_priors_low_precision(impl, dtype):
    mu, logvar = utils.make_inputs((8, 33), dtype, impl_device(impl))
    pm, plv = _randn_like(mu[0], 3), _randn_like(mu[0], 4)
    for eps_mode in EPS_MODES:
        check_op(impl, mu, logvar, eps_mode=eps_mode, prior_mu=pm, prior_logvar=plv)


def _fixed_seed_fn(impl, eps_given, priors):
    """A function of the differentiable inputs only; every call draws the same seed."""

    def fn(mu, logvar, *rest):
        rest = list(rest)
        eps = rest.pop(0) if eps_given else None
        pm, plv = (rest[0], rest[1]) if priors else (None, None)
        gen = torch.Generator().manual_seed(2024)
        return genkern.reparameterize_kl(mu, logvar, eps, prior_mu=pm, prior_logvar=plv, generator=gen, impl=impl)

    return fn


@pytest.mark.parametrize("priors", (False, True), ids=("no_prior", "prior"))
@pytest.mark.parametrize("eps_given", (True, False), ids=("eps", "eps_none"))
@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_gradcheck(impl, eps_given, priors):
    g = torch.Generator().manual_seed(5)
    mk = lambda *s: (torch.randn(*s, generator=g, dtype=torch.float64) * 0.5).requires_grad_()  # noqa: E731
    inputs = [mk(3, 4), mk(3, 4)]
    if eps_given:
        inputs.append(mk(3, 4))
    if priors:
        inputs += [mk(4), mk(1, 4)]
    fn = _fixed_seed_fn(impl, eps_given, priors)
    z1, _ = fn(*inputs)
    z2, _ = fn(*inputs)
    assert torch.equal(z1, z2)  # the wrapper really fixes the noise
    assert torch.autograd.gradcheck(fn, inputs)


def test_torch_impl_default_generator_reproducible():
    mu, logvar = utils.make_inputs((5, 7), torch.float32)
    torch.manual_seed(17)
    z1, _ = genkern.reparameterize_kl(mu, logvar, impl="torch")
    torch.manual_seed(17)
    z2, _ = genkern.reparameterize_kl(mu, logvar, impl="torch")
    assert torch.equal(z1, z2)


@pytest.mark.parametrize("impl", utils.KERNEL_IMPLS)
def test_default_generator_seed(impl):
    # generator=None: the seed comes from torch's default generator (of mu's device).
    device = impl_device(impl)
    mu, logvar = utils.make_inputs((6, 5), torch.float32, device)
    torch.manual_seed(99)
    seed = utils.seed_like_op(None, device)
    torch.manual_seed(99)
    z, kl = genkern.reparameterize_kl(mu, logvar, impl=impl)
    noise = utils.kernel_noise(seed, mu.shape, device)
    z64, _ = reference.reparameterize_kl(mu.double(), logvar.double(), noise.double())
    z_same, _ = reference.reparameterize_kl(mu, logvar, noise)
    assert_close_rule(z, z64, z_same, extra_atol=NOISE_ATOL * torch.exp(0.5 * logvar.double()), name="z")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
def test_cpp_and_triton_draw_the_same_noise(dtype):
    utils.require_impl("cpp")
    utils.require_impl("triton")
    dev = impl_device("triton")
    mu, logvar = utils.make_inputs((3, 5, 7), dtype)
    seed = torch.tensor(0x1234_5678_9ABC_DEF, dtype=torch.int64)
    fwd = {f: getattr(torch.ops.genkern, f"reparam_kl_{f}_fwd").default for f in utils.KERNEL_IMPLS}
    z_cpp, kl_cpp = fwd["cpp"](mu, logvar, None, None, None, seed)
    z_tri, kl_tri = fwd["triton"](mu.to(dev), logvar.to(dev), None, None, None, seed.to(dev))
    std = torch.exp(0.5 * logvar.double())
    ulp = torch.finfo(dtype).eps
    z_c, z_t = z_cpp.double(), z_tri.double().cpu()
    # Each rounds its float32 z to dtype: at most an ulp apart, plus the noise rounding.
    assert bool(((z_c - z_t).abs() <= 2 * ulp * z_c.abs() + 2 * NOISE_ATOL * std + 1e-30).all())
    torch.testing.assert_close(kl_cpp.double(), kl_tri.double().cpu(), rtol=4 * ulp, atol=4 * ulp)
    # And both are the Philox noise of that seed.
    noise = utils.kernel_noise(int(seed), mu.shape)
    z64, _ = reference.reparameterize_kl(mu.double(), logvar.double(), noise.double())
    z_same, _ = reference.reparameterize_kl(mu, logvar, noise)
    assert_close_rule(z_cpp, z64, z_same, extra_atol=NOISE_ATOL * std, name="z cpp")
    assert_close_rule(z_tri, z64, z_same, extra_atol=NOISE_ATOL * std, name="z triton")


# --- noise statistics -------------------------------------------------------------------


def _stat_numel(impl):
    return 1 << 12 if (impl == "triton" and not utils.HAS_CUDA) else 1 << 20


@pytest.mark.parametrize("impl", utils.IMPLS)
def test_noise_statistics(impl):
    scipy_stats = pytest.importorskip("scipy.stats")
    n = _stat_numel(impl)
    rows, d = n // 64, 64
    device = impl_device(impl)
    mu = torch.zeros(rows, d, device=device)
    gen = torch.Generator(device=device).manual_seed(31337)
    z, kl = genkern.reparameterize_kl(mu, torch.zeros_like(mu), generator=gen, impl=impl)
    assert bool((kl == 0).all())
    x = z.double().cpu().flatten()
    sd = 1 / math.sqrt(n)  # standard error of a mean or a correlation of n N(0,1) draws
    # Bounds are 5 standard errors (two-sided p ~ 6e-7 for a correct generator); the seed is fixed.
    assert abs(x.mean().item()) < 5 * sd, f"mean {x.mean().item()}"
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2.0) * sd, f"variance {x.var().item()}"
    ks = scipy_stats.kstest(x.numpy(), "norm")
    assert ks.pvalue > 1e-4, f"KS vs N(0,1): statistic {ks.statistic}, p {ks.pvalue}"
    for lag in (1, 2, 4, d):  # within a Philox group, adjacent groups, adjacent rows
        r = torch.corrcoef(torch.stack([x[:-lag], x[lag:]]))[0, 1].item()
        assert abs(r) < 5 * sd, f"lag-{lag} correlation {r}"
    # Box-Muller pairs: the squared values of the two normals of a pair are uncorrelated too.
    r = torch.corrcoef(torch.stack([x[0::2] ** 2, x[1::2] ** 2]))[0, 1].item()
    assert abs(r) < 5 * math.sqrt(2) * sd, f"pair correlation of squares {r}"


@pytest.mark.parametrize("impl", utils.IMPLS)
def test_seeds(impl):
    device = impl_device(impl)
    mu, logvar = utils.make_inputs((16, 33), torch.float32, device)

    def draw(seed, gen=None):
        gen = gen or torch.Generator(device=device).manual_seed(seed)
        return genkern.reparameterize_kl(mu, logvar, generator=gen, impl=impl)[0]

    z1, z1b, z2 = draw(1), draw(1), draw(2)
    assert torch.equal(z1, z1b), "the same seed must give the same z"
    assert (z1 != z2).float().mean().item() > 0.99, "different seeds must give different noise"
    gen = torch.Generator(device=device).manual_seed(1)
    za, zb = draw(None, gen), draw(None, gen)
    assert torch.equal(za, z1)
    assert (za != zb).float().mean().item() > 0.99, "the generator must advance between calls"


# --- numerics ---------------------------------------------------------------------------


def _shuffled_linspace(lo, hi, shape, dtype, device, seed):
    n = math.prod(shape)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.linspace(lo, hi, n, dtype=torch.float64)[perm].view(shape).to(dtype).to(device)


def _extreme_logvar_cases(device):
    """(mu, logvar, prior_mu, prior_logvar) in float32 with log-variances over [-80, 80].

    The second case has a prior with extreme log-variance: t = (mu - prior_mu) * exp(-prior_logvar / 2)
    is squared after scaling, so kl fits even where (mu - prior_mu)^2 alone would overflow float32.
    """
    shape = (4, 41)
    logvar = _shuffled_linspace(-80, 80, shape, torch.float32, device, 1)
    mu = _randn_like(logvar, 2, 3.0)
    plv = _shuffled_linspace(-80, 80, shape, torch.float32, device, 3)
    lv = plv + _randn_like(plv, 4, 0.5)
    mu2 = torch.where(plv > 40, 1e20, 3.0).to(device) * _randn_like(plv, 5)
    return [(mu, logvar, None, None), (mu2, lv, torch.zeros_like(mu2), plv)]


def _float16_range_inputs(device):
    """logvar sorted across rows: rows of small logvar have a finite kl, rows up to 24 overflow
    float16 in kl (and in z where std * |eps| > 65504): there the result must be inf too."""
    shape = (16, 16)
    logvar = torch.linspace(-16, 24, 256, dtype=torch.float64).view(shape).to(torch.float16).to(device)
    return _shuffled_linspace(-60, 60, shape, torch.float16, device, 6), logvar


def check_op(
    impl,
    mu,
    logvar,
    *,
    eps_mode="given",
    prior_mu=None,
    prior_logvar=None,
    grads=True,
    eps_requires_grad=False,
    seed=1234,
    eps=None,
    gz_scale=1.0,
):
    """Runs the op once (forward and, with grads, backward) and checks everything against the reference."""
    device, dtype = mu.device, mu.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    if eps_mode == "given":
        eps = _randn_like(mu, seed + 1) if eps is None else eps
        noise, from_kernel = eps, False
    else:
        assert eps is None
        noise, from_kernel = _noise_for(impl, mu.shape, dtype, device, gen)

    named = {
        "mu": mu,
        "logvar": logvar,
        "prior_mu": prior_mu,
        "prior_logvar": prior_logvar,
        "eps": eps if eps_requires_grad else None,
    }
    leaves = {k: v.detach().requires_grad_(grads) for k, v in named.items() if v is not None}
    eps_in = leaves.get("eps", eps)
    z, kl = _op(
        impl,
        leaves["mu"],
        leaves["logvar"],
        eps_in,
        prior_mu=leaves.get("prior_mu"),
        prior_logvar=leaves.get("prior_logvar"),
        generator=gen,
    )

    assert z.shape == mu.shape and kl.shape == mu.shape[:-1]
    assert z.dtype == kl.dtype == dtype and z.device == kl.device == device

    def run_reference(ls, n):
        return reference.reparameterize_kl(
            ls["mu"], ls["logvar"], ls.get("eps", n), prior_mu=ls.get("prior_mu"), prior_logvar=ls.get("prior_logvar")
        )

    leaves64 = {k: v.detach().double().requires_grad_(grads) for k, v in leaves.items()}
    leaves_same = {k: v.detach().clone().requires_grad_(grads) for k, v in leaves.items()}
    z64, kl64 = run_reference(leaves64, noise.detach().double())
    z_same, kl_same = run_reference(leaves_same, noise.detach())

    std64 = torch.exp(0.5 * logvar.detach().double())
    noise_atol = NOISE_ATOL * std64 if from_kernel else None
    assert_close_rule(z, z64, z_same, extra_atol=noise_atol, name="z")
    assert_close_rule(kl, kl64, kl_same, name="kl")
    if not grads:
        return z, kl

    gz, gkl = _randn_like(z, seed + 2, gz_scale), _randn_like(kl, seed + 3, gz_scale)
    names = list(leaves)
    got = torch.autograd.grad((z, kl), [leaves[k] for k in names], (gz, gkl))
    want64 = torch.autograd.grad((z64, kl64), [leaves64[k] for k in names], (gz.double(), gkl.double()))
    want_same = torch.autograd.grad((z_same, kl_same), [leaves_same[k] for k in names], (gz, gkl))
    for k, g, w64, ws in zip(names, got, want64, want_same):
        assert g.shape == named[k].shape, f"grad of {k}: shape {tuple(g.shape)} != {tuple(named[k].shape)}"
        extra = None
        if k == "logvar" and from_kernel:  # d z / d logvar = std * noise / 2
            extra = NOISE_ATOL * 0.5 * std64 * gz.double().abs()
        assert_close_rule(g, w64, ws, extra_atol=extra, name=f"grad {k}")
    return z, kl


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_float32_extreme_logvar(impl, eps_mode):
    (mu, logvar, _, _), (mu2, lv, pm, plv) = _extreme_logvar_cases(impl_device(impl))
    check_op(impl, mu, logvar, eps_mode=eps_mode, eps_requires_grad=eps_mode == "given")
    check_op(impl, mu2, lv, eps_mode=eps_mode, prior_mu=pm, prior_logvar=plv)


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_float16_range(impl, eps_mode):
    mu, logvar = _float16_range_inputs(impl_device(impl))
    check_op(impl, mu, logvar, eps_mode=eps_mode, eps_requires_grad=eps_mode == "given", gz_scale=0.25)


@pytest.mark.parametrize("impl,dtype", impl_dtype_params(dtypes=(torch.float32, torch.float16)))
def test_nan_propagates(impl, dtype):
    device = impl_device(impl)
    mu, logvar = utils.make_inputs((4, 6), dtype, device)
    eps = _randn_like(mu, 1)
    for name in ("mu", "logvar", "eps"):
        args = {"mu": mu.clone(), "logvar": logvar.clone(), "eps": eps.clone()}
        args[name][1, 2] = float("nan")
        for e in (args["eps"], None) if name != "eps" else (args["eps"],):
            z, kl = _op(impl, args["mu"], args["logvar"], e)
            nan_z = torch.zeros(mu.shape, dtype=torch.bool)
            nan_z[1, 2] = True
            assert torch.equal(torch.isnan(z).cpu(), nan_z), f"NaN in {name}: z NaN pattern wrong"
            nan_kl = torch.tensor([False, name != "eps", False, False])
            assert torch.equal(torch.isnan(kl).cpu(), nan_kl), f"NaN in {name}: kl NaN pattern wrong"


# --- the spec against independent formulas ------------------------------------------------
# impl="torch" is genkern.reference: comparing it with the reference proves nothing. Here it
# meets float64 formulas written independently of its expm1(d) - d and scaled-t forms: the
# textbook Gaussian KL of torch.distributions, a per-element Python-float loop, and gradients
# derived by hand (utils.assert_matches_formula holds each dtype to its rounding).


def _or_zero(p):
    return torch.zeros((), dtype=torch.float64) if p is None else p.detach().double().cpu()


def _normal_kl64(mu, logvar, prior_mu=None, prior_logvar=None):
    """sum_D KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) by torch.distributions, float64."""
    mu, logvar = mu.detach().double().cpu(), logvar.detach().double().cpu()
    pm, plv = _or_zero(prior_mu).expand(mu.shape), _or_zero(prior_logvar).expand(mu.shape)
    post = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(pm, torch.exp(0.5 * plv))
    return torch.distributions.kl_divergence(post, prior).sum(-1)


def _grads64(mu, logvar, noise, prior_mu, prior_logvar, gz, gkl):
    """Hand-derived float64 gradients of sum(gz * z) + sum(gkl * kl) for every input (priors at their shapes).

    With v = exp(logvar), pv = exp(prior_logvar), diff = mu - prior_mu, z = mu + sqrt(v) * eps and
    kl = 1/2 sum_D(v / pv - 1 - log(v / pv) + diff^2 / pv):
    dz/dmu = 1, dz/dlogvar = sqrt(v) eps / 2, dz/deps = sqrt(v); dkl/dmu = diff / pv = -dkl/dprior_mu,
    dkl/dlogvar = (v / pv - 1) / 2, dkl/dprior_logvar = (1 - v / pv - diff^2 / pv) / 2.
    """
    mu, logvar, noise, gz = (t.detach().double().cpu() for t in (mu, logvar, noise, gz))
    gk = gkl.detach().double().cpu().unsqueeze(-1)
    pm, plv = _or_zero(prior_mu), _or_zero(prior_logvar)
    v, pv, diff = torch.exp(logvar), torch.exp(plv), mu - pm
    sigma = torch.sqrt(v)
    grads = {
        "mu": gz + gk * diff / pv,
        "logvar": gz * sigma * noise / 2 + gk * (v / pv - 1) / 2,
        "eps": gz * sigma,
        "prior_mu": -gk * diff / pv,
        "prior_logvar": gk * (1 - v / pv - diff * diff / pv) / 2,
    }
    for name, p in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if p is not None:  # a broadcast prior's gradient is the sum over the dims it was broadcast along
            grads[name] = grads[name].sum_to_size(p.shape) if p.dim() else grads[name].sum()
    return grads


def check_spec(mu, logvar, *, eps_mode="given", prior_mu=None, prior_logvar=None, seed=1234, gz_scale=1.0):
    """impl="torch" once, forward and backward, against _normal_kl64, mu + sqrt(exp(logvar)) * eps and _grads64.

    eps_mode "given": eps is an input (with a gradient); "none": the noise is torch.randn from the generator.
    """
    device, dtype = mu.device, mu.dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    if eps_mode == "given":
        eps = noise = _randn_like(mu, seed + 1)
    else:
        eps, noise = None, torch.randn(mu.shape, dtype=dtype, device=device, generator=utils.clone_generator(gen))
    named = {"mu": mu, "logvar": logvar, "eps": eps, "prior_mu": prior_mu, "prior_logvar": prior_logvar}
    leaves = {k: v.detach().requires_grad_() for k, v in named.items() if v is not None}
    z, kl = _op(
        "torch",
        leaves["mu"],
        leaves["logvar"],
        leaves.get("eps"),
        prior_mu=leaves.get("prior_mu"),
        prior_logvar=leaves.get("prior_logvar"),
        generator=gen,
    )
    assert z.shape == mu.shape and kl.shape == mu.shape[:-1]
    assert z.dtype == kl.dtype == dtype and z.device == kl.device == device
    mu64, lv64 = mu.double().cpu(), logvar.double().cpu()
    assert_matches_formula(z, mu64 + torch.sqrt(torch.exp(lv64)) * noise.double().cpu(), name="z")
    assert_matches_formula(kl, _normal_kl64(mu, logvar, prior_mu, prior_logvar), name="kl")

    gz, gkl = _randn_like(z, seed + 2, gz_scale), _randn_like(kl, seed + 3, gz_scale)
    got = torch.autograd.grad((z, kl), list(leaves.values()), (gz, gkl))
    want = _grads64(mu, logvar, noise, prior_mu, prior_logvar, gz, gkl)
    for (k, x), g in zip(leaves.items(), got):
        assert g.shape == x.shape and g.dtype == dtype, f"grad of {k}: {tuple(g.shape)} {g.dtype}"
        assert_matches_formula(g, want[k], name=f"grad {k}")
    return z, kl


SPEC_DTYPES = [pytest.param(dt, id=str(dt).replace("torch.", "")) for dt in utils.ALL_DTYPES]


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("dtype", SPEC_DTYPES)
def test_spec_values_and_grads(dtype, shape, eps_mode):
    mu, logvar = utils.make_inputs(shape, dtype)
    check_spec(mu, logvar, eps_mode=eps_mode)


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("which,pshape", PRIOR_CASES, ids=[f"{w}-{s}" for w, s in PRIOR_CASES])
@pytest.mark.parametrize("dtype", SPEC_DTYPES)
def test_spec_priors(dtype, which, pshape, eps_mode):
    # Priors given alone or together, broadcast from (D,), (), (1, D) or given in full.
    shape = (4, 3, 5)
    mu, logvar = utils.make_inputs(shape, dtype)
    full = {"D": shape[-1:], "scalar": (), "full": shape, "1xD": (1, shape[-1])}.get(pshape)
    pm = utils.randn(full, dtype, seed=11, scale=0.7) if which in ("mu", "both") else None
    plv = utils.randn(full, dtype, seed=12, scale=0.7) if which in ("logvar", "both") else None
    check_spec(mu, logvar, eps_mode=eps_mode, prior_mu=pm, prior_logvar=plv)


@pytest.mark.parametrize("layout", ("transpose", "slice", "expand"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("float32", "float16"))
def test_spec_noncontiguous(dtype, layout):
    mu, logvar = utils.make_inputs((6, 4, 9), dtype)
    pm, plv = _randn_like(mu, 8, 0.5), _randn_like(mu, 9, 0.5)
    nc = lambda t: utils.make_noncontiguous(t, layout)  # noqa: E731
    for eps_mode in EPS_MODES:
        check_spec(nc(mu), nc(logvar), eps_mode=eps_mode, prior_mu=nc(pm), prior_logvar=nc(plv))


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_sid)
def test_spec_empty(shape):
    for dtype in (torch.float32, torch.float16):
        mu, logvar = utils.make_inputs(shape, dtype)
        for eps_mode in EPS_MODES:
            _, kl = check_spec(mu, logvar, eps_mode=eps_mode)
            assert shape[-1] != 0 or bool((kl == 0).all())  # an empty sum over D: kl is 0 for every row


def test_spec_extremes():
    # float32 log-variances over [-80, 80] (priors included), float16 up to overflow (inf where the formula is).
    for mu, logvar, pm, plv in _extreme_logvar_cases("cpu"):
        for eps_mode in EPS_MODES:
            check_spec(mu, logvar, eps_mode=eps_mode, prior_mu=pm, prior_logvar=plv)
    mu, logvar = _float16_range_inputs("cpu")
    for eps_mode in EPS_MODES:
        check_spec(mu, logvar, eps_mode=eps_mode, gz_scale=0.25)


def test_spec_per_element_python_floats():
    # KL and z element by element in Python floats (math.exp, math.log), broadcast priors included.
    mu, logvar = utils.make_inputs((2, 3, 4), torch.float64, logvar_scale=2.0)
    eps = _randn_like(mu, 1)
    priors = [(None, None), (_randn_like(mu[0, 0], 2), None), (None, _randn_like(mu[:1, :1], 3))]
    priors += [(_randn_like(mu[0, :1], 4), _randn_like(mu[0, 0, 0], 5)), (_randn_like(mu, 6), _randn_like(mu, 7))]
    for pm, plv in priors:
        z, kl = genkern.reparameterize_kl(mu, logvar, eps, prior_mu=pm, prior_logvar=plv, impl="torch")
        pm_full, plv_full = _or_zero(pm).expand(mu.shape), _or_zero(plv).expand(mu.shape)
        for i, j in itertools.product(range(2), range(3)):
            want_kl = 0.0
            for k in range(4):
                m, lv, p, q = (float(t[i, j, k]) for t in (mu, logvar, pm_full, plv_full))
                var, pvar = math.exp(lv), math.exp(q)
                want_kl += 0.5 * (var / pvar - 1.0 - math.log(var / pvar) + (m - p) ** 2 / pvar)
                assert float(z[i, j, k]) == pytest.approx(
                    m + math.sqrt(var) * float(eps[i, j, k]), rel=1e-14, abs=1e-14
                )
            assert float(kl[i, j]) == pytest.approx(want_kl, rel=1e-12, abs=1e-14), (i, j)


@pytest.mark.parametrize("dtype", SPEC_DTYPES)
def test_spec_standard_prior_is_the_zero_prior(dtype):
    # The standard prior skips the zero passes: the same values and gradients as explicit zero priors.
    mu, logvar = utils.make_inputs((5, 33), dtype)
    zero = torch.zeros(33, dtype=dtype)
    outs = []
    for pm, plv in ((None, None), (zero, zero), (zero, None), (None, zero)):
        leaves = [mu.clone().requires_grad_(), logvar.clone().requires_grad_()]
        kl = genkern.reparameterize_kl(*leaves, _randn_like(mu, 1), prior_mu=pm, prior_logvar=plv, impl="torch")[1]
        outs.append([kl, *torch.autograd.grad(kl, leaves, _randn_like(kl, 2))])
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# --- bad input --------------------------------------------------------------------------


def _bad_cases():
    f32 = lambda *s: torch.randn(*s)  # noqa: E731
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    return [
        ("logvar-shape", dict(mu=f32(3, 4), logvar=f32(3, 5)), ValueError, "logvar"),
        ("logvar-rank", dict(mu=f32(3, 4), logvar=f32(12)), ValueError, "logvar"),
        ("prior_mu-nobroadcast", dict(prior_mu=f32(5)), ValueError, "prior_mu"),
        ("prior_logvar-nobroadcast", dict(prior_logvar=f32(2, 1)), ValueError, "prior_logvar"),
        ("prior_mu-too-big", dict(prior_mu=f32(2, 3, 4)), ValueError, "prior_mu"),
        ("logvar-dtype", dict(logvar=f32(3, 4).double()), TypeError, "logvar"),
        ("eps-dtype", dict(eps=f32(3, 4).half()), TypeError, "eps"),
        ("prior_logvar-dtype", dict(prior_logvar=f32(4).double()), TypeError, "prior_logvar"),
        ("logvar-device", dict(logvar=meta(3, 4)), ValueError, "logvar"),
        ("eps-device", dict(eps=meta(3, 4)), ValueError, "eps"),
        ("prior_mu-device", dict(prior_mu=meta(4)), ValueError, "prior_mu"),
        (
            "mu-int",
            dict(mu=torch.ones(3, 4, dtype=torch.int64), logvar=torch.ones(3, 4, dtype=torch.int64)),
            TypeError,
            "mu",
        ),
        ("logvar-int", dict(logvar=torch.ones(3, 4, dtype=torch.int32)), TypeError, "logvar"),
        ("mu-bool", dict(mu=torch.ones(3, 4, dtype=torch.bool)), TypeError, "mu"),
        ("mu-complex", dict(mu=torch.ones(3, 4, dtype=torch.complex64)), TypeError, "mu"),
        ("eps-shape", dict(eps=f32(4, 3)), ValueError, "eps"),
        ("eps-broadcastable", dict(eps=f32(4)), ValueError, "eps"),
        ("mu-0d", dict(mu=torch.tensor(1.0), logvar=torch.tensor(0.0)), ValueError, "mu"),
        ("mu-list", dict(mu=[[1.0, 2.0]], logvar=f32(1, 2)), TypeError, "mu"),
        ("logvar-float", dict(mu=f32(1), logvar=0.0), TypeError, "logvar"),
        ("eps-list", dict(eps=[[0.0] * 4] * 3), TypeError, "eps"),
        ("prior_mu-float", dict(prior_mu=0.5), TypeError, "prior_mu"),
    ]


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
@pytest.mark.parametrize("impl", utils.IMPLS)
def test_bad_input(impl, case):
    _, kw, exc, name = case
    args = dict(mu=torch.randn(3, 4), logvar=torch.randn(3, 4), eps=None, prior_mu=None, prior_logvar=None)
    args.update(kw)
    dev = impl_device(impl)
    args = {k: v.to(dev) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v for k, v in args.items()}
    with pytest.raises(exc, match=rf"^{name}\b"):
        genkern.reparameterize_kl(
            args["mu"],
            args["logvar"],
            args["eps"],
            prior_mu=args["prior_mu"],
            prior_logvar=args["prior_logvar"],
            impl=impl,
        )


def test_bogus_impl():
    mu = torch.randn(2, 3)
    with pytest.raises(ValueError, match="impl"):
        genkern.reparameterize_kl(mu, mu, impl="bogus")


def test_triton_float64_unavailable():
    utils.require_impl("triton")
    mu = torch.randn(2, 3, dtype=torch.float64, device=impl_device("triton"))
    with pytest.raises(genkern.ImplUnavailableError, match="float64"):
        genkern.reparameterize_kl(mu, mu, impl="triton")


def test_cpp_on_meta_unavailable():
    utils.require_impl("cpp")
    mu = torch.empty(2, 3, device="meta")
    with pytest.raises(genkern.ImplUnavailableError, match="CPU"):
        genkern.reparameterize_kl(mu, mu, impl="cpp")


_UNAVAILABLE = textwrap.dedent("""
    import torch, genkern
    mu = torch.randn(2, 3)
    try:
        genkern.reparameterize_kl(mu, mu, impl={impl!r})
    except genkern.ImplUnavailableError as e:
        print("UNAVAILABLE:", e)
""")


@pytest.mark.skipif(utils.HAS_CUDA, reason="the interpreter-less CPU case; on a GPU CPU tensors are refused anyway")
def test_triton_without_interpreter_unavailable():
    utils.require_impl("triton")  # with the interpreter: only the missing interpreter makes it unavailable
    r = utils.run_python(_UNAVAILABLE.format(impl="triton"), {"TRITON_INTERPRET": None})
    assert r.returncode == 0, r.stderr
    assert "UNAVAILABLE:" in r.stdout and "TRITON_INTERPRET" in r.stdout, r.stdout + r.stderr


def test_cpp_disabled_unavailable():
    r = utils.run_python(_UNAVAILABLE.format(impl="cpp"), {"GENKERN_DISABLE_CPP": "1"})
    assert r.returncode == 0, r.stderr
    assert "UNAVAILABLE:" in r.stdout and "GENKERN_DISABLE_CPP" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("impl", utils.KERNEL_IMPLS)
def test_raw_op_checks_arguments(impl):
    # torch.ops.genkern.* are public too: the kernels check before touching memory.
    dev = impl_device(impl)
    fwd = getattr(torch.ops.genkern, f"reparam_kl_{impl}_fwd").default
    mu = torch.randn(3, 4, device=dev)
    seed = torch.tensor(3, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match="logvar"):
        fwd(mu, torch.randn(3, 5, device=dev), None, None, None, seed)
    with pytest.raises(ValueError, match="eps"):
        fwd(mu, mu, torch.randn(4, 3, device=dev), None, None, None)
    with pytest.raises(TypeError, match="logvar"):
        fwd(mu, mu.double(), None, None, None, seed)
    with pytest.raises((ValueError, RuntimeError)):  # neither eps nor seed
        fwd(mu, mu, None, None, None, None)
    with pytest.raises((ValueError, RuntimeError)):  # only one prior
        fwd(mu, mu, None, mu, None, seed)


# --- opcheck and torch.compile ------------------------------------------------------------


def _opcheck_samples(device, dtype):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, rg=False: torch.randn(s, generator=g).to(dtype).to(device).requires_grad_(rg)  # noqa: E731
    seed = torch.tensor(12345, dtype=torch.int64, device=device)
    d = 5
    fwd = [
        (mk(4, d), mk(4, d), mk(4, d), None, None, None),
        (mk(4, d, rg=True), mk(4, d, rg=True), mk(4, d, rg=True), None, None, None),
        (mk(2, 3, d, rg=True), mk(2, 3, d, rg=True), None, None, None, seed),
        (mk(3, d, rg=True), mk(3, d, rg=True), None, mk(d, rg=True).expand(3, d), mk(1, d).expand(3, d), seed),
        (mk(3, d), mk(3, d), mk(3, d), mk(3, d, rg=True), mk(3, d, rg=True), None),
        (mk(d, 3).t(), mk(d, 3).t(), None, None, None, seed),
        (mk(7), mk(7), None, None, None, seed),
    ]
    bwd = []
    for mu, lv, eps, pm, plv, s in fwd:
        mu, lv = mu.detach(), lv.detach()
        det = lambda t: None if t is None else t.detach()  # noqa: E731
        bwd.append((mk(*mu.shape), mk(*mu.shape[:-1]), mu, lv, det(eps), det(pm), det(plv), s))
    return fwd, bwd


@pytest.mark.parametrize("impl,dtype", impl_dtype_params(utils.KERNEL_IMPLS, dtypes=(torch.float32, torch.float16)))
def test_opcheck(impl, dtype):
    fwd_samples, bwd_samples = _opcheck_samples(impl_device(impl), dtype)
    fwd = getattr(torch.ops.genkern, f"reparam_kl_{impl}_fwd").default  # the kernel op, differentiable
    bwd = getattr(torch.ops.genkern, f"reparam_kl_{impl}_bwd").default
    detach = lambda args: tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)  # noqa: E731
    for args in fwd_samples:
        torch.library.opcheck(fwd, args)
        torch.library.opcheck(fwd, detach(args))
    for args in bwd_samples:
        torch.library.opcheck(bwd, args)


def test_torch_compile_fullgraph_cpp():
    utils.require_impl("cpp")
    torch._dynamo.reset()

    def f_noise(mu, logvar, prior_mu, prior_logvar):
        z, kl = genkern.reparameterize_kl(mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar, impl="cpp")
        return z * 2, kl.sum()

    def f_eps(mu, logvar, eps):
        z, kl = genkern.reparameterize_kl(mu, logvar, eps, impl="cpp")
        return z + 1, kl

    mu, logvar = utils.make_inputs((6, 13), torch.float32)
    eps = _randn_like(mu, 3)
    pm, plv = _randn_like(mu[0], 4), _randn_like(mu[:1], 5)
    for fn, args in ((f_noise, (mu, logvar, pm, plv)), (f_eps, (mu, logvar, eps))):
        compiled = torch.compile(fn, fullgraph=True)
        results = []
        for run in (fn, compiled):
            leaves = [a.detach().clone().requires_grad_() for a in args]
            torch.manual_seed(123)
            out = run(*leaves)
            sum(o.sum() for o in out).backward()
            results.append((out, [a.grad for a in leaves]))
        (eager, eager_g), (comp, comp_g) = results
        for e, c in zip(eager, comp):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)
        for e, c in zip(eager_g, comp_g):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


# --- GPU (Triton on CUDA) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("shape", [(4096, 64), (333, 1000), (7, 3, 4097), (65537, 1)], ids=_sid)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_triton_large(dtype, shape, eps_mode):
    utils.require_impl("triton")
    mu, logvar = utils.make_inputs(shape, dtype, "cuda")
    pm, plv = _randn_like(mu[..., :1, :], 1, 0.5), _randn_like(mu[..., :1, :], 2, 0.5)
    check_op("triton", mu, logvar, eps_mode=eps_mode, prior_mu=pm, prior_logvar=plv)


@pytest.mark.gpu
def test_gpu_auto_is_triton_and_matches_philox():
    utils.require_impl("triton")
    assert utils.resolve("auto", "cuda", torch.float32) == "triton"
    mu, logvar = utils.make_inputs((64, 127), torch.float32, "cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    seed = utils.seed_like_op(utils.clone_generator(gen), "cuda")
    z, _ = genkern.reparameterize_kl(mu, logvar, generator=gen)
    noise = utils.kernel_noise(seed, mu.shape, "cuda")
    z64, _ = reference.reparameterize_kl(mu.double(), logvar.double(), noise.double())
    z_same, _ = reference.reparameterize_kl(mu, logvar, noise)
    assert_close_rule(z, z64, z_same, extra_atol=NOISE_ATOL * torch.exp(0.5 * logvar.double()), name="z")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_gpu_opcheck(dtype):
    utils.require_impl("triton")
    fwd_samples, bwd_samples = _opcheck_samples("cuda", dtype)
    for args in fwd_samples:
        torch.library.opcheck(torch.ops.genkern.reparam_kl_triton_fwd.default, args)
    for args in bwd_samples:
        torch.library.opcheck(torch.ops.genkern.reparam_kl_triton_bwd.default, args)


@pytest.mark.parametrize("impl", utils.KERNEL_IMPLS)
def test_double_backward_is_refused(impl):
    # The fused backward's outputs carry no graph: a second derivative would be silently
    # wrong, so create_graph=True must raise. First-order gradients stay available.
    device = impl_device(impl)
    mu, logvar = (t.requires_grad_() for t in utils.make_inputs((3, 5), torch.float32, device))
    z, kl = genkern.reparameterize_kl(mu, logvar, torch.randn(3, 5, device=device), impl=impl)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(kl.sum(), mu, create_graph=True)
    (g_mu,) = torch.autograd.grad(kl.sum(), mu)
    assert torch.allclose(g_mu, mu.detach(), atol=1e-6)  # d/dmu of the standard-prior KL is mu
