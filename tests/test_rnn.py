"""genkern.models.rnn: shapes, state carrying, exact likelihood, generation, training.

Comparisons between the incremental and the full forward run in float64, where the
two orders of the same arithmetic agree to ~1e-15; a wrong state would move logits
by ~1e-2 or more.
"""

from __future__ import annotations

import math

import pytest
import torch

from genkern.data.text import batches, contiguous_windows, text
from genkern.models.rnn import RNNLM, RNNConfig
from utils import one_thread  # noqa: F401 (autouse fixture)

V = 37
KINDS = [pytest.param(k, n, id=f"{k}-{n}layer") for k in ("gru", "lstm") for n in (1, 2)]


def make_model(kind="gru", n_layers=1, *, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"dim": 12, "hidden": 16, **kw}
    cfg = RNNConfig(V, kind=kind, n_layers=n_layers, **kw)
    return RNNLM(cfg).to(dtype)


def rand_tokens(b, t, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,n_layers", KINDS)
def test_shapes_and_state(kind, n_layers):
    m = make_model(kind, n_layers, dtype=torch.float32)
    logits, state = m(rand_tokens(3, 7))
    assert logits.shape == (3, 7, V) and logits.dtype == torch.float32
    parts = state if kind == "lstm" else (state,)
    assert len(parts) == (2 if kind == "lstm" else 1)
    assert all(s.shape == (n_layers, 3, 16) for s in parts)
    # None means the zero state of init_state.
    again, _ = m(rand_tokens(3, 7), m.init_state(3))
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    # int32 tokens are accepted.
    torch.testing.assert_close(m(rand_tokens(3, 7).int())[0], logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind,n_layers", KINDS)
def test_state_continues_the_sequence(kind, n_layers):
    m = make_model(kind, n_layers)
    x = rand_tokens(2, 11)
    full, full_state = m(x)
    a, st = m(x[:, :4])
    b, st = m(x[:, 4:], st)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full, rtol=1e-12, atol=1e-12)
    for s, f in zip(st if kind == "lstm" else (st,), full_state if kind == "lstm" else (full_state,)):
        torch.testing.assert_close(s, f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,n_layers", KINDS)
def test_greedy_generation_equals_full_recompute(kind, n_layers):
    m = make_model(kind, n_layers)
    prompt = rand_tokens(3, 5)
    out = m.generate(prompt, 20, greedy=True)
    assert out.shape == (3, 25) and out.dtype == torch.int64
    assert torch.equal(out[:, :5], prompt)
    # Re-running the whole sequence, each new token is the argmax after its prefix.
    logits, _ = m(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(dim=-1), out[:, 5:])


def test_generation_feeds_the_prompt_once():
    m = make_model("lstm", 2)
    lengths = []
    m.rnn.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    m.generate(rand_tokens(2, 6), 9, greedy=True)
    assert lengths == [6] + [1] * 8  # the last token is sampled, never fed back


def test_sampling_options():
    m = make_model("gru")
    prompt = rand_tokens(4, 3)
    a = m.generate(prompt, 15, generator=torch.Generator().manual_seed(0))
    b = m.generate(prompt, 15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    greedy = m.generate(prompt, 15, greedy=True)
    assert torch.equal(m.generate(prompt, 15, top_k=1, generator=torch.Generator()), greedy)
    assert torch.equal(m.generate(prompt, 15, temperature=0.0), greedy)
    s = m.generate(prompt, 15, top_k=5, top_p=0.9, temperature=0.7, generator=torch.Generator().manual_seed(1))
    assert s.shape == (4, 18) and 0 <= int(s.min()) and int(s.max()) < V


def test_generate_prompt_forms():
    m = make_model("gru", bos_token=0)
    p = rand_tokens(1, 4)[0]
    one = m.generate(p, 6, greedy=True)
    assert one.shape == (10,) and torch.equal(one, m.generate(p[None], 6, greedy=True)[0])
    assert torch.equal(m.generate(rand_tokens(2, 4), 0), rand_tokens(2, 4))
    start = m.generate(None, 8, greedy=True, batch_size=3)
    assert start.shape == (3, 9) and (start[:, 0] == 0).all()
    assert torch.equal(start, m.generate(torch.zeros(3, 1, dtype=torch.long), 8, greedy=True))


def test_generated_tokens_can_be_trained_on():
    m = make_model("lstm")
    out = m.generate(rand_tokens(2, 3), 5, generator=torch.Generator().manual_seed(0))
    m.loss(out).backward()
    assert m.embed.weight.grad is not None


def test_generate_turns_dropout_off_and_restores_the_mode():
    m = make_model("lstm", 2, dropout=0.5)
    prompt = rand_tokens(2, 4)
    m.train()
    out = m.generate(prompt, 12, greedy=True)
    assert m.training
    m.eval()
    assert torch.equal(out, m.generate(prompt, 12, greedy=True))
    assert not m.training


@pytest.mark.parametrize("kind,n_layers", KINDS)
def test_log_likelihood_by_hand(kind, n_layers):
    m = make_model(kind, n_layers)
    x = rand_tokens(3, 9)
    # One token at a time through the state: log p(x[t+1] | x[:t+1]), summed.
    want = torch.zeros(3, dtype=torch.float64)
    state = None
    for t in range(8):
        logits, state = m(x[:, t : t + 1], state)
        want += logits[:, 0].log_softmax(dim=-1).gather(-1, x[:, t + 1 : t + 2]).squeeze(-1)
    ll = m.log_likelihood(x)
    assert ll.shape == (3,)
    torch.testing.assert_close(ll, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.loss(x), -ll.sum() / (3 * 8), rtol=1e-12, atol=0)
    # A float32 model reports float32 (not rounded further) and agrees to float32 rounding.
    m32 = make_model(kind, n_layers, dtype=torch.float32)
    assert m32.log_likelihood(x).dtype == torch.float32
    torch.testing.assert_close(m32.log_likelihood(x).double(), want, rtol=1e-5, atol=1e-5)


def test_loss_is_differentiable_and_tied_weights_share():
    m = make_model("gru", dim=16, tie_weights=True)
    assert m.head.weight is m.embed.weight
    m.loss(rand_tokens(2, 6)).backward()
    assert m.embed.weight.grad is not None and m.embed.weight.grad.abs().sum() > 0


def test_training_on_text_lowers_bits_per_char():
    """About 5 s: 200 Adam steps of a small LSTM on 32 windows of 64 characters.

    Measured: 2.68 bits/char on the validation text (seeds 0-2 gave 2.68-2.75), against
    log2(97) = 6.6 for a uniform guess and 4.5 for the train split's character
    frequencies (the best a model without context can do)."""
    train, valid = text("train"), text("valid", max_chars=20_000)
    torch.manual_seed(0)
    m = RNNLM(RNNConfig(train.vocab_size, kind="lstm", dim=32, hidden=128))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for xb in batches(train.ids, 32, 64, steps=200, seed=0):
        loss = m.loss(xb)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
    m.eval()
    with torch.no_grad():
        bits = m.loss(contiguous_windows(valid.ids, 256)).item() / math.log(2)
    freq = torch.bincount(train.ids, minlength=train.vocab_size).double() / len(train)
    unigram = -(freq[freq > 0] * freq[freq > 0].log2()).sum().item()
    assert bits < 3.0 and bits < unigram - 1.0, (bits, unigram)


def test_config_round_trip():
    cfg = RNNConfig(50, kind="lstm", dim=8, hidden=8, n_layers=3, dropout=0.1, tie_weights=True, bos_token=4)
    assert RNNConfig.from_dict(cfg.to_dict()) == cfg
    m = RNNLM(cfg)
    assert m.config() == cfg.to_dict()
    rebuilt = RNNLM(RNNConfig.from_dict(m.config()))
    rebuilt.load_state_dict(m.state_dict())
    x = torch.randint(0, 50, (2, 5))
    torch.testing.assert_close(rebuilt.eval()(x)[0], m.eval()(x)[0], rtol=0, atol=0)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown RNNConfig keys \['heads'\]"):
        RNNConfig.from_dict({"vocab_size": 10, "heads": 2})
    with pytest.raises(TypeError, match="d must be a dict"):
        RNNConfig.from_dict([("vocab_size", 10)])


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(vocab_size=0), "vocab_size"),
        (dict(dim=2.5), "dim"),
        (dict(hidden=-1), "hidden"),
        (dict(n_layers=True), "n_layers"),
        (dict(kind="rnn"), "kind"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(tie_weights=1), "tie_weights"),
        (dict(tie_weights=True, dim=8, hidden=16), "tie_weights"),
        (dict(bos_token=10), "bos_token"),
    ],
)
def test_config_validation(kw, name):
    args = dict(vocab_size=10)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        RNNConfig(**args)


