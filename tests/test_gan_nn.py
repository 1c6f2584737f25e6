"""genkern.nn.GANLoss: its methods against the functional ops, its checks, and a small GAN that trains alike
with the plain-PyTorch impl and the fast one."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import genkern
import utils
from genkern.nn import GANLoss
from genkern.reference.gan_loss import KINDS, LABEL_KINDS


def _logits(shape, seed, device="cpu"):
    return utils.randn(shape, torch.float32, device, seed=seed, scale=2.0)


@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", utils.IMPLS)
def test_methods_match_the_ops(impl, kind, reduction):
    device = utils.impl_device(impl)
    label = 0.9 if kind in LABEL_KINDS else 1.0
    m = GANLoss(kind, reduction=reduction, real_label=label, impl=impl)
    real, fake = _logits((6, 1), 1, device), _logits((6, 1), 2, device)
    d = genkern.discriminator_loss(real, fake, kind, reduction=reduction, real_label=label, impl=impl)
    g = genkern.generator_loss(fake, kind, real_logits=real, reduction=reduction, impl=impl)
    torch.testing.assert_close(m.discriminator(real, fake), d, rtol=0, atol=0)
    torch.testing.assert_close(m(real, fake), d, rtol=0, atol=0)  # calling the module is .discriminator
    torch.testing.assert_close(m.generator(fake, real), g, rtol=0, atol=0)
    if kind != "relativistic":
        torch.testing.assert_close(m.generator(fake), g, rtol=0, atol=0)
    else:
        with pytest.raises(ValueError, match="real_logits"):
            m.generator(fake)


def test_defaults_and_repr():
    m = GANLoss()
    assert (m.kind, m.reduction, m.real_label, m.impl) == ("nonsaturating", "mean", 1.0, "auto")
    r = repr(GANLoss("minimax", reduction="sum", real_label=0.9, impl="torch"))
    assert r.startswith("GANLoss(") and all(s in r for s in ("'minimax'", "'sum'", "0.9", "'torch'")), r
    assert list(m.parameters()) == [] and m.state_dict() == {}  # holds settings, no state


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(kind="vanilla"), "kind"),
        (dict(kind="Hinge"), "kind"),
        (dict(reduction="avg"), "reduction"),
        (dict(kind="hinge", real_label=0.9), "real_label"),
        (dict(kind="relativistic", real_label=0.8), "real_label"),
    ],
)
def test_bad_settings(kw, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        GANLoss(**kw)


def test_bad_kind_lists_the_kinds():
    with pytest.raises(ValueError) as info:
        GANLoss("vanilla")
    assert all(k in str(info.value) for k in KINDS)


def test_bad_impl_raises_on_call():
    m = GANLoss(impl="bogus")
    x = torch.randn(3)
    with pytest.raises(ValueError, match="impl"):
        m(x, x)


# --- a small GAN on a 2-D Gaussian mixture ----------------------------------------------


def _mixture(n, gen):
    """n points of 8 Gaussians (std 0.05) on the unit circle."""
    k = torch.randint(0, 8, (n,), generator=gen)
    angle = k.double() * (2 * math.pi / 8)
    centers = torch.stack([angle.cos(), angle.sin()], dim=1)  # (n, 2)
    return (centers + 0.05 * torch.randn(n, 2, generator=gen, dtype=torch.float64)).float()


def _mlp(d_in, d_out, hidden=32):
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, hidden),
        nn.LeakyReLU(0.2),
        nn.Linear(hidden, d_out),
    )


def _train(impl, kind, steps=6, batch=64, seed=0):
    """Alternating D and G SGD steps; returns [(d_loss, g_loss) per step] and the final D output."""
    device = utils.impl_device(impl)
    torch.manual_seed(seed)
    G, D = _mlp(2, 2).to(device), _mlp(2, 1).to(device)
    # SGD, not Adam: Adam's first steps are ~lr * sign(grad), which turns rounding noise in a zero
    # gradient (D's output bias under the relativistic loss, which cancels it) into a full step.
    opt_g = torch.optim.SGD(G.parameters(), lr=0.05, momentum=0.5)
    opt_d = torch.optim.SGD(D.parameters(), lr=0.05, momentum=0.5)
    crit = GANLoss(kind, real_label=0.9 if kind in LABEL_KINDS else 1.0, impl=impl)
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    for _ in range(steps):
        x = _mixture(batch, gen).to(device)  # (B, 2)
        z = torch.randn(batch, 2, generator=gen).to(device)
        # discriminator step: fake samples detached from G
        d_loss = crit.discriminator(D(x), D(G(z).detach()))  # logits (B, 1)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        # generator step (the relativistic loss also needs the real logits)
        g_loss = crit.generator(D(G(z)), D(x))
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
        history.append((d_loss.item(), g_loss.item()))
    probe = torch.linspace(-1, 1, 10).view(5, 2).to(device)
    return history, D(probe).detach().cpu(), G(probe).detach().cpu()


@pytest.mark.parametrize("kind", ("nonsaturating", "relativistic", "hinge", "least_squares"))
@pytest.mark.parametrize("impl", utils.KERNEL_IMPLS)
def test_gan_training_matches_torch_step_by_step(impl, kind):
    want, d_want, g_want = _train("torch", kind)
    got, d_got, g_got = _train(impl, kind)
    for step, (w, g) in enumerate(zip(want, got)):
        assert all(math.isfinite(v) for v in g), f"step {step}: {g}"
        torch.testing.assert_close(
            torch.tensor(g),
            torch.tensor(w),
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f"{kind} step {step} (d_loss, g_loss): {m}",
        )
    torch.testing.assert_close(d_got, d_want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)
    assert len({round(d, 6) for d, _ in got}) > 1  # the losses move: the models really train
