"""A decoder-only Transformer language model over genkern's attention kernels.

Training and full-context calls attend with genkern.flash_attention; calls with a
genkern.KVCache decode from the cache with genkern.attention_with_kvcache. With
impl="torch" both are the plain-PyTorch versions (the baseline).
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genkern.kvcache import KVCache
from genkern.ops.attention import flash_attention
from genkern.reference.kv_decode import write_new


@dataclass
class ModelArgs:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int | None = None   # None: n_heads; fewer: grouped-query attention
    max_seq_len: int = 2048
    mlp_hidden: int | None = None   # None: 4 * dim
    positions: str = "rotary"       # "rotary" | "learned"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    impl: str = "auto"              # attention impl: "auto" | "torch" | "cpp" | "triton"

    def __post_init__(self):
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        self.mlp_hidden = 4 * self.dim if self.mlp_hidden is None else self.mlp_hidden
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "mlp_hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}, and n_heads of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.positions not in ("rotary", "learned"):
            raise ValueError(f"positions must be 'rotary' or 'learned', got {self.positions!r}")
        if self.positions == "rotary" and (self.dim // self.n_heads) % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.dim // self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rotary_tables(args: ModelArgs):
    """cos, sin: (max_seq_len, head_dim / 2) float32 tables of the rotary angles."""
    half = args.head_dim // 2
    inv_freq = args.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(args.max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x, cos, sin):
    """Rotates pairs (x[..., :D/2], x[..., D/2:]) of x (B, H, T, D) by angles cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


_nothing = contextlib.nullcontext()


class Attention(nn.Module):
    timer = None  # a context manager around every attention call, set by the profiler

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        hd = args.head_dim
        self.wqkv = nn.Linear(args.dim, (args.n_heads + 2 * args.n_kv_heads) * hd, bias=False)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False)

    def forward(self, x, rope, cache: KVCache | None, layer: int):
        a, (b, t, _) = self.args, x.shape
        hd = a.head_dim
        q, k, v = self.wqkv(x).split([a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd], dim=-1)
        q = q.view(b, t, a.n_heads, hd).transpose(1, 2)                  # (B, H, T, hd)
        k = k.view(b, t, a.n_kv_heads, hd).transpose(1, 2)               # (B, Hkv, T, hd)
        v = v.view(b, t, a.n_kv_heads, hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # The attention alone, timed when genkern.profile_generation measures its share.
        with self.timer or _nothing:
            if cache is None:
                y = flash_attention(q, k, v, causal=True, impl=a.impl)
            elif cache._max_len == 0:
                # Prefill of an empty cache: flash-attention over the chunk, and store its K/V.
                y = flash_attention(q, k, v, causal=True, impl=a.impl)
                write_new(*cache.layer(layer), cache.seqlens, k, v)
            else:
                y = cache.attend(layer, q, k.contiguous(), v.contiguous(), impl=a.impl)
        return self.wo(y.transpose(1, 2).reshape(b, t, a.n_heads * hd))  # (B, T, dim)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attn = Attention(args)
        self.norm2 = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(args.dim, args.mlp_hidden), nn.GELU(),
                                 nn.Linear(args.mlp_hidden, args.dim))

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

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, dtype=None, device=None) -> KVCache:
        a = self.args
        p = self.tok_emb.weight
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, max_seq_len or a.max_seq_len, a.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def forward(self, idx, cache: KVCache | None = None):
        b, t = idx.shape
        start = 0 if cache is None else cache.seqlens.long()                   # (B,) or 0
        cached = 0 if cache is None else cache._max_len
        # The cache may be shorter than the model's context (generate sizes it to the request).
        limit = self.args.max_seq_len if cache is None else min(self.args.max_seq_len, cache.max_seq_len)
        if cached + t > limit:
            raise ValueError(f"{t} tokens after {cached} cached ones exceed max_seq_len={limit}")
        pos = torch.arange(t, device=idx.device).expand(b, t)
        if cache is not None:
            pos = pos + start[:, None]                                           # (B, T)
        x = self.tok_emb(idx)                                                    # (B, T, dim)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope = (self.rope_cos[pos][:, None], self.rope_sin[pos][:, None])  # (B, 1, T, hd/2) each
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cache, i)
        return self.head(self.norm(x))                                          # (B, T, vocab)

    def loss(self, idx):
        """Mean next-token cross-entropy (nats) of idx (B, T)."""
        logits = self(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), idx[:, 1:].reshape(-1))

    def config(self) -> dict:
        return asdict(self.args)
