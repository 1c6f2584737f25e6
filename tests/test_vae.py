"""genkern.models.vae: config checks, shapes, the likelihoods against torch.distributions, the
importance-weighted bound, impl agreement, gradients, and a short learning check."""

from __future__ import annotations

import json
import math

import pytest
import torch

from genkern.models.vae import ELBO, VAE, VAEConfig
from utils import one_thread  # noqa: F401 (autouse fixture)

ARCHS = ("mlp", "conv")
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")
SHAPE = (2, 4, 6)  # two channels and a non-square image: catches a wrong reshape or permute


def _cfg(arch="mlp", likelihood="categorical", **kw):
    kw = {
        "data_shape": SHAPE,
        "arch": arch,
        "likelihood": likelihood,
        "levels": 5,
        "hidden": 16,
        "depth": 1,
        "latent_dim": 3,
        **kw,
    }
    return VAEConfig(**kw)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return VAE(_cfg(**kw))


def _x(n, cfg, seed=1):
    """Data on the model's support: levels / (levels - 1), {0, 1}, or real values."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *cfg.data_shape)
    if cfg.likelihood == "categorical":
        return torch.randint(0, cfg.levels, shape, generator=g).float() / (cfg.levels - 1)
    if cfg.likelihood == "bernoulli":
        return torch.randint(0, 2, shape, generator=g).float()
    return torch.randn(shape, generator=g)


def _zero_decoder(m):
    """Decoder output 0 whatever z is: uniform levels, p = 1/2, or mean 0 (and log-std 0)."""
    last = [mod for mod in m.decoder.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


# --- config ---------------------------------------------------------------------------


def test_config_round_trip():
    cfg = VAEConfig(data_shape=(1, 4, 4), likelihood="bernoulli", arch="conv", beta=0.5)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["data_shape"] == [1, 4, 4]
    assert VAEConfig.from_dict(d) == cfg
    assert VAEConfig.from_dict(d).data_shape == (1, 4, 4)


def test_config_defaults_are_the_digits_model():
    cfg = VAEConfig()
    assert (cfg.data_shape, cfg.likelihood, cfg.levels, cfg.arch) == ((1, 8, 8), "categorical", 17, "mlp")


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="'hiden'"):
        VAEConfig.from_dict({"hiden": 3})


@pytest.mark.parametrize(
    "field, value",
    [
        ("data_shape", ()),
        ("data_shape", (1, 0)),
        ("data_shape", "8x8"),
        ("likelihood", "poisson"),
        ("arch", "resnet"),
        ("impl", "cuda"),
        ("levels", 1),
        ("hidden", 0),
        ("depth", 0),
        ("latent_dim", 2.0),
        ("beta", -1.0),
        ("beta", float("nan")),
        ("levels", True),
    ],
)
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        VAEConfig(**{field: value})


def test_conv_config_needs_even_image_shape():
    with pytest.raises(ValueError, match="data_shape"):
        VAEConfig(arch="conv", data_shape=(1, 5, 4))
    with pytest.raises(ValueError, match="data_shape"):
        VAEConfig(arch="conv", data_shape=(64,))


# --- shapes and parts -------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_of_every_method(arch, likelihood):
    m = _model(arch=arch, likelihood=likelihood)
    x = _x(5, m.config)
    out = m(x)
    assert isinstance(out, ELBO)
    assert all(t.shape == () and torch.isfinite(t) for t in out)
    torch.testing.assert_close(out.loss, out.recon + m.config.beta * out.kl)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (5, 3)
    dec = m.decode(mu)
    assert dec.shape == ((5, 48, 5) if likelihood == "categorical" else (5, 48))
    assert m.sample(4, generator=torch.Generator().manual_seed(0)).shape == (4, *SHAPE)
    assert m.sample(0).shape == (0, *SHAPE)
    rec = m.reconstruct(x)
    assert rec.shape == x.shape
    ll = m.log_likelihood(x, 3, generator=torch.Generator().manual_seed(0))
    assert ll.shape == (5,) and ll.dtype == torch.float64 and torch.isfinite(ll).all()
    if likelihood != "gaussian":
        for t in (rec, m.sample(6)):
            assert 0 <= t.min() and t.max() <= 1
    if likelihood == "categorical":
        for t in (rec, m.sample(6)):  # on the grid of levels
            torch.testing.assert_close(t * 4, (t * 4).round())


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_loss_is_recon_plus_beta_kl(likelihood):
    x = _x(6, _cfg(likelihood=likelihood))
    eps = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    a = _model(likelihood=likelihood, beta=1.0)(x, eps)
    b = _model(likelihood=likelihood, beta=0.25)(x, eps)  # same weights (same seed), other beta
    torch.testing.assert_close(b.recon, a.recon)
    torch.testing.assert_close(b.kl, a.kl)
    torch.testing.assert_close(b.loss, a.recon + 0.25 * a.kl)
    assert a.kl > 0
    # The given eps is the noise used: the terms by hand.
    m = _model(likelihood=likelihood)
    mu, logvar = m.encode(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    torch.testing.assert_close(a.recon, -m.log_prob(x.reshape(6, -1), m.decode(z)).mean())
    torch.testing.assert_close(a.kl, (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(-1).mean())


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_log_prob_matches_torch_distributions(arch, likelihood):
    m = _model(arch=arch, likelihood=likelihood)
    with torch.no_grad():
        if m.log_std is not None:
            m.log_std.normal_(0, 0.5)
        x = _x(4, m.config)
        out = m.decode(torch.randn(4, 3))
        flat = x.reshape(4, -1)
        D = torch.distributions
        if likelihood == "categorical":
            ref = D.Categorical(logits=out).log_prob((flat * 4).round().long())
        elif likelihood == "bernoulli":
            ref = D.Bernoulli(logits=out).log_prob(flat)
        else:
            ref = D.Normal(out, m.log_std.exp()).log_prob(flat)
        torch.testing.assert_close(m.log_prob(flat, out), ref.sum(-1))


def test_untrained_categorical_model_is_near_uniform():
    # Untrained, the decoder's logits are small: about log2(levels) bits per dimension.
    torch.manual_seed(0)
    m = VAE(VAEConfig())  # the digits model: 17 levels of 64 pixels
    x = torch.randint(0, 17, (64, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 16
    bits = m(x).loss.item() / (64 * math.log(2))
    assert abs(bits - math.log2(17)) < 0.1
    bound = -m.log_likelihood(x, 50, generator=torch.Generator().manual_seed(0)).mean().item() / (64 * math.log(2))
    assert bound < bits  # K = 50 gives the tighter (lower) bits/dim


def test_categorical_sampling_follows_the_decoder():
    # Decoder logits fixed to one known vector: the sampled levels' frequencies match its softmax.
    torch.manual_seed(0)
    m = VAE(VAEConfig(data_shape=(4,), levels=3, hidden=8, depth=1, latent_dim=2))
    _zero_decoder(m)
    logits = torch.tensor([1.0, -0.5, 0.3])
    with torch.no_grad():
        m.decoder[-1].bias.copy_(logits.repeat(4))  # (D * levels,) laid out as (D, levels)
    x = m.sample(20000, generator=torch.Generator().manual_seed(0))  # (20000, 4)
    freq = torch.stack([(x * 2).round().eq(k).float().mean() for k in range(3)])
    torch.testing.assert_close(freq, logits.softmax(0), atol=0.015, rtol=0)
    y = m.sample(50, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, m.sample(50, generator=torch.Generator().manual_seed(1)), rtol=0, atol=0)


# --- the importance-weighted bound ---------------------------------------------------


def test_log_likelihood_is_exact_when_the_posterior_is_the_prior():
    # Decoder output 0 and encoder output 0: every weight p(x, z) / q(z | x) is (1/levels)^D,
    # whatever the noise, however the samples are chunked.
    m = _model(likelihood="categorical")
    _zero_decoder(m)
    with torch.no_grad():
        m.encoder[-1].weight.zero_()
        m.encoder[-1].bias.zero_()
    x = _x(5, m.config)
    exact = torch.full((5,), -48 * math.log(5), dtype=torch.float64)
    for k, bs in ((1, 4096), (7, 3), (7, 100), (64, 16)):
        torch.testing.assert_close(m.log_likelihood(x, k, batch_size=bs), exact, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(-m(x).loss.double(), exact.mean(), rtol=1e-6, atol=1e-5)


def test_log_likelihood_converges_to_log_px():
    # With the decoder output fixed, log p(x) = -D log(levels) exactly; the encoder's posterior is
    # off the prior, so the K = 1 bound sits about KL below it, the K = 20000 bound within its
    # Monte-Carlo error: the weights' relative spread is about sqrt(2 KL) = 0.4, so 0.4 / sqrt(K)
    # = 0.003 nats per example.
    m = _model(likelihood="categorical", seed=3)
    _zero_decoder(m)
    x = _x(8, m.config)
    log_px = -48 * math.log(5)
    kl = m(x).kl.item()
    assert kl > 0.05
    ll = m.log_likelihood(x, 20000, generator=torch.Generator().manual_seed(0), batch_size=40000)
    assert (ll - log_px).abs().max() < 0.015
    # K = 1: E[log p(z) - log q(z|x)] = -KL; averaged over each example drawn 500 times.
    ll1 = m.log_likelihood(x.repeat(500, 1, 1, 1), 1, generator=torch.Generator().manual_seed(0))
    se = ll1.std().item() / math.sqrt(ll1.numel())
    assert se < 0.2 * kl
    assert abs(ll1.mean().item() - (log_px - kl)) < 4 * se


@pytest.fixture(scope="module")
def trained():
    """A small Bernoulli VAE trained for a few hundred steps on 8 binary patterns (+ noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (module scope: set up before the per-test one_thread fixture)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2, (8, 1, 4, 4), generator=g).float()
    m = VAE(VAEConfig(data_shape=(1, 4, 4), likelihood="bernoulli", hidden=32, depth=1, latent_dim=4, impl="torch"))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        x = patterns[torch.randint(0, 8, (64,), generator=g)]
        flip = torch.rand(x.shape, generator=g) < 0.05
        out = m(torch.where(flip, 1 - x, x))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    torch.set_num_threads(threads)
    return m, patterns, losses


