"""The benchmarks' plain-PyTorch baseline of each op: what a competent PyTorch user writes for speed.

Every speed ratio of `genkern bench` (impl "torch") and of the bench/ suite is measured
against these functions, and COMPILE is torch.compile of them. They are not the spec:
genkern.reference stays the clear, float64-safe definition the kernels are tested against
(tests/test_bench.py checks each baseline against it). A baseline does only the work the
problem needs in eager mode: no zero passes, no copies of K/V, masks applied in place,
scalars applied to the smallest tensor. Each function says in one line why it is fair.

They compute in the inputs' dtype (torch's own kernels accumulate half precision in float32)
and cover what the bench cases run: "mean" GAN losses, attention with T <= S when causal,
a decoding step that appends its new keys/values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --- reparameterize_kl --------------------------------------------------------------------


def reparameterize_kl(mu, logvar, prior_mu=None, prior_logvar=None):
    """(z, kl) of mu, logvar (B, D): z (B, D), kl (B,); noise from torch.randn_like.

    Fair: z in one fused multiply-add, the standard prior's KL without zero priors (exp(lv) - 1 - lv
    + mu^2; measured no slower than the expm1 form), the 1/2 applied to the (B,) sums; a given
    prior takes the general formula, written plainly.
    """
    z = torch.addcmul(mu, torch.exp(0.5 * logvar), torch.randn_like(mu))
    if prior_mu is None and prior_logvar is None:
        return z, 0.5 * (torch.exp(logvar) - 1 - logvar + mu * mu).sum(-1)
    d = logvar if prior_logvar is None else logvar - prior_logvar
    t = mu if prior_mu is None else mu - prior_mu
    t2 = t * t if prior_logvar is None else t * t * torch.exp(-prior_logvar)
    return z, 0.5 * (torch.exp(d) - 1 - d + t2).sum(-1)


# --- GAN losses ("mean" reduction) --------------------------------------------------------


def discriminator_loss(real, fake, kind="nonsaturating", real_label=1.0):
    """The discriminator's "mean" loss of each kind on logits of any shapes.

    Fair: each term is torch.nn.functional's fused op (softplus, relu) and a mean; constants and
    signs are applied to the 0-d means, not per element; label smoothing is BCE with logits.
    """
    if kind in ("nonsaturating", "minimax"):
        if real_label != 1.0:
            real_term = F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_label))
        else:
            real_term = F.softplus(-real).mean()
        return real_term + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "wasserstein":
        return fake.mean() - real.mean()
    if kind == "least_squares":
        return 0.5 * ((real - 1).square().mean() + fake.square().mean())
    if kind == "relativistic":
        return F.softplus(fake.mean() - real).mean() + F.softplus(fake - real.mean()).mean()
    raise ValueError(f"unknown GAN loss kind {kind!r}")


def generator_loss(fake, kind="nonsaturating", real=None):
    """The generator's "mean" loss of each kind (real logits: the relativistic kind only).

    Fair: as discriminator_loss; the linear kinds are one mean, negated as a 0-d tensor.
    """
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    if kind == "minimax":
        return -F.softplus(fake).mean()
    if kind in ("hinge", "wasserstein"):
        return -fake.mean()
    if kind == "least_squares":
        return 0.5 * (fake - 1).square().mean()
    if kind == "relativistic":
        return F.softplus(real.mean() - fake).mean() + F.softplus(real - fake.mean()).mean()
    raise ValueError(f"unknown GAN loss kind {kind!r}")


# --- attention ----------------------------------------------------------------------------

_MASKS: dict = {}  # (T, S, device) -> the (T, S) causal mask, as a model keeps it in a buffer


def _future_mask(t: int, s: int, device) -> torch.Tensor:
    """(T, S) bool, True where key j comes after query i (bottom-right aligned: j > i + S - T)."""
    if torch.compiler.is_compiling():  # traced once into the graph
        return torch.ones(t, s, dtype=torch.bool, device=device).triu_(s - t + 1)
    key = (t, s, torch.device(device))
    if key not in _MASKS:
        _MASKS.clear()  # one size at a time: a model's buffer, not a growing cache
        with torch.inference_mode(False):  # an ordinary tensor, which autograd may save, in any mode
            _MASKS[key] = torch.ones(t, s, dtype=torch.bool, device=device).triu_(s - t + 1)
    return _MASKS[key]


def attention(q, k, v, causal=True):
    """softmax(q k^T / sqrt(D), causal mask) v: q (B, H, T, D), k/v (B, Hkv, S, D) -> (B, H, T, D).

    Fair: grouped-query heads folded into rows by a reshape (4-D matmuls, K/V never copied or
    broadcast), the scale folded into q, the mask applied in place, torch's softmax.
    """
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if causal and t > s:
        raise ValueError(f"the attention baseline needs T <= S when causal, got T={t}, S={s}")
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, hkv, h // hkv * t, d)  # (B, Hkv, G*T, D)
    scores = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, G*T, S)
    if causal:
        scores.view(b, hkv, h // hkv, t, s).masked_fill_(_future_mask(t, s, q.device), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, Hkv, G*T, D)
    return out.reshape(b, h, t, d)


# --- kv_decode ----------------------------------------------------------------------------


def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new):
    """One decoding step: write k_new/v_new (B, Hkv, Tnew, D) at each row's length, then attend.

    q (B, H, Tnew, D); caches (B, Hkv, Smax, D); cache_seqlens (B,) int. Returns (B, H, Tnew, D).
    Query i of row b sees positions j <= i + L_b (L_b + Tnew filled). Unfilled positions get
    weight 0 and must hold finite values (a zero-initialised cache), as in a model's own cache.
    Fair: the append is an index copy, the scores a 4-D matmul over the cache (no K/V copy),
    the ragged causal mask applied in place, probabilities @ v_cache without copying V.
    """
    b, h, tnew, d = q.shape
    hkv, smax = k_cache.shape[1], k_cache.shape[2]
    lens = cache_seqlens.long()
    rows = torch.arange(b, device=q.device).view(b, 1)
    pos = lens.view(b, 1) + torch.arange(tnew, device=q.device)  # (B, Tnew)
    k_cache[rows, :, pos] = k_new.transpose(1, 2)  # indexed as (B, Tnew, Hkv, D)
    v_cache[rows, :, pos] = v_new.transpose(1, 2)
    qg = (q * (1.0 / math.sqrt(d))).reshape(b, hkv, h // hkv * tnew, d)  # (B, Hkv, G*Tnew, D)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2))  # (B, Hkv, G*Tnew, Smax)
    hidden = torch.arange(smax, device=q.device) > pos.unsqueeze(-1)  # (B, Tnew, Smax)
    scores.view(b, hkv, h // hkv, tnew, smax).masked_fill_(hidden.view(b, 1, 1, tnew, smax), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v_cache)  # (B, Hkv, G*Tnew, D)
    return out.reshape(b, h, tnew, d)
