"""Log-likelihood of held-out data under each model family, in one unit: bits per dimension.

What each family can say about log p(x) differs, and the result states which it is:

- autoregressive (TransformerLM, RNNLM over the 64 pixel tokens): exact. The chain rule
  gives log p(x) = sum_t log p(x_t | x_<t), one forward pass per image.
- VAE: a lower bound on log p(x), so an upper bound on bits/dim. Reported twice: the
  ELBO, and the importance-weighted bound with K samples (tighter; K=1 is the ELBO).
  With the categorical decoder over the 17 grey levels both bound a discrete
  likelihood and compare directly with the autoregressive models.
- GAN: none. The generator defines its density only implicitly (as the push-forward
  of the noise), so there is no log p(x) to report.

bits/dim = nats / (D ln 2), D the number of modelled dimensions (64 pixels for digits).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch

from genkern.data.base import Dataset
from genkern.data.digits import BOS, LEVELS, PIXELS, digits, pixels_to_tokens
from genkern.models.gan import GAN
from genkern.models.rnn import RNNLM
from genkern.models.sequence import sequence_nll
from genkern.models.transformer import TransformerLM
from genkern.models.vae import VAE

GAN_NOTE = "a GAN defines no likelihood: it has an implicit density (the push-forward of its noise)"
_EXACT_NOTE = "exact: the chain rule over the pixels, one conditional per pixel"
_BOUND_NOTE = (
    "upper bound on the true bits/dim (the ELBO and the importance-weighted bound are lower "
    "bounds on log p(x)); bits_per_dim is the tighter importance-weighted one"
)
_CONTINUOUS_NOTE = (
    "the {lik} decoder bounds a density, not the probability of the 17 discrete levels: "
    "not comparable with a categorical model's bits/dim"
)


@dataclass(frozen=True)
class LikelihoodResult:
    """What a model says about log p(x) of the data, averaged over the examples.

    kind: "exact" (autoregressive), "bound" (VAE: an upper bound on bits/dim) or None (GAN).
    bits_per_dim: the exact value, the tightest bound, or None.
    nats: the same per example, -log p(x) in nats (None for a GAN).
    elbo_bits_per_dim, iw_bits_per_dim: the VAE's two bounds (None otherwise).
    num_samples: K of the importance-weighted bound (None otherwise).
    dims: D, the dimensions per example; examples: N, how many were scored.
    """

    kind: str | None
    bits_per_dim: float | None
    nats: float | None
    dims: int
    examples: int
    note: str
    elbo_bits_per_dim: float | None = None
    iw_bits_per_dim: float | None = None
    num_samples: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def bits_per_dim(nats: float, dims: int) -> float:
    """Nats per example -> bits per dimension."""
    return nats / (dims * math.log(2.0))


def log_likelihood(
    model, data=None, *, num_samples: int = 100, batch_size: int | None = None, generator: torch.Generator | None = None
) -> LikelihoodResult:
    """The model's (bound on the) negative log-likelihood of `data`, in bits/dim.

    Args:
        model: a genkern VAE, GAN, TransformerLM or RNNLM (the language models with the
            18-token pixel vocabulary: 17 levels and the start token).
        data: images (N, *data_shape) as a float tensor or a Dataset, values level / 16 in
            [0, 1]; for a language model also (N, 65) int64 pixel tokens (genkern.data.digits.
            pixels_to_tokens). Default: digits("test").
        num_samples: K of the VAE's importance-weighted bound (>= 1).
        batch_size: examples per forward pass (language models, default 256) or (example,
            sample) pairs per decoder pass (VAE, default 4096).
        generator: the VAE's noise (default: seeded with 0, so results repeat).

    Returns:
        LikelihoodResult (see its docstring); .to_dict() is JSON-safe.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
    if data is None:
        data = digits("test")
    x = data.x if isinstance(data, Dataset) else data
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data must be a tensor or a genkern Dataset, got {type(data).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"data must hold at least one example, got shape {tuple(x.shape)}")
    with _eval_mode(model), torch.no_grad():
        if isinstance(model, GAN):
            return LikelihoodResult(None, None, None, math.prod(model.config.data_shape), x.shape[0], GAN_NOTE)
        if isinstance(model, VAE):
            return _vae(model, x, num_samples, batch_size or 4096, generator)
        if isinstance(model, (TransformerLM, RNNLM)):
            return _autoregressive(model, x, batch_size or 256)
    raise TypeError(f"model must be a genkern VAE, GAN, TransformerLM or RNNLM, got {type(model).__name__}")


