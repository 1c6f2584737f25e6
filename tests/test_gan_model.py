"""genkern.models.gan: config checks, shapes, the losses against the ops, R1, spectral norm, EMA,
impl agreement, gradients, and a short learning check."""

from __future__ import annotations

import json

import pytest
import torch

import genkern
from genkern.models.gan import GAN, GANConfig
from genkern.reference.gan_loss import KINDS
from utils import one_thread  # noqa: F401 (autouse fixture)

ARCHS = ("mlp", "dcgan")
SHAPES = {"mlp": (3, 5), "dcgan": (2, 8, 12)}  # odd MLP shape; two channels, non-square image


def _cfg(arch="mlp", **kw):
    kw = {"data_shape": SHAPES[arch], "arch": arch, "latent_dim": 4, "hidden": 16, "depth": 2, **kw}
    return GANConfig(**kw)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return GAN(_cfg(**kw))


def _real(n, m, seed=1):
    return torch.rand(n, *m.config.data_shape, generator=torch.Generator().manual_seed(seed))


def _z(n, m, seed=2):
    return torch.randn(n, m.config.latent_dim, generator=torch.Generator().manual_seed(seed))


def _logits(m, x):
    with torch.no_grad():
        return m.discriminator(x)[:, 0]


# --- config ---------------------------------------------------------------------------


def test_config_round_trip():
    cfg = GANConfig(data_shape=(2,), output="linear", loss="hinge", spectral_norm=True, r1_gamma=1, ema_decay=0.9)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["data_shape"] == [2]
    back = GANConfig.from_dict(d)
    assert back == cfg and back.data_shape == (2,) and back.r1_gamma == 1.0


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="'gamma'"):
        GANConfig.from_dict({"gamma": 1.0})


@pytest.mark.parametrize(
    "field, value",
    [
        ("data_shape", ()),
        ("data_shape", (0, 2)),
        ("arch", "stylegan"),
        ("loss", "l2"),
        ("output", "relu"),
        ("impl", "gpu"),
        ("latent_dim", 0),
        ("hidden", -1),
        ("depth", 1.5),
        ("spectral_norm", 1),
        ("r1_gamma", -0.1),
        ("r1_gamma", float("inf")),
        ("ema_decay", 1.0),
        ("ema_decay", -0.5),
    ],
)
def test_config_rejects(field, value):
    with pytest.raises(ValueError, match=field):
        GANConfig(**{field: value})


def test_dcgan_config_needs_a_divisible_image():
    with pytest.raises(ValueError, match="data_shape"):
        GANConfig(arch="dcgan", data_shape=(1, 6, 8), depth=2)  # 6 is not a multiple of 4
    with pytest.raises(ValueError, match="data_shape"):
        GANConfig(arch="dcgan", data_shape=(64,))
    GANConfig(arch="dcgan", data_shape=(1, 6, 8), depth=1)


# --- shapes and losses --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_losses_of_every_kind_match_the_ops(arch, kind):
    m = _model(arch=arch, loss=kind, r1_gamma=0.0, ema_decay=0.0)
    real, z = _real(5, m), _z(5, m)
    fake = m.generator(z)
    assert fake.shape == (5, *m.config.data_shape)
    real_logits, fake_logits = _logits(m, real), _logits(m, fake)
    assert real_logits.shape == (5,)
    d = m("d", real, z)
    assert set(d) == {"loss", "d_loss"}
    want_d = genkern.discriminator_loss(real_logits, fake_logits, kind, impl="torch")
    torch.testing.assert_close(d["d_loss"], want_d)
    torch.testing.assert_close(d["loss"], d["d_loss"])
    g = m("g", real, z)
    assert set(g) == {"loss", "g_loss"}
    want_g = genkern.generator_loss(fake_logits, kind, real_logits=real_logits, impl="torch")
    torch.testing.assert_close(g["g_loss"], want_g)
    assert all(t.shape == () for t in (*d.values(), *g.values()))
    if kind != "relativistic":
        torch.testing.assert_close(m("g", z=z)["g_loss"], want_g)  # real is not needed


