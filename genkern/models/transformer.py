"""A decoder-only Transformer language model over genkern's attention kernels.

Training and full-context calls attend with genkern.flash_attention; calls with a
genkern.KVCache decode from the cache with genkern.attention_with_kvcache. With
impl="torch" both are the plain-PyTorch versions (the baseline).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genkern._dispatch import check_impl
from genkern.kvcache import KVCache
from genkern.nn.attention import CausalSelfAttention
from genkern.nn.rotary import apply_rotary  # noqa: F401 (importable from here, as it always was)
from genkern.nn.rotary import rotary_tables as _rotary_tables


@dataclass
class ModelArgs:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads; fewer: grouped-query attention
    max_seq_len: int = 2048
    mlp_hidden: int | None = None  # None: 4 * dim
    positions: str = "rotary"  # "rotary" | "learned"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    impl: str = "auto"  # attention impl: "auto" | "torch" | "cpp" | "triton"

    def __post_init__(self):
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.mlp_hidden = 4 * self.dim if self.mlp_hidden is None else self.mlp_hidden
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "mlp_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"dim={self.dim} must be a multiple of n_heads={self.n_heads}, and n_heads of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        self.impl = check_impl(self.impl)
        if self.positions not in ("rotary", "learned"):
            raise ValueError(f"positions must be 'rotary' or 'learned', got {self.positions!r}")
        if self.positions == "rotary" and (self.dim // self.n_heads) % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.dim // self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rotary_tables(args: ModelArgs):
    """cos, sin: (max_seq_len, head_dim / 2) float32 tables of the rotary angles."""
    return _rotary_tables(args.head_dim, args.max_seq_len, args.rope_base)


# TransformerLM checkpoints name the attention's projections wqkv and wo; genkern.nn's are qkv and proj.
_SAVED_NAMES = (("qkv.", "wqkv."), ("proj.", "wo."))


def _to_saved_names(module, state_dict, prefix, local_metadata):
    for name, saved in _SAVED_NAMES:
        for key in [k for k in state_dict if k.startswith(prefix + name)]:
            state_dict[prefix + saved + key[len(prefix + name) :]] = state_dict.pop(key)


def _from_saved_names(module, state_dict, prefix, *args):
    for name, saved in _SAVED_NAMES:
        for key in [k for k in state_dict if k.startswith(prefix + saved)]:
            state_dict[prefix + name + key[len(prefix + saved) :]] = state_dict.pop(key)


def _report_saved_names(model, incompatible):
    """load_state_dict's missing keys named as a checkpoint names them."""
    for i, key in enumerate(incompatible.missing_keys):
        for name, saved in _SAVED_NAMES:
            key = re.sub(r"(^|\.)(blocks\.\d+\.attn\.)" + re.escape(name), r"\1\2" + saved, key)
        incompatible.missing_keys[i] = key


class Attention(CausalSelfAttention):
    """genkern.nn.CausalSelfAttention as a TransformerLM block holds it.

    Its impl is the model's `args.impl` at every call (callers switch it on a built model).
    The projections are genkern.nn's `qkv` and `proj`; TransformerLM checkpoints have always
    called them `wqkv` and `wo` (also attributes here), and still do: the state_dict names
    are renamed on the way out and back on the way in, so every checkpoint loads.
    """

    def __init__(self, args: ModelArgs):
        super().__init__(args.dim, args.n_heads, args.n_kv_heads, impl=args.impl)
        self.args = args
        self.register_state_dict_post_hook(_to_saved_names)
        self.register_load_state_dict_pre_hook(_from_saved_names)

    @property
    def wqkv(self) -> nn.Linear:
        return self.qkv

    @property
    def wo(self) -> nn.Linear:
        return self.proj

    def forward(self, x, rope, cache: KVCache | None, layer: int):
        return super().forward(x, rope, cache, layer, impl=self.args.impl)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(args.dim, args.mlp_hidden), nn.GELU(), nn.Linear(args.mlp_hidden, args.dim))

    def forward(self, x, rope, cache, layer):
        x = x + self.attn(self.norm1(x), rope, cache, layer)
        return x + self.mlp(self.norm2(x))


class TransformerLM(nn.Module):
    """Token embedding, rotary or learned positions, pre-norm blocks, tied output head.

    forward(idx, cache=None): idx (B, T) int64 token ids -> logits (B, T, vocab_size).
    Without a cache the T tokens are positions 0..T-1. With a genkern.KVCache (from
    `new_cache`), they follow each row's cached tokens (positions seqlens[b] + t), their
    keys and values are stored, and the caller advances the cache afterwards.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.dim)
        self.pos_emb = nn.Embedding(args.max_seq_len, args.dim) if args.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        if args.positions == "rotary":
            cos, sin = rotary_tables(args)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        self.register_load_state_dict_post_hook(_report_saved_names)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> KVCache:
        a = self.args
        p = self.tok_emb.weight
        return KVCache(
            a.n_layers,
            batch_size,
            a.n_kv_heads,
            max_seq_len or a.max_seq_len,
            a.head_dim,
            dtype=dtype or p.dtype,
            device=device or p.device,
        )

    def forward(self, idx, cache: KVCache | None = None):
        b, t = idx.shape
        start = 0 if cache is None else cache.seqlens.long()  # (B,) or 0
        cached = 0 if cache is None else cache.max_len
        # The cache may be shorter than the model's context (generate sizes it to the request).
        limit = self.args.max_seq_len if cache is None else min(self.args.max_seq_len, cache.max_seq_len)
        if cached + t > limit:
            raise ValueError(f"{t} tokens after {cached} cached ones exceed max_seq_len={limit}")
        pos = torch.arange(t, device=idx.device).expand(b, t)
        if cache is not None:
            pos = pos + start[:, None]  # (B, T)
        x = self.tok_emb(idx)  # (B, T, dim)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, T, hd/2) each
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        return self.head(self.norm(x))  # (B, T, vocab)

    def loss(self, idx):
        """Mean next-token cross-entropy (nats) of idx (B, T)."""
        logits = self(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))

    def config(self) -> dict:
        return asdict(self.args)
