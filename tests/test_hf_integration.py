"""attn_implementation="genkern" (genkern.integrations.transformers) in Hugging Face models as their users run them.

Tiny randomly initialised Llama, Qwen2 (sliding window on one of its two layers) and GPT-2 models, nothing
downloaded: logits and gradients equal to attn_implementation="sdpa" on the non-padded positions of a right-padded
batch, and greedy generate() tokens identical to "sdpa" for a left-padded batch of prompts of different lengths.
Each runs with impl "torch" (the reference behind the same spans, decode calls and fallbacks) and "cpp", where
kernel counters (utils.KernelCalls on the attention and decode ops) prove genkern's kernels ran; a counter on
transformers' SDPA function proves that none of these calls fell back to it.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import utils
from genkern.ops import attention as attention_op
from genkern.ops import kv_decode as kv_decode_op

transformers = pytest.importorskip("transformers", reason="transformers (a pinned test dependency) is not installed")
gk_hf = pytest.importorskip("genkern.integrations.transformers")

VOCAB, PROMPT, NEW_TOKENS = 128, 14, 12
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, num_key_value_heads=2, vocab_size=VOCAB))


def _qwen2(sliding=True):
    # max_window_layers=1: layer 0 attends to everything, layer 1 in a window of 8 keys.
    config = transformers.Qwen2Config(
        **TINY,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        use_sliding_window=sliding,
        sliding_window=8,
        max_window_layers=1,
    )
    return transformers.Qwen2ForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


MODELS = {"llama": _llama, "qwen2-sliding": _qwen2, "gpt2": _gpt2}


@pytest.fixture(autouse=True)
def _registered():
    gk_hf.register()
    yield
    gk_hf.register()  # a test that unregisters leaves it registered for the next


@pytest.fixture(params=("torch", "cpp"))
def impl(request, monkeypatch):
    """GENKERN_IMPL for the test, and counters: "kernels" (cpp only) and "sdpa" (the fallback)."""
    monkeypatch.setenv("GENKERN_IMPL", request.param)
    counts = {"sdpa": 0}
    sdpa = gk_hf.sdpa_attention_forward

    def counting_sdpa(*args, **kwargs):
        counts["sdpa"] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(gk_hf, "sdpa_attention_forward", counting_sdpa)
    if request.param == "cpp":
        counts["attention"] = utils.KernelCalls(monkeypatch, attention_op.ATTENTION, "cpp")
        counts["decode"] = utils.KernelCalls(monkeypatch, kv_decode_op.KV_DECODE, "cpp")
    return counts


def _model(name):
    torch.manual_seed(_seed(name))
    return MODELS[name]().eval()


def _seed(name) -> int:
    return zlib.crc32(name.encode())


def _batch(t, pad_side):
    """Token ids (3, t) and the attention mask of rows of t, t - 5 and 4 real tokens, padded on `pad_side`."""
    ids = torch.randint(1, VOCAB, (3, t), generator=torch.Generator().manual_seed(t))
    lens = torch.tensor([t, t - 5, 4])
    pos = torch.arange(t)
    real = pos < lens[:, None] if pad_side == "right" else pos >= t - lens[:, None]
    return ids.masked_fill(~real, 0), real.long()


def _logits_and_grads(model, ids, mask):
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits
    labels = ids.masked_fill(mask == 0, -100)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(MODELS))
def test_right_padded_training_batch_equals_sdpa(name, impl):
    model = _model(name)
    ids, mask = _batch(24, "right")
    model.set_attn_implementation("sdpa")
    want, want_grads = _logits_and_grads(model, ids, mask)
    sdpa_calls = impl["sdpa"]
    model.set_attn_implementation("genkern")
    got, got_grads = _logits_and_grads(model, ids, mask)
    assert impl["sdpa"] == sdpa_calls, "the genkern path fell back to transformers' SDPA function"
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])
    assert got_grads.keys() == want_grads.keys()
    for n, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[n], msg=lambda m, n=n: f"{n}: {m}")
    if "attention" in impl:
        assert impl["attention"].calls == model.config.num_hidden_layers


@pytest.mark.parametrize("name", list(MODELS))
def test_left_padded_generate_equals_sdpa(name, impl):
    model = _model(name)
    ids, mask = _batch(PROMPT, "left")
    kw = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
    model.set_attn_implementation("sdpa")
    want = model.generate(input_ids=ids, attention_mask=mask, **kw)
    sdpa_calls = impl["sdpa"]
    model.set_attn_implementation("genkern")
    got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert impl["sdpa"] == sdpa_calls, "the genkern path fell back to transformers' SDPA function"
    assert got.shape == want.shape == (3, PROMPT + NEW_TOKENS)
    assert torch.equal(got, want), f"\n{got[:, PROMPT:]}\n!=\n{want[:, PROMPT:]}"
    if "attention" in impl:
        layers = model.config.num_hidden_layers
        assert impl["attention"].calls == layers, "the prefill did not run on the attention kernel"
        assert impl["decode"].calls == layers * (NEW_TOKENS - 1), "the decode steps did not run on the decode kernel"


def test_the_sliding_window_is_exercised():
    """The Qwen2 batches are longer than its window: without the window the logits differ."""
    ids, mask = _batch(24, "right")
    outs = []
    for sliding in (True, False):
        torch.manual_seed(_seed("qwen2-sliding"))
        model = _qwen2(sliding).eval()
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            outs.append(model(input_ids=ids, attention_mask=mask).logits)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


# --- the attention function itself ----------------------------------------------------------------


class _Module(torch.nn.Module):
    """What transformers' attention functions read from the attention module."""

    def __init__(self, groups=2):
        super().__init__()
        self.is_causal, self.num_key_value_groups = True, groups
        self.config = transformers.LlamaConfig(**TINY)