def _vae(model, x: torch.Tensor, k: int, batch_size: int, generator) -> LikelihoodResult:
    cfg = model.config
    if not x.is_floating_point() or tuple(x.shape[1:]) != tuple(cfg.data_shape):
        raise ValueError(
            f"data must be floating images of shape (N, {', '.join(map(str, cfg.data_shape))}) "
            f"for this VAE, got {x.dtype} of shape {tuple(x.shape)}"
        )
    device = next(model.parameters()).device
    x = x.to(device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # The ELBO with the KL term in closed form (lower variance than one importance weight).
    rows = max(1, batch_size)
    elbo_sum = 0.0
    for xb in x.split(rows):
        eps = torch.randn(xb.shape[0], cfg.latent_dim, generator=gen, device=gen.device).to(device)
        terms = model.elbo(xb, eps=eps)
        elbo_sum += (terms.recon.double() + terms.kl.double()).item() * xb.shape[0]
    elbo_nats = elbo_sum / x.shape[0]
    iw_nats = -model.log_likelihood(x, num_samples=k, generator=gen, batch_size=batch_size).mean().item()
    dims = math.prod(cfg.data_shape)
    note = (
        _BOUND_NOTE
        if cfg.likelihood == "categorical"
        else _BOUND_NOTE + "; " + _CONTINUOUS_NOTE.format(lik=cfg.likelihood)
    )
    iw_bpd = bits_per_dim(iw_nats, dims)
    return LikelihoodResult(
        "bound",
        iw_bpd,
        iw_nats,
        dims,
        x.shape[0],
        note,
        elbo_bits_per_dim=bits_per_dim(elbo_nats, dims),
        iw_bits_per_dim=iw_bpd,
        num_samples=k,
    )


def _autoregressive(model, x: torch.Tensor, batch_size: int) -> LikelihoodResult:
    vocab = model.args.vocab_size
    if vocab != LEVELS + 1:
        raise ValueError(
            f"model must model the {LEVELS} pixel levels and the start token (vocab_size "
            f"{LEVELS + 1}), got vocab_size {vocab}"
        )
    if x.is_floating_point():
        if tuple(x.shape[1:]) not in ((1, 8, 8), (8, 8), (PIXELS,)):
            raise ValueError(
                f"data must be digit images (N, 1, 8, 8) or tokens (N, {PIXELS + 1}), got shape {tuple(x.shape)}"
            )
        levels = x.reshape(x.shape[0], -1) * (LEVELS - 1)
        if x.min() < 0 or x.max() > 1 or (levels - levels.round()).abs().max() > 1e-4:
            raise ValueError(f"data must hold the {LEVELS} levels k / {LEVELS - 1} in [0, 1]")
        tokens = pixels_to_tokens(x.reshape(-1, 1, 8, 8))
    else:
        tokens = x.long()
        if (
            tokens.dim() != 2
            or tokens.shape[1] != PIXELS + 1
            or (tokens[:, 0] != BOS).any()
            or tokens[:, 1:].min() < 0
            or tokens[:, 1:].max() >= LEVELS
        ):
            raise ValueError(
                f"token data must be (N, {PIXELS + 1}): the start token {BOS}, then 64 levels "
                f"in [0, {LEVELS - 1}], got shape {tuple(x.shape)}"
            )
    device = next(model.parameters()).device
    nll = sequence_nll(model, tokens.to(device), batch_size=batch_size)  # (N,) float64 nats
    nats = nll.mean().item()
    return LikelihoodResult("exact", bits_per_dim(nats, PIXELS), nats, PIXELS, tokens.shape[0], _EXACT_NOTE)


@contextlib.contextmanager
def _eval_mode(model):
    """model.eval() for the duration, then the mode it was in."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        yield
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
