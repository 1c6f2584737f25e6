"""Autoregressive families for the trainer: the Transformer and the RNN language models.

Two kinds of data:
- "text": the standard-library character corpus; a batch is B random windows
  of seq_len + 1 characters, evaluated in bits per character on "valid".
- "digits": the 8x8 digits as sequences of 64 pixels with 17 levels after a
  start token (id 17); the exact log-likelihood is in bits per dimension, the
  same unit as the VAE's bound on the same data.

The model config holds the model's own fields plus "seq_len" (the training
window; for digits always 64).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from genkern.train.families import Family, _digit_quality, _eval_generator, _is_digits

PIXELS = 64  # 8 x 8
LEVELS = 17
BOS = LEVELS  # the start token of a pixel sequence
EVAL_CHARS = 32_768  # characters of "valid" scored at each evaluation (all of them at the end)


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
        base = self._model_fields(data)
        base["seq_len"] = PIXELS if _is_digits(data) else self.seq_len
        base.update(overrides)
        seq_len = base["seq_len"]
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        if _is_digits(data) and seq_len != PIXELS:
            raise ValueError(f"seq_len must be {PIXELS} (one image) on digits, got {seq_len}")
        return {**dataclasses.asdict(self._make_config(base)), "seq_len": seq_len}

    def build(self, config):
        net = self._model_cls()(self._make_config(config))
        net.train_seq_len = config.get("seq_len", self.seq_len)  # the window the family trains and scores
        return net

    def check_data(self, model, data, what):
        vocab = self._vocab_size(model)
        if _is_text(data):
            if data.vocab_size > vocab:
                raise ValueError(f"{what} has {data.vocab_size} characters, the model's vocab_size is {vocab}")
            return
        if not _is_digits(data):
            raise ValueError(f"{what} must be 'text' or 'digits' for the {self.name} family, got {data.name!r}")
        if vocab < LEVELS + 1:
            raise ValueError(f"vocab_size must be at least {LEVELS + 1} for digits (17 levels and a start token)")

    def num_examples(self, data) -> int:
        return len(data.ids) if _is_text(data) else len(data.x)

    def batch(self, model, data, step, seed, batch_size):
        if _is_digits(data):
            return {"tokens": pixels_to_tokens(super().batch(model, data, step, seed, batch_size)["x"])}
        from genkern.data.text import random_windows
        from genkern.train.trainer import step_generator
        return {"tokens": random_windows(data.ids, batch_size, model.train_seq_len,
                                         step_generator(seed, step, "windows"))}

    def step(self, net, model, opts, batch, noise):
        opt = opts["model"]
        opt.zero_grad(set_to_none=True)
        tokens = batch["tokens"]                                                  # (B, T + 1)
        logits = self._logits(net, tokens[:, :-1])                                # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def nll(self, model, tokens: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """(N,) float64 -log p(tokens[:, 1:] | tokens[:, 0]) in nats, exact."""
        out = []
        for chunk in tokens.split(batch_size):
            logits = self._logits(model, chunk[:, :-1]).double()                   # (b, T, V)
            logp = logits.log_softmax(-1).gather(-1, chunk[:, 1:, None]).squeeze(-1)
            out.append(-logp.sum(-1))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, model, test, *, final, seed):
        if test is None:
            return {}
        device = next(model.parameters()).device
        if _is_digits(test):
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
        """Digits: (n, 1, 8, 8) images. Text: (n, 256) character ids after a newline."""
        device = next(model.parameters()).device
        if self._vocab_size(model) == LEVELS + 1:
            prompt = torch.full((n, 1), BOS, dtype=torch.int64, device=device)
            return tokens_to_pixels(self._generate(model, prompt, PIXELS, gen).cpu())
        from genkern.data.text import encode
        prompt = encode("\n").to(device).expand(n, 1).contiguous()
        return self._generate(model, prompt, 256, gen).cpu()

    def plot(self, samples, data, path, title):
        if samples.dim() == 4:
            return super().plot(samples, data, path, title)
        from genkern._io import write_atomic
        from genkern.data.text import decode
        body = "\n\n----------\n".join(decode(row) for row in samples[:8])
        write_atomic(str(path).removesuffix(".png") + ".txt", f"# {title}\n{body}\n")


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
        if _is_digits(data):
            return {"vocab_size": LEVELS + 1, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": PIXELS + 1}
        return {"vocab_size": data.vocab_size, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256}

    def _vocab_size(self, model) -> int:
        return model.args.vocab_size

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

    def _model_fields(self, data):
        if _is_digits(data):
            return {"vocab_size": LEVELS + 1, "kind": "gru", "dim": 64, "hidden": 256, "bos_token": BOS}
        return {"vocab_size": data.vocab_size, "kind": "lstm", "dim": 64, "hidden": 256}

    def _vocab_size(self, model) -> int:
        return model.args.vocab_size

    def _logits(self, net, tokens):
        return net(tokens)[0]

    def _generate(self, model, prompt, new, gen):
        return model.generate(prompt, new, generator=gen)
