"""What every autoregressive model here knows of itself: its logits, its exact likelihood, its samples.

The same functions serve TransformerLM (forward -> logits) and RNNLM (forward ->
(logits, state)), and whoever asks: the trainer's loss and evaluation, the
likelihood metric, `genkern sample`. Two kinds of sequence, told apart by the
vocabulary: the 8x8 digits as 64 pixel tokens after a start token (exactly
LEVELS + 1 = 18 tokens), or characters of text (at least the corpus' 97).
"""

from __future__ import annotations

import torch

from genkern.data.digits import BOS, LEVELS, PIXELS, tokens_to_pixels
from genkern.data.text import encode
from genkern.generation import generate
from genkern.models.rnn import RNNLM

TEXT_SAMPLE_CHARS = 256  # characters generated per text sample (fewer if the context is shorter)


def sequence_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 tokens -> (B, T, V) next-token logits, for either model (or its DDP wrapper)."""
    out = model(tokens)
    return out[0] if isinstance(out, tuple) else out  # RNNLM also returns its state


@torch.no_grad()
def sequence_nll(model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N,) float64 -log p(tokens[:, 1:] | tokens[:, 0]) in nats, exact (dropout off).

    tokens: (N, T + 1) int64 on the model's device; batch_size rows per forward pass.
    """
    was_training = model.training
    model.eval()
    try:
        out = []
        for chunk in tokens.split(batch_size):
            logits = sequence_logits(model, chunk[:, :-1]).double()  # (b, T, V)
            logp = logits.log_softmax(-1).gather(-1, chunk[:, 1:, None]).squeeze(-1)  # (b, T)
            out.append(-logp.sum(-1))
    finally:
        model.train(was_training)
    return torch.cat(out)


def is_digit_model(model) -> bool:
    """Whether the model reads pixel tokens (its vocabulary is the 17 levels and the start token)."""
    return model.args.vocab_size == LEVELS + 1


def text_sample_len(model) -> int:
    """Characters a text sample generates after its one-character prompt: a Transformer's
    context bounds it, an RNN's does not."""
    max_seq_len = getattr(model.args, "max_seq_len", None)
    return TEXT_SAMPLE_CHARS if max_seq_len is None else min(TEXT_SAMPLE_CHARS, max_seq_len - 1)


@torch.no_grad()
def sample_sequences(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """Digits: (n, 1, 8, 8) float images. Text: (n, 1 + L) int64 character ids, a newline then
    L = text_sample_len(model) sampled ones.

    generator: a CPU generator; on another device sampling uses a generator seeded from it.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    if is_digit_model(model):
        prompt = torch.full((n, 1), BOS, dtype=torch.int64, device=device)
        return tokens_to_pixels(_generate(model, prompt, PIXELS, generator).cpu())
    prompt = encode("\n").to(device).expand(n, 1).contiguous()  # (n, 1)
    return _generate(model, prompt, text_sample_len(model), generator).cpu()


def _generate(model, prompt: torch.Tensor, new: int, generator: torch.Generator) -> torch.Tensor:
    if isinstance(model, RNNLM):
        return model.generate(prompt, new, generator=generator)
    return generate(model, prompt, new, generator=generator)  # the Transformer, through its KV cache
