"""genkern.models.TransformerLM: shapes, training, impl agreement, cached decoding.

Agreement between impls and between the cached and the full forward uses the rule of
DESIGN.md (utils.assert_close_rule) against the same model in float64 with impl="torch":
the float32 result under test may be off by at most 2x the float32 plain-PyTorch
model's error plus a small floor, and within utils.ABS_TOL (1e-5 relative to
max(1, max |reference|)). Logits and gradients here are O(1), so that is about 1e-5:
float32 rounding through two layers is ~1e-6, while a wrong mask, position or cache
entry moves logits by ~1e-2 or more.
"""

from __future__ import annotations

import copy

import pytest
import torch

import genkern
from genkern.models import ModelArgs, TransformerLM
from utils import assert_close_rule, one_thread  # noqa: F401 (autouse fixture)

V = 64


def make_model(*, positions="rotary", n_heads=4, n_kv_heads=2, impl="torch", seed=0, perturb=True, **kw):
    """A small model; `perturb` moves the biases off 0 and the LayerNorm weights off 1
    (as after training), so that no parameter's gradient is zero or symmetric by construction."""
    torch.manual_seed(seed)
    args = ModelArgs(
        vocab_size=V,
        dim=64,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        max_seq_len=64,
        positions=positions,
        impl=impl,
        **kw,
    )
    model = TransformerLM(args)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model


def with_impl(model, impl, dtype=torch.float32):
    """A copy of model running `impl` in `dtype` (the copy has its own ModelArgs)."""
    m = copy.deepcopy(model).to(dtype)
    m.args.impl = impl
    return m


def tokens(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "rotary-gqa": dict(positions="rotary", n_heads=4, n_kv_heads=2),
    "rotary-mha": dict(positions="rotary", n_heads=4, n_kv_heads=None),
    "learned-mqa": dict(positions="learned", n_heads=4, n_kv_heads=1),
    "learned-gqa-untied": dict(positions="learned", n_heads=2, n_kv_heads=1, tie_embeddings=False),
}


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_forward_shapes(config):
    model = make_model(**CONFIGS[config])
    a = model.args
    assert a.n_kv_heads == (a.n_heads if CONFIGS[config]["n_kv_heads"] is None else CONFIGS[config]["n_kv_heads"])
    assert a.mlp_hidden == 4 * a.dim and a.head_dim == a.dim // a.n_heads
    assert (model.pos_emb is None) == (a.positions == "rotary")
    assert (model.head.weight is model.tok_emb.weight) == a.tie_embeddings
    hd = a.head_dim
    assert model.blocks[0].attn.wqkv.weight.shape == ((a.n_heads + 2 * a.n_kv_heads) * hd, a.dim)
    for b, t in ((1, 1), (3, 17), (2, 64)):
        logits = model(tokens(b, t))
        assert logits.shape == (b, t, V) and logits.dtype == torch.float32
        assert bool(torch.isfinite(logits).all())
    assert model.config()["positions"] == a.positions and model.config()["vocab_size"] == V