def test_bad_tokens():
    m = make_model("gru")
    with pytest.raises(TypeError, match="tokens must be a torch.Tensor"):
        m([[1, 2]])
    with pytest.raises(ValueError, match="tokens must hold integer"):
        m(rand_tokens(2, 3).float())
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\)"):
        m(rand_tokens(1, 3)[0])
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, T\)"):
        m(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=37\)"):
        m(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match="tokens must lie"):
        m.loss(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="T >= 2"):
        m.loss(rand_tokens(2, 1))
    with pytest.raises(ValueError, match="T >= 2"):
        m.log_likelihood(rand_tokens(2, 1))


def test_bad_state():
    gru, lstm = make_model("gru", 2), make_model("lstm", 2)
    x = rand_tokens(3, 4)
    with pytest.raises(ValueError, match=r"state must be a tensor of shape \(2, 3, 16\)"):
        gru(x, gru.init_state(2))
    with pytest.raises(ValueError, match="state must be a tensor"):
        gru(x, lstm.init_state(3))
    with pytest.raises(ValueError, match=r"state must be a tuple \(h, c\)"):
        lstm(x, gru.init_state(3))
    with pytest.raises(ValueError, match="batch_size"):
        gru.init_state(0)


def test_bad_generate_args():
    m = make_model("gru")
    p = rand_tokens(2, 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate(p, -1)
    with pytest.raises(ValueError, match="temperature"):
        m.generate(p, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        m.generate(p, 2, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        m.generate(p, 2, top_p=1.5)
    with pytest.raises(ValueError, match="prompt must lie"):
        m.generate(torch.tensor([[V + 3]]), 2)
    with pytest.raises(ValueError, match="prompt must hold integer"):
        m.generate(p.double(), 2)
    with pytest.raises(ValueError, match="bos_token is None"):
        m.generate(None, 2)
    with pytest.raises(TypeError, match="config must be an RNNConfig"):
        RNNLM({"vocab_size": 10})
