"""The RNN family: RNNLM (GRU or LSTM) over text windows or digit pixel tokens (genkern.train.lm)."""

from __future__ import annotations

from genkern._dispatch import check_impl
from genkern.data.digits import BOS, LEVELS
from genkern.models.rnn import RNNLM, RNNConfig
from genkern.train.lm import LMFamily, is_text


class RNNFamily(LMFamily):
    name = "rnn"
    model_cls = RNNLM
    config_cls = RNNConfig

    def build(self, config):
        # torch's GRU/LSTM run the recurrence: there is no genkern kernel to choose, so the
        # trainer's impl (given for every family) is checked and has no effect.
        check_impl(config.get("impl", "auto"), name="impl")
        return super().build({k: v for k, v in config.items() if k != "impl"})

    def model_fields(self, data):
        if not is_text(data):
            return {"vocab_size": LEVELS + 1, "kind": "gru", "dim": 64, "hidden": 256, "bos_token": BOS}
        return {"vocab_size": data.vocab_size, "kind": "lstm", "dim": 64, "hidden": 256}