@pytest.mark.parametrize("config", ("rotary-gqa", "learned-mqa"))
def test_forward_is_causal(config):
    # Changing token 9 changes the logits at positions >= 9 and no earlier ones.
    model = make_model(**CONFIGS[config])
    idx = tokens(2, 16, seed=1)
    idx2 = idx.clone()
    idx2[:, 9] = (idx2[:, 9] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert torch.equal(a[:, :9], b[:, :9])
    assert bool(((a[:, 9:] - b[:, 9:]).abs().amax(dim=-1) > 1e-4).all())


def test_forward_too_long_raises():
    model = make_model()
    with pytest.raises(ValueError, match=r"65 tokens after 0 cached ones exceed max_seq_len=64"):
        model(tokens(1, 65))
    cache = model.new_cache(1, max_seq_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"9 tokens after 0 cached ones exceed max_seq_len=8"):
        model(tokens(1, 9), cache)
    with torch.no_grad():
        model(tokens(1, 6), cache)
    cache.advance(6)
    k0 = cache.k.clone()
    with torch.no_grad(), pytest.raises(ValueError, match=r"3 tokens after 6 cached ones exceed max_seq_len=8"):
        model(tokens(1, 3), cache)
    assert torch.equal(cache.k, k0) and cache.seqlens.tolist() == [6]


def test_new_cache():
    model = make_model(**CONFIGS["learned-mqa"])
    c = model.new_cache(3)
    assert c.k.shape == (2, 3, 1, 64, 16) and c.k.dtype == torch.float32 and c.seqlens.tolist() == [0, 0, 0]
    c = model.new_cache(2, 10, dtype=torch.float64)
    assert c.k.shape == (2, 2, 1, 10, 16) and c.v.dtype == torch.float64


# --- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ("torch", "cpp"))
@pytest.mark.parametrize("positions", ("rotary", "learned"))
def test_learns_a_repeating_sequence(positions, impl):
    model = make_model(positions=positions, impl=impl, perturb=False)  # the training init
    seq = torch.tensor([3, 17, 42, 8, 25, 60, 11, 5] * 4)[None]  # (1, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(seq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5, losses[0]  # about log(64) = 4.16 at the start
    assert losses[-1] < 0.3, losses  # the sequence is learned ...
    assert all(b < a for a, b in zip(losses[::5], losses[5::5])), losses
    model.eval()
    out = genkern.generate(model, seq[0, :8], 24, do_sample=False)
    assert torch.equal(out, seq[0])  # ... and continued from its first period


# --- impls agree -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_cpp_matches_torch(config):
    base = make_model(**CONFIGS[config])
    idx = tokens(2, 33, seed=2)
    results = {}
    for name, impl, dtype in (
        ("cpp", "cpp", torch.float32),
        ("torch32", "torch", torch.float32),
        ("torch64", "torch", torch.float64),
    ):
        m = with_impl(base, impl, dtype)
        logits = m(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
        loss.backward()
        results[name] = (logits, {n: p.grad for n, p in m.named_parameters()})
    (out, grads), (same, grads_same), (ref, grads_ref) = results["cpp"], results["torch32"], results["torch64"]
    assert_close_rule(out, ref, same, name="logits")
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert grads[n] is not None, n
        assert_close_rule(grads[n], grads_ref[n], grads_same[n], name=f"grad {n}")


# --- cached decoding ---------------------------------------------------------------------------


def _cached_logits(model, idx, schedule, lengths=None, prefill=None):
    """Feeds idx (B, T) through a KVCache: a prefill of schedule[0] tokens, then chunks
    of schedule[1:] tokens (1: one decoding step). With per-row `lengths`, the prefill is
    right-padded: row b holds lengths[b] real tokens and continues from there.
    `prefill` (B, schedule[0]) replaces idx's first tokens in the prefill (the padding).

    Returns (B, 1 + sum(schedule[1:]), V): each row's logits from its position
    lengths[b] - 1 onwards.
    """
    b, t = idx.shape
    cache = model.new_cache(b)
    first = schedule[0]
    lengths = torch.full((b,), first) if lengths is None else torch.as_tensor(lengths)
    with torch.no_grad():
        logits = model(idx[:, :first] if prefill is None else prefill, cache)
        cache.advance(lengths.to(torch.int32))
        rows = [[logits[r, lengths[r] - 1]] for r in range(b)]
        pos = lengths.clone()
        for n in schedule[1:]:
            chunk = torch.stack([idx[r, pos[r] : pos[r] + n] for r in range(b)])  # (B, n)
            logits = model(chunk, cache)
            cache.advance(n)
            for r in range(b):
                rows[r].extend(logits[r])
            pos += n
    assert cache.seqlens.tolist() == pos.tolist()
    return torch.stack([torch.stack(r) for r in rows])


@pytest.mark.parametrize(
    "schedule", ([7] + [1] * 13, [7, 5, 1, 1, 3, 1, 1, 1], [1] * 20), ids=("prefill-then-steps", "chunks", "steps-only")
)
@pytest.mark.parametrize("impl", ("torch", "cpp"))
@pytest.mark.parametrize("config", CONFIGS)
def test_cached_forward_matches_full(config, impl, schedule):
    base = make_model(**CONFIGS[config])
    idx = tokens(2, sum(schedule), seed=3)
    model = with_impl(base, impl).eval()
    cached = _cached_logits(model, idx, schedule)
    with torch.no_grad():
        full64 = with_impl(base, "torch", torch.float64)(idx)
        full32 = with_impl(base, "torch")(idx)
    start = schedule[0] - 1
    assert_close_rule(cached, full64[:, start:], full32[:, start:], name="cached logits")


@pytest.mark.parametrize("impl", ("torch", "cpp"))
@pytest.mark.parametrize("config", ("rotary-gqa", "learned-mqa"))
def test_cached_forward_ragged(config, impl):
    # Rows of a right-padded prefill hold 9, 3 and 6 real tokens; each then decodes its
    # own continuation from its own position, with the padding's cache entries stale.
    base = make_model(**CONFIGS[config])
    idx = tokens(3, 20, seed=4)
    lengths = [9, 3, 6]
    padded = idx.clone()
    for r, n in enumerate(lengths):
        padded[r, n:9] = 0  # what sits in the padding must not matter
    model = with_impl(base, impl).eval()
    cached = _cached_logits(model, idx, [9] + [1] * 10, lengths)
    cached_pad = _cached_logits(model, idx, [9] + [1] * 10, lengths, prefill=padded[:, :9])
    with torch.no_grad():
        full64 = with_impl(base, "torch", torch.float64)(idx)
        full32 = with_impl(base, "torch")(idx)
    for r, n in enumerate(lengths):
        want64, want32 = full64[r, n - 1 : n + 10], full32[r, n - 1 : n + 10]
        assert_close_rule(cached[r], want64, want32, name=f"row {r}")
        assert_close_rule(cached_pad[r], want64, want32, name=f"row {r} (other padding)")


# --- ModelArgs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(vocab_size=0), r"^vocab_size must be a positive int, got 0"),
        (dict(dim=-8), r"^dim must be a positive int"),
        (dict(n_layers=2.0), r"^n_layers must be a positive int, got 2.0"),
        (dict(n_heads="4"), r"^n_heads must be a positive int"),
        (dict(n_kv_heads=0), r"^n_kv_heads must be a positive int"),
        (dict(max_seq_len=0), r"^max_seq_len must be a positive int"),
        (dict(mlp_hidden=0), r"^mlp_hidden must be a positive int"),
        (dict(dim=60, n_heads=8), r"^dim=60 must be a multiple of n_heads=8"),
        (dict(n_heads=4, n_kv_heads=3), r"n_heads of n_kv_heads=3"),
        (dict(positions="alibi"), r"^positions must be 'rotary' or 'learned', got 'alibi'"),
        (dict(dim=12, n_heads=4), r"^rotary positions need an even head dim, got 3"),
        (dict(impl="fast"), r"^impl must be one of auto, torch, cpp, triton, got 'fast'"),
    ],
    ids=(
        "vocab-0",
        "dim-neg",
        "layers-float",
        "heads-str",
        "kv-heads-0",
        "len-0",
        "mlp-0",
        "dim-heads",
        "heads-kv-heads",
        "positions",
        "rotary-odd",
        "impl",
    ),
)
def test_model_args_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        ModelArgs(**kw)


