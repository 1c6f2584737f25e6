"""genkern.nn.GaussianLatent: shapes, KL against the reference, learned prior, eval mode."""

from __future__ import annotations

import copy

import pytest
import torch

import genkern
import utils
from genkern.reference import reparam_kl as reference

IMPLS = utils.IMPLS


def _make(impl, in_features=10, latent_dim=4, **kw):
    torch.manual_seed(0)
    m = genkern.nn.GaussianLatent(in_features, latent_dim, impl=impl, **kw).to(utils.impl_device(impl))
    if m.prior_mu is not None:  # move the learned prior off its zero init
        with torch.no_grad():
            m.prior_mu.normal_(0, 0.5)
            m.prior_logvar.normal_(0, 0.5)
    return m


def _h(*shape, impl):
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g).to(utils.impl_device(impl))


@pytest.mark.parametrize("lead", [(8,), (2, 3), (1,)], ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_shapes(impl, lead):
    m = _make(impl)
    z, kl, mu, logvar = m(_h(*lead, 10, impl=impl))
    assert z.shape == mu.shape == logvar.shape == (*lead, 4)
    assert kl.shape == lead
    assert z.dtype == kl.dtype == torch.float32


@pytest.mark.parametrize("learn_prior", (False, True))
@pytest.mark.parametrize("impl", IMPLS)
def test_kl_and_z_match_reference(impl, learn_prior):
    m = _make(impl, learn_prior=learn_prior)
    device = utils.impl_device(impl)
    gen = torch.Generator(device=device).manual_seed(4)
    clone = utils.clone_generator(gen)
    z, kl, mu, logvar = m(_h(16, 10, impl=impl), generator=gen)
    pm, plv = m.prior_mu, m.prior_logvar
    kl64 = reference.kl_divergence(*utils.to64(mu, logvar, pm, plv))
    utils.assert_close_rule(kl, kl64, reference.kl_divergence(mu, logvar, pm, plv), name="kl")
    if impl == "torch":
        noise = torch.randn(mu.shape, dtype=mu.dtype, device=device, generator=clone)
        extra = None
    else:
        noise = utils.kernel_noise(utils.seed_like_op(clone, device), mu.shape, device)
        extra = utils.NOISE_ATOL * torch.exp(0.5 * logvar.double())
    z64, _ = reference.reparameterize_kl(mu.double(), logvar.double(), noise.double())
    z_same, _ = reference.reparameterize_kl(mu, logvar, noise)
    utils.assert_close_rule(z, z64, z_same, extra_atol=extra, name="z")


@pytest.mark.parametrize("impl", IMPLS)
def test_learned_prior_gets_gradients(impl):
    m = _make(impl, learn_prior=True)
    m_ref = copy.deepcopy(m)
    m_ref.impl = "torch"
    h = _h(12, 10, impl=impl)
    for mod in (m, m_ref):
        z, kl, _, _ = mod(h)
        kl.sum().backward()  # kl does not depend on the noise, so both impls agree
    for (name, p), p_ref in zip(m.named_parameters(), m_ref.parameters()):
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    # Through z as well (the noise path): the prior gets no gradient from z, the projection does.
    m.zero_grad()
    z, _, _, _ = m(h)
    z.square().sum().backward()
    assert m.prior_mu.grad is None or not m.prior_mu.grad.any()
    assert m.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_mode_returns_mean(impl):
    m = _make(impl, learn_prior=True)
    h = _h(5, 10, impl=impl)
    _, kl_train, _, _ = m(h)
    m.eval()
    z, kl, mu, logvar = m(h)
    assert torch.equal(z, mu)
    torch.testing.assert_close(kl, kl_train, rtol=1e-6, atol=1e-6)  # kl does not depend on the noise
    z_s, _, mu_s, _ = m(h, sample=True)
    assert (z_s != mu_s).all()
    m.train()
    z, _, mu, _ = m(h, sample=False)
    assert torch.equal(z, mu)


@pytest.mark.parametrize("impl", IMPLS)
def test_sample_in_eval(impl):
    m = _make(impl, sample_in_eval=True).eval()
    z, _, mu, _ = m(_h(5, 10, impl=impl))
    assert (z != mu).all()


def test_constructor_and_repr():
    with pytest.raises(ValueError, match="in_features"):
        genkern.nn.GaussianLatent(0, 3)
    with pytest.raises(ValueError, match="latent_dim"):
        genkern.nn.GaussianLatent(3, 0)
    m = genkern.nn.GaussianLatent(6, 3, learn_prior=True, impl="torch")
    assert "6 -> 3" in repr(m) and "learn_prior=True" in repr(m) and "'torch'" in repr(m)
    assert genkern.nn.GaussianLatent(6, 3).prior_mu is None


def test_bogus_impl_raises():
    m = genkern.nn.GaussianLatent(4, 2, impl="bogus")
    with pytest.raises(ValueError, match="impl"):
        m(torch.randn(3, 4))