@pytest.mark.parametrize("output, low, high", [("sigmoid", 0, 1), ("tanh", -1, 1)])
@pytest.mark.parametrize("arch", ARCHS)
def test_sample_shapes_and_range(arch, output, low, high):
    m = _model(arch=arch, output=output)
    x = m.sample(7, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, *m.config.data_shape) and not x.requires_grad
    assert low <= x.min() and x.max() <= high
    torch.testing.assert_close(x, m.sample(7, generator=torch.Generator().manual_seed(0)), rtol=0, atol=0)
    z = _z(3, m)
    with torch.no_grad():
        torch.testing.assert_close(m.sample(3, z=z, ema=False), m.generator(z), rtol=0, atol=0)
        torch.testing.assert_close(m.sample(3, z=z), m.generator_ema(z), rtol=0, atol=0)
    assert m.sample(0).shape == (0, *m.config.data_shape)


def test_d_mode_runs_the_discriminator_once():
    m = _model(r1_gamma=1.0)
    calls = []
    m.discriminator.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    m("d", _real(5, m), _z(5, m))
    assert calls == [10]  # cat(real, fake)
    calls.clear()
    m("g", _real(5, m), _z(5, m))
    assert calls == [10]  # relativistic (the default): real and fake in one forward
    h = _model(loss="hinge")
    calls.clear()
    h.discriminator.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    h("g", _real(5, h), _z(5, h))
    assert calls == [5]  # the other kinds: fake only


# --- R1, spectral norm, EMA ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_r1_penalty(arch):
    m = _model(arch=arch, r1_gamma=2.5)
    real, z = _real(6, m), _z(6, m)
    out = m("d", real, z)
    assert set(out) == {"loss", "d_loss", "r1"}
    # By hand, example by example: gamma / 2 * mean ||grad_x D(x)||^2.
    norms = []
    for i in range(6):
        xi = real[i : i + 1].clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(m.discriminator(xi).sum(), xi)
        norms.append(gi.square().sum())
    want = 1.25 * torch.stack(norms).mean()
    assert out["r1"] > 0
    torch.testing.assert_close(out["r1"], want)
    torch.testing.assert_close(out["loss"], out["d_loss"] + out["r1"])
    # Differentiable: its own gradient reaches the discriminator's weights.
    grads = torch.autograd.grad(out["r1"], list(m.discriminator.parameters()), allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    out["loss"].backward()
    assert all(p.grad is None for p in m.generator.parameters())


def test_spectral_norm_on_every_discriminator_layer():
    for arch in ARCHS:
        m = _model(arch=arch, spectral_norm=True)
        layers = [mod for mod in m.discriminator.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
        assert layers and all(torch.nn.utils.parametrize.is_parametrized(mod, "weight") for mod in layers)
        assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in m.generator.modules())
        m("d", _real(4, m))["loss"].backward()  # trains through the parametrization
        for mod in layers:  # the power iteration keeps the largest singular value at about 1
            w = mod.weight.reshape(mod.weight.shape[0], -1)
            assert torch.linalg.matrix_norm(w, 2) < 1.3
        plain = _model(arch=arch)
        assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in plain.modules())


def test_ema_moves_toward_the_weights():
    m = _model(ema_decay=0.9)
    assert all(not p.requires_grad for p in m.generator_ema.parameters())
    with torch.no_grad():
        for p in m.generator.parameters():
            p.add_(1.0)
    before = [p.clone() for p in m.generator_ema.parameters()]
    m.generator.register_buffer("step", torch.tensor(3.0))
    m.generator_ema.register_buffer("step", torch.tensor(0.0))
    m.update_ema()
    for old, new, p in zip(before, m.generator_ema.parameters(), m.generator.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * p)
        assert (p - new).abs().max() < (p - old).abs().max()
    assert m.generator_ema.step.item() == 3.0  # buffers are copied
    m0 = _model(ema_decay=0.0)
    assert m0.generator_ema is None
    with pytest.raises(RuntimeError, match="ema_decay"):
        m0.update_ema()
    z = _z(3, m0)
    with torch.no_grad():
        torch.testing.assert_close(m0.sample(3, z=z), m0.generator(z))  # no EMA: the generator


