"""A character-level text corpus built from the Python standard library's own sources.

Nothing is downloaded: the text is the concatenation of a fixed list of pure-Python
modules that every CPython 3.10+ ships (read from `sysconfig.get_paths()["stdlib"]`),
so the corpus is the same on every machine with the same Python minor version.

Characters map to a fixed vocabulary: newline, the 95 printable ASCII characters
(space .. "~"), and one placeholder for everything else (tabs, non-ASCII letters).
The ids therefore do not depend on the text, and a model trained on one machine
reads the corpus of another.

The concatenated text is split by character, contiguously: the first 90% is "train",
the next 5% "valid", the last 5% "test".
"""

from __future__ import annotations

import functools
import os
import sysconfig
from dataclasses import dataclass

import torch

# Fixed and sorted, so the corpus does not depend on what else is installed. All exist
# in CPython 3.10 through 3.13; their text changes between minor versions.
STDLIB_FILES = tuple(
    sorted(
        (
            "abc.py",
            "argparse.py",
            "base64.py",
            "bisect.py",
            "calendar.py",
            "collections/__init__.py",
            "colorsys.py",
            "contextlib.py",
            "copy.py",
            "csv.py",
            "dataclasses.py",
            "difflib.py",
            "enum.py",
            "fnmatch.py",
            "fractions.py",
            "functools.py",
            "genericpath.py",
            "gettext.py",
            "glob.py",
            "heapq.py",
            "hmac.py",
            "json/__init__.py",
            "json/decoder.py",
            "json/encoder.py",
            "keyword.py",
            "ntpath.py",
            "numbers.py",
            "operator.py",
            "posixpath.py",
            "pprint.py",
            "queue.py",
            "random.py",
            "reprlib.py",
            "sched.py",
            "shlex.py",
            "shutil.py",
            "stat.py",
            "statistics.py",
            "string.py",
            "tempfile.py",
            "textwrap.py",
            "tokenize.py",
            "traceback.py",
            "weakref.py",
        )
    )
)

PLACEHOLDER = "\ufffd"  # stands for every character outside the vocabulary
VOCAB = ("\n",) + tuple(chr(c) for c in range(32, 127)) + (PLACEHOLDER,)
SPLITS = {"train": (0.0, 0.90), "valid": (0.90, 0.95), "test": (0.95, 1.0)}

_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNK = _INDEX[PLACEHOLDER]


def encode(s: str) -> torch.Tensor:
    """str of length N -> (N,) int64 ids; characters outside VOCAB become the placeholder."""
    if not isinstance(s, str):
        raise TypeError(f"s must be a str, got {type(s).__name__}")
    get = _INDEX.get
    return torch.tensor([get(ch, _UNK) for ch in s], dtype=torch.int64)


