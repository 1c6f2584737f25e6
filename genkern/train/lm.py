"""Autoregressive families for the trainer: the Transformer and the RNN language models.

Two kinds of data:
- "text": the standard-library character corpus; a batch is B random windows
  of seq_len + 1 characters, evaluated in bits per character on "valid".
- "digits": the 8x8 digits as sequences of 64 pixels with 17 levels after a
  start token (id 17); the exact log-likelihood is in bits per dimension, the
  same unit as the VAE's bound on the same data.

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

from genkern.train.families import Family, _digit_quality, _eval_generator, _is_digits
from genkern.train.trainer import step_generator

PIXELS = 64  # 8 x 8
LEVELS = 17
BOS = LEVELS  # the start token of a pixel sequence
EVAL_CHARS = 32_768  # characters of "valid" scored at each evaluation (all of them at the end)
TEXT_SAMPLE_CHARS = 256  # characters generated per text sample (fewer if the context is shorter)


def pixels_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) in [0, 1] -> (N, 65) int64: the start token, then the 64 pixel levels in raster order."""
    levels = (x.reshape(x.shape[0], -1) * (LEVELS - 1)).round().long()            # (N, 64)
    bos = torch.full((x.shape[0], 1), BOS, dtype=torch.int64, device=x.device)
    return torch.cat([bos, levels], dim=1)                                        # (N, 65)


def tokens_to_pixels(tokens: torch.Tensor) -> torch.Tensor:
    """(N, 65) or (N, 64) tokens -> (N, 1, 8, 8) float32 images in [0, 1]."""
    levels = tokens[:, -PIXELS:].clamp(0, LEVELS - 1).float()
    return (levels / (LEVELS - 1)).reshape(-1, 1, 8, 8)


def _is_text(data) -> bool:
    return hasattr(data, "ids") and hasattr(data, "vocab")


def _kind(data, what: str, family: str) -> str:
    """"text" or "digits"; anything else is not data a language model of this module reads."""
    # A TextCorpus has no `name`, so it is recognised before the digits test reads one.
    if _is_text(data):
        return "text"
    if isinstance(getattr(data, "name", None), str) and _is_digits(data):
        return "digits"
    got = getattr(data, "name", type(data).__name__)
    raise ValueError(f"{what} must be 'text' or 'digits' for the {family} family, got {got!r}")


def _seed_from(gen: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (1,), generator=gen))


class LMFamily(Family):
    """Shared by both language models; subclasses say how to build the model and get logits."""

    lr = 2e-3
    batch_size = 64
    seq_len = 128

    def _model_fields(self, data) -> dict:
        raise NotImplementedError

    def _make_config(self, d: dict):
        """The model's config dataclass from a dict, naming unknown keys."""
        cls = self._config_cls()
        known = {f.name for f in dataclasses.fields(cls)} | {"seq_len"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k != "seq_len"})

    def model_config(self, overrides, data):
        kind = _kind(data, "data", self.name)
        base = self._model_fields(data)
        base["seq_len"] = PIXELS if kind == "digits" else self.seq_len
        base.update(overrides)
        seq_len = base["seq_len"]
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if kind == "digits" and seq_len != PIXELS:
            raise ValueError(f"seq_len must be {PIXELS} (one image) on digits, got {seq_len}")
        config = self._make_config(base)
        vocab = config.vocab_size
        if kind == "digits" and vocab != LEVELS + 1:
            raise ValueError(f"vocab_size must be {LEVELS + 1} for digits (17 levels and a start token), got {vocab}")
        if kind == "text" and vocab < data.vocab_size:
            raise ValueError(f"vocab_size {vocab} is smaller than the text's {data.vocab_size} characters")
        self._check_context(config, seq_len, kind)
        return {**dataclasses.asdict(config), "seq_len": seq_len}

    def _check_context(self, config, seq_len: int, kind: str) -> None:
        """Raises ValueError if the model cannot read a training window or draw a sample."""

    def build(self, config):
        net = self._model_cls()(self._make_config(config))
        net.train_seq_len = config.get("seq_len", self.seq_len)  # the window the family trains and scores
        return net

    def check_data(self, model, data, what):
        vocab = self._vocab_size(model)
        if _kind(data, what, self.name) == "text":
            if data.vocab_size > vocab:
                raise ValueError(f"{what} has {data.vocab_size} characters, the model's vocab_size is {vocab}")
            if len(data.ids) < model.train_seq_len + 1:
                raise ValueError(f"{what} holds {len(data.ids)} characters, fewer than one window of "
                                 f"seq_len + 1 = {model.train_seq_len + 1}")
        elif vocab != LEVELS + 1:
            raise ValueError(f"vocab_size must be {LEVELS + 1} for digits (17 levels and a start token), "
                             f"got {vocab}")

    def num_examples(self, data) -> int:
        return len(data.ids) if _is_text(data) else len(data.x)

    def batch(self, model, data, step, seed, batch_size):
        if not _is_text(data):
            return {"tokens": pixels_to_tokens(super().batch(model, data, step, seed, batch_size)["x"])}
        from genkern.data.text import random_windows
        return {"tokens": random_windows(data.ids, batch_size, model.train_seq_len,
                                         step_generator(seed, step, "windows"))}

    def noise(self, model, gen, n):
        # Dropout draws from the global generator; seeding it from the step makes a resumed run
        # repeat the masks of the uninterrupted one. (Processes of a sharded run draw their own.)
        if getattr(model.args, "dropout", 0) > 0:
            return {"dropout_seed": torch.randint(0, 2**62, (n,), generator=gen)}
        return {}

    def step(self, net, model, opts, batch, noise):
        if "dropout_seed" not in noise:
            return self._step(net, opts, batch["tokens"])
        device = noise["dropout_seed"].device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(noise["dropout_seed"][0]))
            return self._step(net, opts, batch["tokens"])

    def _step(self, net, opts, tokens):
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        logits = self._logits(net, tokens[:, :-1])                                # (B, T, V); tokens (B, T + 1)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def nll(self, model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N,) float64 -log p(tokens[:, 1:] | tokens[:, 0]) in nats, exact (dropout off)."""
        was_training = model.training
        model.eval()
        try:
            out = []
            for chunk in tokens.split(batch_size):
                logits = self._logits(model, chunk[:, :-1]).double()               # (b, T, V)
                logp = logits.log_softmax(-1).gather(-1, chunk[:, 1:, None]).squeeze(-1)
                out.append(-logp.sum(-1))
        finally:
            model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, model, test, *, final, seed):
        if test is None:
            return {}
        device = next(model.parameters()).device
        if not _is_text(test):
            nll = self.nll(model, pixels_to_tokens(test.x).to(device))
            out = {"test_bpd": nll.mean().item() / (PIXELS * math.log(2))}
            if final:
                out.update(_digit_quality(self.samples(model, 1000, _eval_generator(seed)), test))
            return out
        from genkern.data.text import contiguous_windows
        ids = test.ids if final else test.ids[:EVAL_CHARS]
        windows = contiguous_windows(ids, model.train_seq_len).to(device)               # (W, seq_len + 1)
        nll = self.nll(model, windows)
        return {"valid_bpc": nll.sum().item() / ((windows.shape[1] - 1) * windows.shape[0] * math.log(2))}

    @torch.no_grad()
    def samples(self, model, n, gen):
        """Digits: (n, 1, 8, 8) float images. Text: (n, 1 + L) int64 character ids, a newline then
        L = 256 sampled ones (fewer for a Transformer with a shorter context).

        gen: a CPU generator; on another device sampling uses a generator seeded from it.
        """
        device = next(model.parameters()).device
        if device.type != "cpu":
            gen = torch.Generator(device).manual_seed(_seed_from(gen))
        if self._vocab_size(model) == LEVELS + 1:
            prompt = torch.full((n, 1), BOS, dtype=torch.int64, device=device)
            return tokens_to_pixels(self._generate(model, prompt, PIXELS, gen).cpu())
        from genkern.data.text import encode
        prompt = encode("\n").to(device).expand(n, 1).contiguous()
        return self._generate(model, prompt, self._text_sample_len(model), gen).cpu()

    def _text_sample_len(self, model) -> int:
        return TEXT_SAMPLE_CHARS

    def plot(self, samples, data, path, title):
        """Images as the base class does. Text: every sample, decoded, to `path` if it ends in .txt,
        else to `path` with .txt for its .png suffix. Returns the path written."""
        if samples.dim() == 4:
            super().plot(samples, data, path, title)
            return str(path)
        from genkern._io import write_atomic
        from genkern.data.text import decode
        path = str(path)
        if not path.lower().endswith(".txt"):
            path = (path[:-4] if path.lower().endswith(".png") else path) + ".txt"
        body = "\n\n----------\n".join(decode(row) for row in samples)
        write_atomic(path, f"# {title}\n{body}\n")
        return path