def test_learns_binary_patterns(trained):
    _, _, losses = trained
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert first > 10.0  # about 16 ln 2 = 11.1 nats untrained
    assert last < 0.6 * first


def test_k1_bound_matches_the_elbo_and_k100_is_tighter(trained):
    m, patterns, _ = trained
    x = patterns.repeat(256, 1, 1, 1)  # (2048, 1, 4, 4): every pattern 256 times
    with torch.no_grad():
        elbo_terms = torch.stack([-m(x).loss.double() for _ in range(20)])  # sampled ELBOs
    ll1 = m.log_likelihood(x, 1, generator=torch.Generator().manual_seed(0))
    # Both estimate the same expectation; the K=1 bound's Monte-Carlo error over 2048 examples:
    se = ll1.std().item() / math.sqrt(ll1.numel()) + elbo_terms.std().item() / math.sqrt(20)
    assert abs(ll1.mean().item() - elbo_terms.mean().item()) < 4 * se
    ll10 = m.log_likelihood(x, 10, generator=torch.Generator().manual_seed(1))
    ll100 = m.log_likelihood(x, 100, generator=torch.Generator().manual_seed(2), batch_size=1000)
    # The bound grows with K: paired per-example gains, far beyond their standard error.
    for lo, hi in ((ll1, ll10), (ll10, ll100)):
        gain = hi - lo
        assert gain.mean() > 5 * gain.std() / math.sqrt(gain.numel())


