"""The base of the autoregressive families (genkern.train.transformer and genkern.train.rnn).

Two kinds of data:
- "text": the standard-library character corpus; a batch is B random windows
  of seq_len + 1 characters, evaluated in bits per character on "valid".
- "digits": the 8x8 digits as sequences of 64 pixels with 17 levels after a
  start token (id 17, genkern.data.digits); the exact log-likelihood is in bits
  per dimension, the same unit as the VAE's bound on the same data.

The model config holds the model's own fields plus "seq_len" (the training
window; for digits always 64). A digits model has exactly 18 tokens and a text
model at least the corpus' 97 characters, so a trained model's vocabulary says
which kind of samples it draws.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from genkern._io import write_atomic
from genkern.data.digits import BOS, LEVELS, PIXELS, pixels_to_tokens, tokens_to_pixels
from genkern.data.text import contiguous_windows, decode, random_windows
from genkern.models.sequence import TEXT_SAMPLE_CHARS, sequence_logits, sequence_nll
from genkern.train.batches import step_generator
from genkern.train.family import Family, digit_scores, eval_generator, is_digits

# The digit tokens, where they were first defined (genkern.data.digits holds them).
__all__ = [
    "BOS",
    "EVAL_CHARS",
    "LEVELS",
    "LMFamily",
    "PIXELS",
    "TEXT_SAMPLE_CHARS",
    "pixels_to_tokens",
    "tokens_to_pixels",
]

EVAL_CHARS = 32_768  # characters of "valid" scored at each evaluation (all of them at the end)


def is_text(data) -> bool:
    return hasattr(data, "ids") and hasattr(data, "vocab")


def data_kind(data, what: str, family: str) -> str:
    """ "text" or "digits"; anything else is not data a language model of this module reads."""
    # A TextCorpus has no `name`, so it is recognised before the digits test reads one.
    if is_text(data):
        return "text"
    if isinstance(getattr(data, "name", None), str) and is_digits(data):
        return "digits"
    got = getattr(data, "name", type(data).__name__)
    raise ValueError(f"{what} must be 'text' or 'digits' for the {family} family, got {got!r}")


class LMFamily(Family):
    """Shared by both language models; subclasses name the model and config classes and their defaults."""

    lr = 2e-3
    batch_size = 64
    seq_len = 128
    model_cls = None  # TransformerLM or RNNLM
    config_cls = None  # its config dataclass

    def model_fields(self, data) -> dict:
        """The model's default config fields for `data` (without seq_len)."""
        raise NotImplementedError

    def make_config(self, d: dict):
        """The model's config dataclass from a dict, naming unknown keys."""
        known = {f.name for f in dataclasses.fields(self.config_cls)} | {"seq_len"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} model config keys {unknown}; known keys are {sorted(known)}")
        return self.config_cls(**{k: v for k, v in d.items() if k != "seq_len"})

    def model_config(self, overrides, data):
        kind = data_kind(data, "data", self.name)
        base = self.model_fields(data)
        base["seq_len"] = PIXELS if kind == "digits" else self.seq_len
        base.update(overrides)
        seq_len = base["seq_len"]
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if kind == "digits" and seq_len != PIXELS:
            raise ValueError(f"seq_len must be {PIXELS} (one image) on digits, got {seq_len}")
        config = self.make_config(base)
        vocab = config.vocab_size
        if kind == "digits" and vocab != LEVELS + 1:
            raise ValueError(f"vocab_size must be {LEVELS + 1} for digits (17 levels and a start token), got {vocab}")
        if kind == "text" and vocab < data.vocab_size:
            raise ValueError(f"vocab_size {vocab} is smaller than the text's {data.vocab_size} characters")
        self.check_context(config, seq_len, kind)
        return {**dataclasses.asdict(config), "seq_len": seq_len}

    def check_context(self, config, seq_len: int, kind: str) -> None:
        """Raises ValueError if the model cannot read a training window or draw a sample."""

    def build(self, config):
        net = self.model_cls(self.make_config(config))
        net.train_seq_len = config.get("seq_len", self.seq_len)  # the window the family trains and scores
        return net

    def check_data(self, model, data, what):
        vocab = model.args.vocab_size
        if data_kind(data, what, self.name) == "text":
            if data.vocab_size > vocab:
                raise ValueError(f"{what} has {data.vocab_size} characters, the model's vocab_size is {vocab}")
            if len(data.ids) < model.train_seq_len + 1:
                raise ValueError(
                    f"{what} holds {len(data.ids)} characters, fewer than one window of "
                    f"seq_len + 1 = {model.train_seq_len + 1}"
                )
        elif vocab != LEVELS + 1:
            raise ValueError(f"vocab_size must be {LEVELS + 1} for digits (17 levels and a start token), got {vocab}")

    def num_examples(self, data) -> int:
        return len(data.ids) if is_text(data) else len(data.x)

    def batch(self, model, data, step, seed, batch_size):
        if not is_text(data):
            return {"tokens": pixels_to_tokens(super().batch(model, data, step, seed, batch_size)["x"])}
        return {
            "tokens": random_windows(data.ids, batch_size, model.train_seq_len, step_generator(seed, step, "windows"))
        }

    def noise(self, model, gen, n):
        # Dropout draws from the global generator; seeding it from the step makes a resumed run
        # repeat the masks of the uninterrupted one. (Processes of a sharded run draw their own.)
        if getattr(model.args, "dropout", 0) > 0:
            return {"dropout_seed": torch.randint(0, 2**62, (n,), generator=gen)}
        return {}

    def step(self, net, model, opts, batch, noise):
        if "dropout_seed" not in noise:
            return _step(net, opts, batch["tokens"])
        device = noise["dropout_seed"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(noise["dropout_seed"][0]))
            return _step(net, opts, batch["tokens"])

    def nll(self, model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N,) float64 -log p(tokens[:, 1:] | tokens[:, 0]) in nats, exact (dropout off)."""
        return sequence_nll(model, tokens, batch_size)

    @torch.no_grad()
    def evaluate(self, model, test, *, final, seed):
        if test is None:
            return {}
        device = next(model.parameters()).device
        if not is_text(test):
            nll = sequence_nll(model, pixels_to_tokens(test.x).to(device))
            out = {"test_bpd": nll.mean().item() / (PIXELS * math.log(2))}
            if final:
                out.update(digit_scores(self.samples(model, 1000, eval_generator(seed)), test))
            return out
        ids = test.ids if final else test.ids[:EVAL_CHARS]
        windows = contiguous_windows(ids, model.train_seq_len).to(device)  # (W, seq_len + 1)
        nll = sequence_nll(model, windows)
        return {"valid_bpc": nll.sum().item() / ((windows.shape[1] - 1) * windows.shape[0] * math.log(2))}

    def plot(self, samples, data, path, title):
        """Images as the base class does. Text: every sample, decoded, to `path` if it ends in .txt,
        else to `path` with .txt for its .png suffix. Returns the path written."""
        if samples.dim() == 4:
            super().plot(samples, data, path, title)
            return str(path)
        path = str(path)
        if not path.lower().endswith(".txt"):
            path = (path[:-4] if path.lower().endswith(".png") else path) + ".txt"
        body = "\n\n----------\n".join(decode(row) for row in samples)
        write_atomic(path, f"# {title}\n{body}\n")
        return path


def _step(net, opts: dict, tokens: torch.Tensor) -> dict:
    opt = opts["model"]
    opt.zero_grad(set_to_none=True)
    logits = sequence_logits(net, tokens[:, :-1])  # (B, T, V); tokens (B, T + 1)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return {"loss": loss.detach()}
