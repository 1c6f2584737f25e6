"""A recurrent (GRU or LSTM) language model: embedding -> torch RNN -> linear head.

The recurrent state is the whole context, so generation feeds the prompt once and
then one token at a time, carrying the state (never re-running the prefix): each new
token costs O(1) in the sequence length, where the Transformer needs a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genkern.generation import sample_next
from genkern.models._config import ConfigDict


@dataclass
class RNNConfig(ConfigDict):
    vocab_size: int = 256
    kind: str = "gru"  # "gru" | "lstm"
    dim: int = 128  # embedding width
    hidden: int = 256  # recurrent state width
    n_layers: int = 1
    dropout: float = 0.0  # on the embeddings, between layers and before the head (training only)
    tie_weights: bool = False  # share the embedding and the head weights (needs dim == hidden)
    bos_token: int | None = None  # start token for generate(prompt=None); None: a prompt is required

    def __post_init__(self):
        for name in ("vocab_size", "dim", "hidden", "n_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.kind not in ("gru", "lstm"):
            raise ValueError(f"kind must be 'gru' or 'lstm', got {self.kind!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_weights, bool):
            raise ValueError(f"tie_weights must be a bool, got {self.tie_weights!r}")
        if self.tie_weights and self.dim != self.hidden:
            raise ValueError(
                f"tie_weights needs dim == hidden (the head maps the hidden state onto the "
                f"embedding matrix), got dim={self.dim}, hidden={self.hidden}"
            )
        if self.bos_token is not None and (
            isinstance(self.bos_token, bool)
            or not isinstance(self.bos_token, int)
            or not 0 <= self.bos_token < self.vocab_size
        ):
            raise ValueError(
                f"bos_token must be None or an int in [0, vocab_size={self.vocab_size}), got {self.bos_token!r}"
            )


def check_tokens(tokens, vocab_size: int, *, name: str = "tokens", min_len: int = 1) -> None:
    """Raises ValueError unless tokens is a (B, T) integer tensor, B >= 1, T >= min_len, ids in range."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token ids, got {tokens.dtype}")
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < min_len:
        raise ValueError(f"{name} must have shape (B, T) with B >= 1 and T >= {min_len}, got {tuple(tokens.shape)}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        # Caught here: an out-of-range id would fail deep inside the embedding, or on CUDA as a device assert.
        raise ValueError(f"{name} must lie in [0, vocab_size={vocab_size}), got values in [{lo}, {hi}]")


def _at_least_float32(x):
    # Low-precision logits would round the log-likelihood; float64 ones are kept (exact checks use them).
    return x if x.dtype == torch.float64 else x.float()


class RNNLM(nn.Module):
    """Character/token language model over torch's GRU or LSTM (batch_first).

    forward(tokens, state=None): tokens (B, T) int -> (logits (B, T, vocab_size), state).
    logits[:, t] is the distribution of the token after tokens[:, t]. The state
    continues the sequence: forward(a) then forward(b, state) equals forward(cat(a, b)).
    State layout: GRU h (n_layers, B, hidden); LSTM a tuple (h, c), each (n_layers, B, hidden).
    """

    def __init__(self, config: RNNConfig):
        super().__init__()
        if not isinstance(config, RNNConfig):
            raise TypeError(f"config must be an RNNConfig, got {type(config).__name__}")
        self.args = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        rnn = nn.GRU if c.kind == "gru" else nn.LSTM
        # torch applies this dropout between layers only (and warns when there is one layer).
        self.rnn = rnn(
            c.dim, c.hidden, num_layers=c.n_layers, batch_first=True, dropout=c.dropout if c.n_layers > 1 else 0.0
        )
        self.drop = nn.Dropout(c.dropout)
        self.head = nn.Linear(c.hidden, c.vocab_size)
        if c.tie_weights:
            self.head.weight = self.embed.weight

    def config(self) -> dict:
        return self.args.to_dict()

    def init_state(self, batch_size: int):
        """The zero state for batch_size sequences (what forward uses when state is None)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        p = self.head.weight
        h = torch.zeros(self.args.n_layers, batch_size, self.args.hidden, dtype=p.dtype, device=p.device)
        return (h, h.clone()) if self.args.kind == "lstm" else h

    def _check_state(self, state, batch_size: int) -> None:
        want = (self.args.n_layers, batch_size, self.args.hidden)
        parts = state if isinstance(state, tuple) else (state,)
        ok = len(parts) == (2 if self.args.kind == "lstm" else 1) and all(
            isinstance(s, torch.Tensor) and tuple(s.shape) == want for s in parts
        )
        if not ok:
            layout = "a tuple (h, c) of tensors" if self.args.kind == "lstm" else "a tensor"
            got = [tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__ for s in parts]
            raise ValueError(
                f"state must be {layout} of shape {want} for a {self.args.kind} with a batch of "
                f"{batch_size}, got {type(state).__name__} {got}"
            )

    def forward(self, tokens, state=None):
        """tokens (B, T) int, state from init_state/forward or None -> (logits (B, T, V), state)."""
        check_tokens(tokens, self.args.vocab_size)
        if state is not None:
            self._check_state(state, tokens.shape[0])
        return self._run(tokens, state)

    def _run(self, tokens, state):
        """forward without the checks (for tokens the model sampled itself)."""
        x = self.drop(self.embed(tokens.long()))  # (B, T, dim)
        y, state = self.rnn(x, state)  # (B, T, hidden)
        return self.head(self.drop(y)), state  # (B, T, V)

    def _target_log_probs(self, tokens):
        """tokens (B, T+1) -> (B, T) log p(tokens[:, t+1] | tokens[:, :t+1]), at least float32."""
        check_tokens(tokens, self.args.vocab_size, min_len=2)
        logits, _ = self._run(tokens[:, :-1], None)  # (B, T, V)
        logp = _at_least_float32(logits).log_softmax(dim=-1)
        return logp.gather(-1, tokens[:, 1:, None].long()).squeeze(-1)  # (B, T)

    def loss(self, tokens):
        """Mean next-token cross-entropy in nats of tokens (B, T+1), T >= 1.

        Predicts positions 1..T, each from all tokens before it; equals
        -log_likelihood(tokens).sum() / (B * T). Divide by ln 2 for bits per token.
        """
        check_tokens(tokens, self.args.vocab_size, min_len=2)
        logits, _ = self._run(tokens[:, :-1], None)  # (B, T, V)
        v = logits.shape[-1]
        return F.cross_entropy(_at_least_float32(logits).reshape(-1, v), tokens[:, 1:].reshape(-1).long())

    def log_likelihood(self, tokens):
        """Exact log p(tokens[:, 1:] | tokens[:, 0]) in nats: tokens (B, T+1), T >= 1 -> (B,).

        float32 (float64 for a float64 model).

        The first token is conditioned on, not scored (the model has no distribution
        for a first token). To score a whole sequence s, pass cat(bos, s) with a start
        token the model was trained to follow (e.g. config.bos_token).
        """
        return self._target_log_probs(tokens).sum(dim=-1)

    def prefill(self, prompt):
        """prompt (B, T0) -> (next-token logits (B, V), state after the prompt)."""
        logits, state = self(prompt)
        return logits[:, -1], state

    def decode_one_token(self, token, state):
        """token (B,) -> (next-token logits (B, V), state one token further)."""
        # No range check: the token came from sample_next, and checking would sync every step.
        logits, state = self._run(token[:, None], state)  # (B, 1, V)
        return logits[:, -1], state

    # no_grad rather than inference_mode: the returned tokens stay ordinary tensors, usable
    # as training input (inference tensors cannot be saved for backward, e.g. by the embedding).
    @torch.no_grad()
    def generate(
        self,
        prompt,
        max_new_tokens: int,
        *,
        temperature=1.0,
        top_k=None,
        top_p=None,
        greedy=False,
        generator=None,
        batch_size: int = 1,
    ):
        """Continues each prompt by max_new_tokens tokens, one at a time, carrying the state.

        Args:
            prompt: (B, T0) or (T0,) integer tensor, T0 >= 1; or None to start every row
                from config.bos_token (then batch_size rows, and the output starts with it).
            max_new_tokens: tokens to generate per row (>= 0).
            temperature, top_k, top_p: sampling, as genkern.generation.sample_next.
            greedy: take the most likely token at each step (ignores the sampling args).
            generator: torch.Generator for sampling (on the model's device).
            batch_size: rows when prompt is None.

        Returns:
            (B, T0 + max_new_tokens) int64, the prompt followed by the new tokens
            (1-d in, 1-d out). Dropout is off while generating; the module's mode is restored.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
            raise ValueError(
                f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1, got temperature="
                f"{temperature}, top_k={top_k}, top_p={top_p}"
            )
        device = self.head.weight.device
        squeeze = isinstance(prompt, torch.Tensor) and prompt.dim() == 1
        if prompt is None:
            if self.args.bos_token is None:
                raise ValueError("prompt is None but config.bos_token is None: pass a prompt (B, T0) or set bos_token")
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
            prompt = torch.full((batch_size, 1), self.args.bos_token, dtype=torch.int64, device=device)
        elif squeeze:
            prompt = prompt[None]  # (1, T0)
        check_tokens(prompt, self.args.vocab_size, name="prompt")
        pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=not greedy, generator=generator)
        was_training = self.training
        self.eval()
        try:
            out = [prompt.to(device=device, dtype=torch.int64)]
            if max_new_tokens:
                logits, state = self.prefill(out[0])
                for step in range(max_new_tokens):
                    nxt = sample_next(logits, **pick)  # (B,)
                    out.append(nxt[:, None])
                    if step + 1 < max_new_tokens:
                        logits, state = self.decode_one_token(nxt, state)
        finally:
            self.train(was_training)
        tokens = torch.cat(out, dim=1)  # (B, T0 + new)
        return tokens[0] if squeeze else tokens