# --- impls and gradients --------------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_and_cpp_impls_agree_given_eps(arch, likelihood):
    a = _model(arch=arch, likelihood=likelihood, impl="torch")
    b = _model(arch=arch, likelihood=likelihood, impl="cpp")
    b.load_state_dict(a.state_dict())
    x = _x(7, a.config)
    eps = torch.randn(7, 3, generator=torch.Generator().manual_seed(5))
    la, lb = a(x, eps), b(x, eps)
    for ta, tb in zip(la, lb):
        torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)
    la.loss.backward()
    lb.loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_every_parameter(arch, likelihood):
    m = _model(arch=arch, likelihood=likelihood)
    m(_x(6, m.config)).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_eps_drawn_inside_follows_the_global_seed():
    m = _model()
    x = _x(4, m.config)
    torch.manual_seed(7)
    a = m(x).loss
    torch.manual_seed(7)
    torch.testing.assert_close(m(x).loss, a, rtol=0, atol=0)


def test_float64_model():
    m = _model(likelihood="gaussian").double()
    out = m(_x(3, m.config).double())
    assert out.loss.dtype == torch.float64
    assert m.log_likelihood(_x(3, m.config).double(), 4).dtype == torch.float64


# --- bad input ---------------------------------------------------------------------------


def test_bad_inputs():
    m = _model(likelihood="categorical")
    x = _x(3, m.config)
    with pytest.raises(ValueError, match=r"x must have shape \(N, 2, 4, 6\)"):
        m(x[:, :1])
    with pytest.raises(ValueError, match="x must have shape"):
        m(x[0])
    with pytest.raises(TypeError, match="x must be a floating"):
        m((x * 4).long())
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        m(x + 0.5)
    with pytest.raises(ValueError, match="x must lie"):
        m.log_likelihood(x - 1)
    with pytest.raises(ValueError, match="x must lie"):
        m(torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="eps"):
        m(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="num_samples"):
        m.log_likelihood(x, 0)
    with pytest.raises(ValueError, match="batch_size"):
        m.log_likelihood(x, 2, batch_size=0)
    with pytest.raises(ValueError, match="n must be"):
        m.sample(-1)
    with pytest.raises(TypeError, match="config"):
        VAE({"hidden": 3})
    g = _model(likelihood="gaussian")
    assert torch.isfinite(g(_x(3, g.config) * 10).loss)  # any real values for the Gaussian