def test_model_args_defaults():
    a = ModelArgs(dim=64, n_heads=4)
    assert a.n_kv_heads == 4 and a.mlp_hidden == 256 and a.head_dim == 16
    ModelArgs(dim=12, n_heads=4, positions="learned")  # odd head dims are fine without rotary
    assert ModelArgs(impl=None).impl == "auto" and ModelArgs(impl="cpp").impl == "cpp"


def test_attention_is_the_nn_module_under_the_checkpoint_names():
    # One attention implementation: genkern.nn's module, whose state_dict names are the
    # TransformerLM's own (wqkv, wo), so checkpoints written before it still load.
    model = make_model()
    attn = model.blocks[0].attn
    assert isinstance(attn, genkern.nn.CausalSelfAttention)
    assert attn.wqkv is attn.qkv and attn.wo is attn.proj
    sd = model.state_dict()
    assert [k for k in sd if k.startswith("blocks.0.attn.")] == ["blocks.0.attn.wqkv.weight", "blocks.0.attn.wo.weight"]
    other = make_model(seed=1)
    other.load_state_dict(sd)
    idx = tokens(2, 9)
    assert torch.equal(other(idx), model(idx))
    with pytest.raises(RuntimeError, match="blocks.0.attn.wqkv.weight"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "blocks.0.attn.wqkv.weight"})


def test_impl_follows_the_model_args():
    # Callers switch a built model's impl through its args (genkern profile does).
    model = make_model(impl="cpp")
    idx = tokens(1, 5)
    with torch.no_grad():
        model(idx)
        model.args.impl = "bogus"
        with pytest.raises(ValueError, match="impl must be one of"):
            model(idx)
