"""genkern.bench.baseline_models: the plain-PyTorch model baseline computes what the model computes.

A TransformerLM with its attention on PlainSDPAAttention (torch's SDPA, a plain cached loop) must give
the logits of the same model with impl="torch" (genkern's reference) to float32 rounding, without a
cache, at prefill and at every decoding step, and the same greedy tokens, for multi-head and
grouped-query heads, equal-length and ragged rows. The weights are drawn larger than the training
init (as in test_generation.py) so that greedy tokens keep depending on the context.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import genkern
from genkern.bench.baseline_models import PlainKVCache, PlainSDPAAttention, plain_sdpa, use_plain_sdpa
from genkern.generation import decode_one_token, prefill, sample_next
from genkern.models import ModelArgs, TransformerLM
from genkern.nn.attention import CausalAttention
from utils import one_thread  # noqa: F401 (autouse fixture)

V = 64
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding of logits of size ~1-10


def _model(n_kv_heads, positions="rotary", seed=3):
    torch.manual_seed(seed)
    args = ModelArgs(
        vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, max_seq_len=128, positions=positions
    )
    model = TransformerLM(args)
    args.impl = "torch"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "emb" in name else 2.0 / math.sqrt(p.shape[1]))
    return model.eval()


def _pair(n_kv_heads, positions="rotary"):
    ref = _model(n_kv_heads, positions)
    return ref, use_plain_sdpa(copy.deepcopy(ref))


HEADS = pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])


def test_swap_keeps_the_state_dict_and_parameters():
    ref, plain = _pair(2)
    assert sum(isinstance(m, PlainSDPAAttention) for m in plain.modules()) == 2
    assert not any(isinstance(m, PlainSDPAAttention) for m in ref.modules())
    assert list(plain.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ref.state_dict().values()))
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert use_plain_sdpa(torch.nn.Linear(2, 2)).weight.shape == (2, 2)  # nothing to swap: unchanged


def test_context_manager_restores_the_modules():
    model = _model(2)
    before = [m for m in model.modules() if isinstance(m, CausalAttention)]
    with plain_sdpa(model) as m:
        assert m is model and sum(isinstance(x, PlainSDPAAttention) for x in model.modules()) == 2
    assert [m for m in model.modules() if isinstance(m, CausalAttention)] == before
    with pytest.raises(RuntimeError, match="inside"), plain_sdpa(model):
        raise RuntimeError("inside")
    assert [m for m in model.modules() if isinstance(m, CausalAttention)] == before


@HEADS
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_full_sequence_logits(n_kv_heads, positions):
    ref, plain = _pair(n_kv_heads, positions)
    idx = torch.randint(0, V, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), ref(idx), **TOL)


def _decode(model, ids, lengths, cache, steps, chunk=None):
    """Greedy logits of prefill, an optional multi-token chunk, then `steps` single tokens."""
    out = [prefill(model, ids, lengths, cache)]
    if chunk is not None:
        out.append(model(chunk, cache)[:, -1])
        cache.advance(chunk.shape[1])
    for _ in range(steps):
        out.append(decode_one_token(model, sample_next(out[-1], do_sample=False), cache))
    return out


@HEADS
@pytest.mark.parametrize("plain_cache", [True, False], ids=["slice-copy", "masked"])
def test_cached_decoding_matches_the_reference(n_kv_heads, plain_cache):
    # PlainKVCache: equal rows, slice copy and no mask; a KVCache: the ragged path (scatter, mask).
    ref, plain = _pair(n_kv_heads)
    gen = torch.Generator().manual_seed(2)
    ids, chunk = torch.randint(0, V, (2, 9), generator=gen), torch.randint(0, V, (2, 3), generator=gen)
    lengths = torch.full((2,), 9)
    with torch.inference_mode():
        want = _decode(ref, ids, lengths, ref.new_cache(2, 40), 12, chunk)
        cache = PlainKVCache.for_model(plain, 2, 40) if plain_cache else plain.new_cache(2, 40)
        got = _decode(plain, ids, lengths, cache, 12, chunk)
    assert getattr(cache, "uniform", True)
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"step {step}: {m}")
        assert torch.equal(g.argmax(-1), w.argmax(-1)), step


@HEADS
def test_ragged_rows(n_kv_heads):
    ref, plain = _pair(n_kv_heads)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, V, (n,), generator=gen) for n in (5, 13, 1)]
    with torch.inference_mode():
        want = genkern.generate(ref, prompts, 20, do_sample=False)
        got = genkern.generate(plain, prompts, 20, do_sample=False)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        # The logits of every step, through a PlainKVCache that learns at prefill that rows differ.
        ids = torch.zeros(3, 13, dtype=torch.int64)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        lengths = torch.tensor([len(p) for p in prompts])
        chunk = torch.randint(0, V, (3, 2), generator=gen)
        want = _decode(ref, ids, lengths, ref.new_cache(3, 40), 8, chunk)
        cache = PlainKVCache.for_model(plain, 3, 40)
        got = _decode(plain, ids, lengths, cache, 8, chunk)
    assert cache.uniform is False
    for step, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"step {step}: {m}")


def test_plain_cache_tracks_equal_rows():
    cache = PlainKVCache.for_model(_model(2), 3, 16)
    assert cache.k.shape == (2, 3, 2, 16, 16) and cache.uniform
    cache.advance(torch.tensor([4, 4, 4]))
    assert cache.uniform and cache.max_len == 4
    cache.advance(2)
    assert cache.uniform and cache.max_len == 6
    cache.advance(torch.tensor([1, 0, 1]))
    assert not cache.uniform
    cache.advance(1)
    assert not cache.uniform
    cache.reset()
    assert cache.uniform and cache.max_len == 0


def test_full_cache_raises():
    plain = use_plain_sdpa(_model(2))
    cache = PlainKVCache.for_model(plain, 1, 10)
    with torch.inference_mode():
        prefill(plain, torch.zeros(1, 8, dtype=torch.int64), torch.tensor([8]), cache)
        attn = next(m for m in plain.modules() if isinstance(m, PlainSDPAAttention))
        q, k = torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16)
        with pytest.raises(ValueError, match="the KV cache is full"):
            attn(q, k, k, cache, 0)


def test_train_step_case_runs_the_baseline():
    # The "torch" impl of the Transformer's train_step is the SDPA model; VAE and GAN keep their ops.
    from genkern.bench import training
    from genkern.train.families import get_family

    case = training.TrainStepCase("transformer", "digits", 4)
    fam, _, config = case._setup()
    config = dict(config, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)
    model = training.build_step_model(fam, config, "torch", "cpu")
    assert model.args.impl == "torch"
    assert sum(isinstance(m, PlainSDPAAttention) for m in model.modules()) == 1
    fast = training.build_step_model(fam, config, "auto", "cpu")
    assert not any(isinstance(m, PlainSDPAAttention) for m in fast.modules())
    inputs = case.make_inputs("cpu")
    with torch.no_grad():
        torch.testing.assert_close(model.loss(inputs["tokens"]), fast.loss(inputs["tokens"]), rtol=1e-5, atol=1e-6)
    assert len(case.impl_fn("torch")(inputs)) > 0  # one whole step runs on the baseline
    vae_config = training.TrainStepCase("vae", "digits", 4)._setup()[2]
    vae = training.build_step_model(get_family("vae"), vae_config, "torch", "cpu")
    assert not any(isinstance(m, CausalAttention) for m in vae.modules())