def _call_inputs(t, s, *, seed=0):
    q = utils.randn((2, 4, t, 16), seed=seed)
    k = utils.randn((2, 2, s, 16), seed=seed + 1)
    v = utils.randn((2, 2, s, 16), seed=seed + 2)
    return q, k, v


def _left_padding_mask(t, s):
    j, i = torch.arange(s), torch.arange(t).view(t, 1) + s - t
    pads = torch.tensor([0, 3]).view(2, 1, 1, 1)
    return (j <= i) & (j >= pads)  # (B, 1, T, S)


@pytest.mark.parametrize(
    "case,kw",
    [
        ("holes", {}),
        ("dropout", {"dropout": 0.5}),
        ("softcap", {"softcap": 30.0}),
        ("head-dim-12", {}),
    ],
)
def test_what_genkern_does_not_take_runs_sdpa(case, kw, impl):
    q, k, v = _call_inputs(9, 9, seed=3)
    mask = _left_padding_mask(9, 9)
    if case == "holes":
        mask = mask.clone()
        mask[0, 0, 8, 4] = False
    if case == "head-dim-12":
        q, k, v = (x[..., :12] for x in (q, k, v))
    args = (_Module(), q, k, v, mask)
    if case == "softcap":  # transformers' SDPA function refuses it: so does genkern's, with the same error
        with pytest.raises(ValueError, match="softcap"):
            gk_hf.attention_forward(*args, **kw)
        assert impl["sdpa"] == 1
        return
    torch.manual_seed(0)
    got, weights = gk_hf.attention_forward(*args, **kw)
    assert impl["sdpa"] == 1 and weights is None
    torch.manual_seed(0)
    want, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(*args, **kw)
    assert torch.equal(got, want)
    assert "attention" not in impl or impl["attention"].calls == 0


@pytest.mark.parametrize("window", (None, 4))
def test_decode_step_runs_the_decode_op(window, impl, monkeypatch):
    """One query per row against 11 cached keys, the second row left-padded by 3: attention_with_kvcache with
    cache_seqlens = 11, key_lo = the first key the mask shows (and the layer's window)."""
    calls = []
    decode = gk_hf._kv_decode.attention_with_kvcache
    monkeypatch.setattr(
        gk_hf._kv_decode, "attention_with_kvcache", lambda *a, **kw: calls.append(kw) or decode(*a, **kw)
    )
    q, k, v = _call_inputs(1, 11, seed=4)
    mask = _left_padding_mask(1, 11)
    if window is not None:
        mask = mask & (torch.arange(11) > 10 - window)  # transformers' window: j > i - window
    with torch.no_grad():
        got, _ = gk_hf.attention_forward(_Module(), q, k, v, mask, scaling=0.3, sliding_window=window)
        want, _ = transformers.integrations.sdpa_attention.sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    assert impl["sdpa"] == 0 and len(calls) == 1
    assert calls[0]["window_size"] == ((window - 1) if window else -1, -1)
    first = 7 if window == 4 else 3
    assert calls[0]["key_lo"].tolist() == [first if window else 0, first]
    torch.testing.assert_close(got, want)
    if "decode" in impl:
        assert impl["decode"].calls == 1


def test_register_is_idempotent_and_unregister_removes_it():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = transformers.LlamaConfig(**TINY, vocab_size=VOCAB)
    gk_hf.register()
    gk_hf.register()
    assert gk_hf.is_registered() and "genkern" in ALL_ATTENTION_FUNCTIONS and "genkern" in ALL_MASK_ATTENTION_FUNCTIONS
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="genkern")
    assert model.config._attn_implementation == "genkern"
    gk_hf.unregister()
    gk_hf.unregister()
    assert not gk_hf.is_registered() and "genkern" not in ALL_ATTENTION_FUNCTIONS
    assert "genkern" not in ALL_MASK_ATTENTION_FUNCTIONS
    with pytest.raises(ValueError, match="genkern"):
        transformers.AutoModelForCausalLM.from_config(config, attn_implementation="genkern")


def test_packed_sequences_equal_sdpa(impl, monkeypatch):
    """Sequences packed into one row (position_ids restarting, no attention_mask): transformers' mask is
    block-diagonal causal, which is a padding pattern too: the second sequence's queries see keys from 10 on."""
    key_lo = []
    spans = attention_op.span_attention
    monkeypatch.setattr(attention_op, "span_attention", lambda *a, **kw: key_lo.append(a[3]) or spans(*a, **kw))
    model = _model("llama")
    ids, _ = _batch(24, "right")
    position_ids = torch.cat([torch.arange(10), torch.arange(14)]).expand(3, 24)  # two sequences per row
    kw = {"input_ids": ids, "position_ids": position_ids, "use_cache": False}
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(**kw).logits
        model.set_attn_implementation("genkern")
        got = model(**kw).logits
    assert impl["sdpa"] == 0, "the genkern path fell back to transformers' SDPA function"
    torch.testing.assert_close(got, want)
    assert len(key_lo) == model.config.num_hidden_layers
    assert key_lo[0].tolist() == [[0] * 10 + [10] * 14] * 3
    if "attention" in impl:
        assert impl["attention"].calls == model.config.num_hidden_layers
