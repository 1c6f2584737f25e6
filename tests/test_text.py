"""genkern.data.text: the standard-library character corpus and its training windows."""

from __future__ import annotations

import importlib
import os
import string

import pytest
import torch

T = importlib.import_module("genkern.data.text")  # the module: genkern.data.text is the function


def test_vocab_is_fixed():
    assert T.VOCAB[0] == "\n" and T.VOCAB[-1] == T.PLACEHOLDER
    assert "".join(T.VOCAB[1:-1]) == "".join(chr(c) for c in range(32, 127))
    c = T.text("valid")
    assert c.vocab == T.VOCAB and c.vocab_size == 97
    # Ids are a property of the character, not of the text: fixed values.
    assert T.encode("\n A~").tolist() == [0, 1, 34, 95]


def test_encode_decode_round_trip():
    s = string.digits + string.ascii_letters + string.punctuation + " \n"
    ids = T.encode(s)
    assert ids.dtype == torch.int64 and ids.shape == (len(s),)
    assert T.decode(ids) == s
    assert T.decode(ids.tolist()) == s
    assert T.decode(ids.to(torch.int32)) == s
    assert T.encode("").shape == (0,) and T.decode(torch.zeros(0, dtype=torch.int64)) == ""


def test_other_characters_become_the_placeholder():
    ids = T.encode("a\tb\u00e9c\r")
    unk = len(T.VOCAB) - 1
    assert ids.tolist() == [T.encode("a").item(), unk, T.encode("b").item(), unk, T.encode("c").item(), unk]
    assert T.decode(ids) == f"a{T.PLACEHOLDER}b{T.PLACEHOLDER}c{T.PLACEHOLDER}"


def test_corpus_files_are_the_fixed_stdlib_list():
    c = T.text("train")
    assert len(c.files) == len(T.STDLIB_FILES) >= 40
    assert list(T.STDLIB_FILES) == sorted(T.STDLIB_FILES)
    root = os.path.abspath(T.stdlib_dir())
    assert all(f.startswith(root) and f.endswith(".py") for f in c.files)


def test_splits_are_contiguous_disjoint_and_cover_the_text():
    tr, va, te = T.text("train"), T.text("valid"), T.text("test")
    parts = []
    for p in tr.files:
        with open(p, encoding="utf-8", errors="replace") as f:
            s = f.read()
        parts.append(s if s.endswith("\n") else s + "\n")
    full = T.encode("".join(parts))
    n = full.numel()
    assert n > 500_000  # about a million characters on CPython 3.11
    assert (len(tr), len(va), len(te)) == (int(0.9 * n), int(0.95 * n) - int(0.9 * n), n - int(0.95 * n))
    # Concatenated in order they are exactly the text: no character is in two splits, none is lost.
    assert torch.equal(torch.cat([tr.ids, va.ids, te.ids]), full)
    # Python source is mostly printable ASCII: the placeholder is rare.
    assert (full == len(T.VOCAB) - 1).float().mean() < 1e-3


def test_deterministic_memoized_and_copies():
    a, b = T.text("train"), T.text("train")
    assert torch.equal(a.ids, b.ids) and a.ids.dtype == torch.int64 and a.ids.dim() == 1
    hits = T._load.cache_info().hits
    T.text("test")
    assert T._load.cache_info().hits == hits + 1
    # Each corpus object owns its ids: writing into one leaves the memoized text intact.
    a.ids[:10] = 0
    assert torch.equal(T.text("train").ids, b.ids)


def test_max_chars_is_a_prefix():
    full = T.text("valid")
    c = T.text("valid", max_chars=1000)
    assert torch.equal(c.ids, full.ids[:1000])
    assert len(T.text("valid", max_chars=10**9)) == len(full)


def test_random_windows_shapes_contents_and_determinism():
    ids = torch.arange(1000)
    g = torch.Generator().manual_seed(3)
    w = T.random_windows(ids, 16, 31, g)
    assert w.shape == (16, 32) and w.dtype == ids.dtype
    # Every row is seq_len + 1 consecutive ids.
    assert torch.equal(w - w[:, :1], torch.arange(32).expand(16, 32))
    assert int(w.max()) <= 999
    again = T.random_windows(ids, 16, 31, torch.Generator().manual_seed(3))
    other = T.random_windows(ids, 16, 31, torch.Generator().manual_seed(4))
    assert torch.equal(w, again) and not torch.equal(w, other)
    # The edge case: exactly one possible window.
    assert torch.equal(T.random_windows(torch.arange(5), 2, 4), torch.arange(5).expand(2, 5))


def test_batches_are_seeded_and_leave_the_global_rng_alone():
    ids = T.text("valid").ids
    state = torch.get_rng_state()
    a = list(T.batches(ids, 4, 16, steps=3, seed=7))
    assert torch.equal(torch.get_rng_state(), state)
    b = list(T.batches(ids, 4, 16, steps=3, seed=7))
    assert len(a) == 3 and all(x.shape == (4, 17) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])
    assert list(T.batches(ids, 4, 16, steps=0)) == []


def test_contiguous_windows_predict_every_id_once():
    ids = torch.arange(103)
    w = T.contiguous_windows(ids, 10)
    assert w.shape == (10, 11)
    assert torch.equal(w[:, 1:].reshape(-1), torch.arange(1, 101))  # targets 1..100, once each
    assert torch.equal(w[1:, 0], w[:-1, -1])  # neighbours share one id


@pytest.mark.parametrize("split", ["training", "", None, "Train"])
def test_bad_split(split):
    with pytest.raises(ValueError, match="split"):
        T.text(split)


@pytest.mark.parametrize("max_chars", [0, -5, 1.5, True, "10"])
def test_bad_max_chars(max_chars):
    with pytest.raises(ValueError, match="max_chars"):
        T.text("train", max_chars=max_chars)


def test_missing_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Python source files"):
        T.text("train", root=tmp_path)
    (tmp_path / "abc.py").write_text("x = 1\n")
    with pytest.raises(FileNotFoundError, match="missing.*argparse.py"):
        T.text("train", root=tmp_path)


def test_bad_encode_decode_input():
    with pytest.raises(TypeError, match="s must be a str"):
        T.encode(b"bytes")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 97\)"):
        T.decode([0, 97])
    with pytest.raises(ValueError, match="ids must lie"):
        T.decode(torch.tensor([-1]))
    with pytest.raises(ValueError, match="1-d integer"):
        T.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-d integer"):
        T.decode(torch.zeros(2, 2, dtype=torch.int64))


def test_bad_window_input():
    ids = torch.arange(100)
    with pytest.raises(ValueError, match="ids must be a 1-d integer tensor"):
        T.random_windows(ids.view(10, 10), 2, 4)
    with pytest.raises(ValueError, match="ids must be a 1-d integer tensor"):
        T.random_windows(ids.float(), 2, 4)
    with pytest.raises(ValueError, match="ids must be a 1-d integer tensor"):
        T.random_windows(list(range(100)), 2, 4)
    with pytest.raises(ValueError, match="seq_len"):
        T.random_windows(ids, 2, 0)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        T.random_windows(ids, 2, 100)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        T.contiguous_windows(ids, 100)
    with pytest.raises(ValueError, match="n must be"):
        T.random_windows(ids, 0, 4)
    # batches checks when called, not at the first next().
    with pytest.raises(ValueError, match="batch_size"):
        T.batches(ids, 0, 4, steps=1)
    with pytest.raises(ValueError, match="steps"):
        T.batches(ids, 2, 4, steps=-1)
