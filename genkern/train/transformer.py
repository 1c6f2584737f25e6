"""The Transformer family: TransformerLM over text windows or digit pixel tokens (genkern.train.lm)."""

from __future__ import annotations

from genkern.data.digits import LEVELS, PIXELS
from genkern.models.transformer import ModelArgs, TransformerLM
from genkern.train.lm import LMFamily, is_text


class TransformerFamily(LMFamily):
    name = "transformer"
    lr = 1e-3
    model_cls = TransformerLM
    config_cls = ModelArgs

    def model_fields(self, data):
        if not is_text(data):
            return {"vocab_size": LEVELS + 1, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": PIXELS + 1}
        return {"vocab_size": data.vocab_size, "dim": 128, "n_layers": 4, "n_heads": 4, "max_seq_len": 256}

    def check_context(self, config, seq_len, kind):
        if seq_len > config.max_seq_len:
            raise ValueError(f"seq_len {seq_len} exceeds max_seq_len {config.max_seq_len}")
        # Sampling a digit feeds the start token and 64 pixels through the KV cache.
        if kind == "digits" and config.max_seq_len < PIXELS + 1:
            raise ValueError(
                f"max_seq_len must be at least {PIXELS + 1} on digits (a start token and "
                f"{PIXELS} pixels), got {config.max_seq_len}"
            )
        if kind == "text" and config.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2 to sample text, got {config.max_seq_len}")