# --- impls and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_torch_and_cpp_impls_agree(kind):
    a = _model(loss=kind, impl="torch", r1_gamma=0.5)
    b = _model(loss=kind, impl="cpp", r1_gamma=0.5)
    b.load_state_dict(a.state_dict())
    real, z = _real(6, a), _z(6, a)
    for mode in ("d", "g"):
        oa, ob = a(mode, real, z), b(mode, real, z)
        assert oa.keys() == ob.keys()
        for key in oa:
            torch.testing.assert_close(ob[key], oa[key], rtol=1e-5, atol=1e-6)
        oa["loss"].backward()
        ob["loss"].backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_reach_the_right_networks(arch):
    m = _model(arch=arch, loss="nonsaturating", spectral_norm=True, r1_gamma=1.0)
    m("d", _real(4, m), _z(4, m))["loss"].backward()
    for name, p in m.discriminator.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.generator.parameters())  # fake is G's output under no_grad
    m.zero_grad(set_to_none=True)
    m("g", _real(4, m), _z(4, m))["loss"].backward()
    for name, p in m.generator.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in m.generator_ema.parameters())


def test_training_steps_change_the_weights_and_the_discriminator_learns():
    m = _model(loss="nonsaturating", r1_gamma=0.0)
    real = _real(32, m) * 0.2 + 0.8  # bright data; the untrained generator gives about 0.5
    opt_d = torch.optim.Adam(m.discriminator.parameters(), lr=1e-2)
    opt_g = torch.optim.Adam(m.generator.parameters(), lr=1e-2)
    g_before = [p.clone() for p in m.generator.parameters()]
    d_before = [p.clone() for p in m.discriminator.parameters()]
    z = _z(32, m)
    first = m("d", real, z)["d_loss"].item()
    for _ in range(30):
        opt_d.zero_grad()
        m("d", real, z)["loss"].backward()
        opt_d.step()
    assert m("d", real, z)["d_loss"].item() < 0.5 * first
    g_first = m("g", real, z)["g_loss"].item()
    for _ in range(30):
        opt_g.zero_grad()
        m("g", real, z)["loss"].backward()
        opt_g.step()
        m.update_ema()
    assert m("g", real, z)["g_loss"].item() < g_first  # the generator fools the fixed discriminator more
    assert all(not torch.equal(a, b) for a, b in zip(g_before, m.generator.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(d_before, m.discriminator.parameters()))
    assert m.sample(64, ema=False).mean() > 0.6  # fakes moved toward the bright data


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs():
    m = _model()
    real, z = _real(4, m), _z(4, m)
    with pytest.raises(ValueError, match="mode"):
        m("x", real)
    with pytest.raises(ValueError, match="real"):
        m("d")
    with pytest.raises(ValueError, match=r"real must have shape \(N, 3, 5\)"):
        m("d", real[:, :2])
    with pytest.raises(ValueError, match="real must have shape"):
        m("d", real[:0])
    with pytest.raises(TypeError, match="real must be a floating"):
        m("d", real.long())
    with pytest.raises(ValueError, match=r"z must have shape \(4, 4\)"):
        m("d", real, z[:3])
    with pytest.raises(ValueError, match="z must have shape"):
        m("g", real, torch.randn(4, 5))
    with pytest.raises(ValueError, match="relativistic.*real"):
        m("g", z=z)  # the default loss reads the real logits too
    with pytest.raises(ValueError, match="z .* or real"):
        _model(loss="hinge")("g")
    with pytest.raises(ValueError, match=r"z must have shape \(3, 4\)"):
        m.sample(3, z=z)
    with pytest.raises(ValueError, match="n must be"):
        m.sample(-2)
    with pytest.raises(TypeError, match="config"):
        GAN(GANConfig().to_dict())