def decode(ids) -> str:
    """(N,) integer ids (tensor or sequence of ints) -> str of length N."""
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-d integer sequence, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(VOCAB)):
        raise ValueError(f"ids must lie in [0, {len(VOCAB)}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return "".join(VOCAB[i] for i in ids.tolist())


@dataclass(frozen=True)
class TextCorpus:
    """One split of the corpus.

    Attributes:
        split: "train", "valid" or "test".
        ids: (N,) int64 character ids (this object's own copy).
        vocab: the characters, index = id (the same for every split and machine).
        files: the source files the whole corpus was read from, in order.
    """

    split: str
    ids: torch.Tensor
    vocab: tuple
    files: tuple

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return self.ids.numel()

    def encode(self, s: str) -> torch.Tensor:
        return encode(s)

    def decode(self, ids) -> str:
        return decode(ids)


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=4)
def _load(root: str) -> tuple:
    """(ids (N,) int64 of the whole corpus, paths read); memoized per process and root."""
    paths = [os.path.join(root, *name.split("/")) for name in STDLIB_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        raise FileNotFoundError(
            f"no Python source files found under {root!r} (looked for {STDLIB_FILES[0]}, "
            f"{STDLIB_FILES[1]}, ...); this Python may ship only compiled modules"
        )
    if missing:
        # A partial corpus would silently differ from other machines' corpus.
        raise FileNotFoundError(
            f"{len(missing)} of the corpus' source files are missing under {root!r}: "
            f"{[os.path.relpath(p, root) for p in missing]}"
        )
    parts = []
    for p in paths:
        # Universal newlines: a checkout with CRLF endings gives the same text.
        with open(p, encoding="utf-8", errors="replace") as f:
            s = f.read()
        parts.append(s if s.endswith("\n") else s + "\n")
    return encode("".join(parts)), tuple(paths)


def text(split: str = "train", *, max_chars: int | None = None, root: str | None = None) -> TextCorpus:
    """The `split` part of the standard-library text corpus.

    Args:
        split: "train" (the first 90% of the characters), "valid" (next 5%) or "test" (last 5%).
        max_chars: keep only the first max_chars characters of the split (None: all).
        root: directory holding the standard library sources (None: this Python's).

    Returns:
        A TextCorpus whose ids are (min(N_split, max_chars),) int64. The three splits
        are disjoint and together are the whole text.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1):
        raise ValueError(f"max_chars must be None or a positive int, got {max_chars!r}")
    root = os.path.abspath(stdlib_dir() if root is None else os.fspath(root))
    ids, paths = _load(root)
    lo, hi = (int(f * ids.numel()) for f in SPLITS[split])
    if max_chars is not None:
        hi = min(hi, lo + max_chars)
    # A copy, so that writing into one corpus object cannot change the memoized text.
    return TextCorpus(split, ids[lo:hi].clone(), VOCAB, paths)


def _check_ids(ids, seq_len: int) -> None:
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 1
        or ids.is_floating_point()
        or ids.is_complex()
        or ids.dtype == torch.bool
    ):
        got = f"{ids.dtype} of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a 1-d integer tensor, got {got}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if ids.numel() < seq_len + 1:
        raise ValueError(f"ids holds {ids.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")


def random_windows(ids: torch.Tensor, n: int, seq_len: int, generator: torch.Generator | None = None):
    """n windows of seq_len + 1 consecutive ids at uniformly random starts.

    Args:
        ids: (N,) integer tensor, N >= seq_len + 1.
        n: number of windows (>= 1).
        seq_len: tokens predicted per window; window[:, 0] is context only.
        generator: a CPU torch.Generator; the same state gives the same windows.

    Returns:
        (n, seq_len + 1) tensor of ids' dtype, on ids' device.
    """
    _check_ids(ids, seq_len)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=generator)  # (n,)
    offsets = torch.arange(seq_len + 1)  # (L+1,)
    return ids[(starts[:, None] + offsets[None, :]).to(ids.device)]  # (n, L+1)


def contiguous_windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Consecutive windows for evaluation: every id after the first is predicted once.

    Window i is ids[i * seq_len : (i + 1) * seq_len + 1], so neighbours share one id
    (the last target of one is the first context of the next). A tail shorter than a
    window is dropped.

    Args:
        ids: (N,) integer tensor, N >= seq_len + 1.
        seq_len: tokens predicted per window.

    Returns:
        (M, seq_len + 1) with M = (N - 1) // seq_len.
    """
    _check_ids(ids, seq_len)
    m = (ids.numel() - 1) // seq_len
    return ids[: m * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # (M, L+1)


def batches(ids: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int = 0):
    """Yields `steps` training batches (batch_size, seq_len + 1) of random windows.

    The sequence depends only on (ids, batch_size, seq_len, seed): a private generator
    is seeded with `seed`, so the global RNG is neither used nor advanced.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    _check_ids(ids, seq_len)
    g = torch.Generator().manual_seed(seed)
    # Checked above rather than in a generator body, where errors would wait for the first next().
    return (random_windows(ids, batch_size, seq_len, g) for _ in range(steps))