class TransformerFamily(LMFamily):
    name = "transformer"
    lr = 1e-3

    def _model_cls(self):
        from genkern.models.transformer import TransformerLM
        return TransformerLM

    def _config_cls(self):
        from genkern.models.transformer import ModelArgs
        return ModelArgs

    def _model_fields(self, data):
        if not _is_text(data):
            return {"vocab_size": LEVELS + 1, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": PIXELS + 1}
        return {"vocab_size": data.vocab_size, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256}

    def _vocab_size(self, model) -> int:
        return model.args.vocab_size

    def _check_context(self, config, seq_len, kind):
        if seq_len > config.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds max_seq_len {config.max_seq_len}")
        # Sampling a digit feeds the start token and 64 pixels through the KV cache.
        if kind == "digits" and config.max_seq_len < PIXELS + 1:
            raise ValueError(f"max_seq_len must be at least {PIXELS + 1} on digits (a start token and "
                             f"{PIXELS} pixels), got {config.max_seq_len}")
        if kind == "text" and config.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 to sample text, got {config.max_seq_len}")

    def _text_sample_len(self, model):
        return min(TEXT_SAMPLE_CHARS, model.args.max_seq_len - 1)  # after the one-character prompt

    def _logits(self, net, tokens):
        return net(tokens)

    def _generate(self, model, prompt, new, gen):
        from genkern.generation import generate
        return generate(model, prompt, new, generator=gen)


class RNNFamily(LMFamily):
    name = "rnn"

    def _model_cls(self):
        from genkern.models.rnn import RNNLM
        return RNNLM

    def _config_cls(self):
        from genkern.models.rnn import RNNConfig
        return RNNConfig

    def build(self, config):
        # torch's GRU/LSTM run the recurrence: there is no genkern kernel to choose, so the
        # trainer's impl (given for every family) is checked and has no effect.
        from genkern._dispatch import IMPLS
        if config.get("impl", "auto") not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {config['impl']!r}")
        return super().build({k: v for k, v in config.items() if k != "impl"})

    def _model_fields(self, data):
        if not _is_text(data):
            return {"vocab_size": LEVELS + 1, "kind": "gru", "dim": 64, "hidden": 256, "bos_token": BOS}
        return {"vocab_size": data.vocab_size, "kind": "lstm", "dim": 64, "hidden": 256}

    def _vocab_size(self, model) -> int:
        return model.args.vocab_size

    def _logits(self, net, tokens):
        return net(tokens)[0]

    def _generate(self, model, prompt, new, gen):
        return model.generate(prompt, new, generator=gen)
