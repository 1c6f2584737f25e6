"""genkern.generate and its parts (prefill, decode_one_token, sample_next).

Greedy decoding with the KV cache must give exactly the tokens of use_cache=False
(which recomputes the whole context at every step). The model's weights are drawn
larger than the training init so that greedy decoding does not settle into a short
loop: the tokens keep depending on the context, and the gap between the two largest
logits stays ~1e-3 of their spread or more, far above float32 rounding (~1e-6), so
exact equality is the right test and a wrong cache entry shows as a changed token.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import genkern
from genkern.generation import decode_one_token, prefill, sample_next
from genkern.models import ModelArgs, TransformerLM
from utils import assert_close_rule, one_thread  # noqa: F401 (autouse fixture)

V = 64
N_NEW = 200
PROMPTS = [[int(x) for x in torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))] for n in (5, 11, 2)]


def _make_model(positions, seed):
    torch.manual_seed(seed)
    model = TransformerLM(
        ModelArgs(
            vocab_size=V,
            dim=64,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=256,
            positions=positions,
            impl="torch",
        )
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3 if "emb" in name else 2.0 / math.sqrt(p.shape[1]))
    return model.eval()


_MODELS = {}


def model_for(impl="torch", positions="rotary"):
    """The test model (fixed weights) with attention impl `impl`; built once per process."""
    if ("torch", positions) not in _MODELS:
        _MODELS["torch", positions] = _make_model(positions, seed=2 if positions == "rotary" else 0)
    if (impl, positions) not in _MODELS:
        m = copy.deepcopy(_MODELS["torch", positions])
        m.args.impl = impl
        _MODELS[impl, positions] = m
    return _MODELS[impl, positions]


def greedy(model, prompt, n=N_NEW, **kw):
    return genkern.generate(model, prompt, n, do_sample=False, **kw)


def assert_not_degenerate(new_tokens):
    # The comparison only means something if the tokens keep changing.
    assert len(set(new_tokens.tolist())) >= 8, f"degenerate generation: {new_tokens.tolist()[:40]}"


# --- greedy: the cache changes nothing ----------------------------------------------------------


@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_greedy_cache_matches_no_cache_batch1(impl):
    model = model_for(impl)
    prompt = torch.tensor(PROMPTS[1])
    out = greedy(model, prompt)
    assert out.shape == (len(PROMPTS[1]) + N_NEW,) and out.dtype == torch.int64
    assert torch.equal(out[: len(PROMPTS[1])], prompt)
    assert_not_degenerate(out[len(PROMPTS[1]) :])
    assert torch.equal(out, greedy(model, prompt, use_cache=False))


@pytest.mark.parametrize(
    "impl,positions", [("torch", "rotary"), ("cpp", "rotary"), ("torch", "learned"), ("cpp", "learned")]
)
def test_greedy_cache_matches_no_cache_ragged(impl, positions):
    model = model_for(impl, positions)
    outs = greedy(model, PROMPTS)
    assert isinstance(outs, list) and len(outs) == 3
    for p, o in zip(PROMPTS, outs):
        assert o.shape == (len(p) + N_NEW,) and o[: len(p)].tolist() == p
        assert_not_degenerate(o[len(p) :])
    for row, (o, want) in enumerate(zip(outs, greedy(model, PROMPTS, use_cache=False))):
        assert torch.equal(o, want), f"row {row}: first difference at {int((o != want).nonzero()[0])}"
    for row, p in enumerate(PROMPTS):  # each row equals generating its prompt alone
        alone = greedy(model, torch.tensor(p))
        assert torch.equal(outs[row], alone), f"row {row} differs from its prompt generated alone"


def test_impls_generate_the_same_tokens():
    assert all(
        torch.equal(a, b)
        for a, b in zip(greedy(model_for("torch"), PROMPTS, 60), greedy(model_for("cpp"), PROMPTS, 60))
    )


def test_tensor_prompts():
    model = model_for()
    batch = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])  # (2, 5)
    out = greedy(model, batch, 20)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], batch)
    assert torch.equal(out[0], greedy(model, batch[0], 20))
    assert torch.equal(out[1], greedy(model, [PROMPTS[0][::-1]], 20)[0])
    assert torch.equal(greedy(model, batch.int(), 20), out)  # int32 prompts too
    assert torch.equal(greedy(model, batch, 0), batch)  # no new tokens: the prompt
    # The longest prompt that fits: prompt + new tokens = max_seq_len.
    long = torch.randint(0, V, (250,), generator=torch.Generator().manual_seed(5))
    assert greedy(model, long, 6).shape == (256,)


# --- sampling -----------------------------------------------------------------------------------


def test_sampling_reproducible_with_a_seeded_generator():
    model = model_for()
    kw = dict(do_sample=True, temperature=1.5, top_k=20)

    def run(seed, **more):
        return genkern.generate(model, PROMPTS, 60, generator=torch.Generator().manual_seed(seed), **kw, **more)

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, greedy(model, PROMPTS, 60)))
    # The cache does not change what is sampled either.
    assert all(torch.equal(x, y) for x, y in zip(a, run(0, use_cache=False)))


@pytest.mark.parametrize(
    "kw",
    (dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0), dict(top_k=1, top_p=0.9)),
    ids=("top_k-1", "top_p-tiny", "temperature-0", "top_k-1-top_p"),
)
def test_sampling_limits_equal_greedy(kw):
    model = model_for()
    want = greedy(model, PROMPTS, 60)
    got = genkern.generate(model, PROMPTS, 60, do_sample=True, generator=torch.Generator().manual_seed(3), **kw)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_sample_next_top_k_top_p():
    # probabilities 0.5, 0.3, 0.15, 0.05 (in a shuffled order), 2 identical rows.
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().repeat(2, 1)
    g = torch.Generator().manual_seed(0)

    def counts(**kw):
        draws = torch.stack([sample_next(logits, generator=g, **kw) for _ in range(2000)])  # (2000, 2)
        assert draws.dtype == torch.int64 and draws.shape == (2000, 2)
        return torch.bincount(draws.flatten(), minlength=4).double() / draws.numel()

    freq = counts()
    assert (freq - probs).abs().max() < 0.03, freq
    freq = counts(top_k=2)  # tokens 1 and 3 only, renormalised: 0.625, 0.375
    assert freq[0] == 0 and freq[2] == 0 and abs(freq[1] - 0.625) < 0.03, freq
    freq = counts(top_p=0.7)  # the smallest prefix reaching 0.7: 0.5 + 0.3
    assert freq[0] == 0 and freq[2] == 0 and abs(freq[1] - 0.625) < 0.03, freq
    freq = counts(top_p=0.85)  # 0.5 + 0.3 + 0.15 >= 0.85
    assert freq[2] == 0 and abs(freq[0] - 0.15 / 0.95) < 0.03, freq
    freq = counts(temperature=0.5)  # p^2 renormalised
    sharp = probs**2 / (probs**2).sum()
    assert (freq - sharp).abs().max() < 0.03, freq
    assert torch.equal(sample_next(logits, do_sample=False), torch.tensor([1, 1]))


# --- eos and the streamer ---------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, tokens):
        assert self.ends == 0, "put() after end()"
        self.puts.append(tokens.clone())

    def end(self):
        self.ends += 1


def _first_new_token_not_in_prompt(row, prompt_len, after):
    for i in range(prompt_len + after, len(row)):
        tok = int(row[i])
        if tok not in row[:i].tolist():
            return i, tok
    raise AssertionError("no fresh token")


def test_eos_stops_rows_and_pads():
    model = model_for()
    free = greedy(model, PROMPTS, 60)
    # Row 0's first emission of a token it has not produced before, at least 10 steps in.
    i, eos = _first_new_token_not_in_prompt(free[0], len(PROMPTS[0]), 10)
    rec = Recorder()
    outs = genkern.generate(model, PROMPTS, 60, do_sample=False, eos_token_id=eos, streamer=rec)
    for p, o, f in zip(PROMPTS, outs, free):
        hits = (f[len(p) :] == eos).nonzero()
        stop = len(p) + int(hits[0]) if len(hits) else None  # where this row emits eos
        if stop is None:
            assert torch.equal(o, f[: len(o)])  # never stops: unchanged
        else:
            assert torch.equal(o[: stop + 1], f[: stop + 1])  # unchanged up to eos ...
            assert bool((o[stop + 1 :] == eos).all())  # ... then eos only
    assert int((outs[0] == eos).nonzero()[0]) == i
    steps = len(outs[0]) - len(PROMPTS[0])
    assert all(len(o) - len(p) == steps for p, o in zip(PROMPTS, outs))
    assert len(rec.puts) == steps and rec.ends == 1


def test_eos_everywhere_stops_early():
    # eos = each row's first new token under greedy decoding (a batch of one prompt
    # repeated): every row stops after one step.
    model = model_for()
    first = int(greedy(model, [PROMPTS[2]], 1)[0][-1])
    rec = Recorder()
    out = genkern.generate(model, torch.tensor([PROMPTS[2]] * 2), 50, do_sample=False, eos_token_id=first, streamer=rec)
    assert out.shape == (2, len(PROMPTS[2]) + 1) and bool((out[:, -1] == first).all())
    assert len(rec.puts) == 1 and rec.ends == 1


def test_streamer_gets_every_token():
    model = model_for()
    rec = Recorder()
    outs = greedy(model, PROMPTS, 30, streamer=rec)
    assert len(rec.puts) == 30 and rec.ends == 1
    streamed = torch.stack(rec.puts, dim=1)  # (B, 30)
    assert all(t.shape == (3,) and t.dtype == torch.int64 for t in rec.puts)
    for p, o, s in zip(PROMPTS, outs, streamed):
        assert torch.equal(o[len(p) :], s)
    rec = Recorder()
    greedy(model, PROMPTS, 0, streamer=rec)
    assert rec.puts == [] and rec.ends == 1


# --- prefill and decode_one_token -----------------------------------------------------------------


@pytest.mark.parametrize("impl", ("torch", "cpp"))
def test_prefill_and_decode_one_token(impl):
    model = model_for(impl)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    ids = torch.zeros(3, int(lengths.max()), dtype=torch.int64)
    for r, p in enumerate(PROMPTS):
        ids[r, : len(p)] = torch.tensor(p)
    cache = model.new_cache(3, 32)
    with torch.no_grad():
        logits = prefill(model, ids, lengths, cache)
        assert logits.shape == (3, V) and cache.seqlens.tolist() == lengths.tolist()
        nxt = torch.tensor([7, 8, 9])
        step = decode_one_token(model, nxt, cache)
        assert step.shape == (3, V) and cache.seqlens.tolist() == (lengths + 1).tolist()
    model64 = copy.deepcopy(model_for("torch")).double()
    for r, p in enumerate(PROMPTS):
        idx = torch.tensor([p + [7 + r]])
        with torch.no_grad():
            full32, full64 = model_for("torch")(idx)[0], model64(idx)[0]  # (len + 1, V)
        assert_close_rule(logits[r], full64[-2], full32[-2], name=f"prefill logits, row {r}")
        assert_close_rule(step[r], full64[-1], full32[-1], name=f"decode logits, row {r}")


P0 = torch.tensor(PROMPTS[0])


# --- bad arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt,n,kw,match",
    [
        (P0, -1, {}, r"^max_new_tokens must be an int >= 0, got -1"),
        (P0, 2.0, {}, r"^max_new_tokens must be an int >= 0"),
        (torch.zeros(257, dtype=torch.int64), 0, {}, r"prompt plus max_new_tokens \(257\) exceeds .* 256"),
        (torch.zeros(250, dtype=torch.int64), 7, {}, r"prompt plus max_new_tokens \(257\) exceeds .* 256"),
        ([[1] * 257, [2]], 1, {}, r"\(258\) exceeds"),
        (torch.zeros(0, dtype=torch.int64), 3, {}, r"at least one token"),
        (torch.zeros(2, 0, dtype=torch.int64), 3, {}, r"at least one token"),
        (torch.zeros(0, 4, dtype=torch.int64), 3, {}, r"at least one row"),
        ([], 3, {}, r"non-empty list of non-empty token sequences"),
        ([[1, 2], []], 3, {}, r"non-empty list of non-empty token sequences"),
        (torch.tensor([1.0, 2.0]), 3, {}, r"integer tensor, got torch.float32"),
        (torch.zeros(1, 2, 3, dtype=torch.int64), 3, {}, r"\(T,\) or \(B, T\) integer tensor"),
        ([[1.5, 2.0]], 3, {}, r"integer token ids, got torch.float32"),
        ([[True, False]], 3, {}, r"integer token ids, got torch.bool"),
        ([1, 2, 3], 3, {}, r"list must hold 1-d token sequences"),
        ([[[1, 2]]], 3, {}, r"list must hold 1-d token sequences"),
        (P0, 3, dict(temperature=-1.0), r"temperature >= 0"),
        (P0, 3, dict(top_k=0), r"top_k >= 1"),
        (P0, 3, dict(top_p=0.0), r"0 < top_p <= 1"),
        (P0, 3, dict(top_p=1.5), r"0 < top_p <= 1"),
    ],
    ids=(
        "n-negative",
        "n-float",
        "prompt-too-long",
        "prompt-plus-new-too-long",
        "ragged-too-long",
        "empty-1d",
        "empty-2d",
        "no-rows",
        "empty-list",
        "empty-row",
        "float-tensor",
        "3d-tensor",
        "float-list",
        "bool-list",
        "flat-list",
        "3d-list",
        "temperature",
        "top_k",
        "top_p-0",
        "top_p-big",
    ),
)
def test_bad_arguments(prompt, n, kw, match):
    with pytest.raises(ValueError, match=match):
        genkern.generate(model_for(), prompt, n, **kw)
