"""Autoregressive generation with a KV cache: prefill, then one token at a time."""

from __future__ import annotations

import torch


def sample_next(logits, *, temperature=1.0, top_k=None, top_p=None, do_sample=True, generator=None):
    """Next tokens (B,) int64 from last-position logits (B, V)."""
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_batch(prompt_ids, device):
    """Right-padded (B, Tmax) int64 tokens, (B,) lengths, and whether the input was ragged (a list)."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dtype not in (torch.int32, torch.int64) or prompt_ids.dim() not in (1, 2):
            raise ValueError(
                f"prompt_ids must be a (T,) or (B, T) integer tensor, got {prompt_ids.dtype} "
                f"of shape {tuple(prompt_ids.shape)}"
            )
        ids = prompt_ids.to(device=device, dtype=torch.int64)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(
                f"prompt_ids must hold at least one row of at least one token, got shape {tuple(prompt_ids.shape)}"
            )
        return ids, torch.full((ids.shape[0],), ids.shape[1], device=device), False
    rows = [torch.as_tensor(p) for p in prompt_ids]
    if not rows or any(r.numel() == 0 for r in rows):
        raise ValueError("prompt_ids must be a non-empty list of non-empty token sequences")
    if any(r.dim() != 1 for r in rows):
        # A flat list of ints would otherwise be taken as that many one-token prompts.
        raise ValueError(
            "prompt_ids as a list must hold 1-d token sequences (for one prompt pass [tokens] or a tensor)"
        )
    # Checked before the cast: as_tensor(..., dtype=int64) would truncate 1.5 to 1 silently.
    bad = [r.dtype for r in rows if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool]
    if bad:
        raise ValueError(f"prompt_ids must hold integer token ids, got {bad[0]}")
    rows = [r.to(torch.int64) for r in rows]
    lengths = torch.tensor([r.numel() for r in rows], device=device)
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, : r.numel()] = r
    return ids.to(device), lengths, True


def _last_logits(logits, lengths):
    """logits (B, T, V) at each row's last real position lengths[b] - 1 -> (B, V)."""
    idx = (lengths - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])
    return logits.gather(1, idx).squeeze(1)


def prefill(model, ids, lengths, cache):
    """Runs the right-padded prompts through the model, fills the cache; last logits (B, V)."""
    logits = model(ids, cache)
    cache.advance(lengths.to(torch.int32))
    return _last_logits(logits, lengths)


def decode_one_token(model, token, cache):
    """token (B,) -> next logits (B, V), one position further into the cache."""
    logits = model(token[:, None], cache)
    cache.advance(1)
    return logits[:, -1]


@torch.inference_mode()
def generate(
    model,
    prompt_ids,
    max_new_tokens,
    *,
    temperature=1.0,
    top_k=None,
    top_p=None,
    do_sample=True,
    eos_token_id=None,
    use_cache=True,
    streamer=None,
    generator=None,
):
    """Generates max_new_tokens tokens after each prompt.

    Args:
        model: a genkern.models.TransformerLM (any model with `new_cache(batch)` and
            `forward(idx, cache=None)` -> (B, T, V) logits).
        prompt_ids: (T,) or (B, T) integer tensor, or a list of token sequences of
            different lengths (a ragged batch).
        max_new_tokens: tokens to generate per row (>= 0).
        temperature, top_k, top_p, do_sample: sampling; do_sample=False is greedy.
        eos_token_id: a row stops after emitting it (later positions repeat it); the
            loop stops when every row has.
        use_cache: False recomputes the whole context at every step (the baseline).
        streamer: an object with put(tokens (B,) int64) called once per step and end().
        generator: torch.Generator for sampling.

    Returns:
        For a tensor prompt: (B, T + max_new_tokens) int64 (1-d in, 1-d out). For a list:
        a list of 1-d tensors, each prompt followed by its generated tokens.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"need temperature >= 0, top_k >= 1 and 0 < top_p <= 1, got {temperature}, {top_k}, {top_p}")
    device = next(model.parameters()).device
    ids, lengths, ragged = _as_batch(prompt_ids, device)
    b, total = ids.shape[0], int(lengths.max()) + max_new_tokens
    if total > model.args.max_seq_len:
        raise ValueError(
            f"prompt plus max_new_tokens ({total}) exceeds the model's max_seq_len {model.args.max_seq_len}"
        )
    tokens = torch.zeros(b, total, dtype=torch.int64, device=device)
    tokens[:, : ids.shape[1]] = ids
    done = torch.zeros(b, dtype=torch.bool, device=device)
    pick = dict(temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample, generator=generator)
    cache = model.new_cache(b, total) if use_cache else None
    logits = prefill(model, ids, lengths, cache) if use_cache else _last_logits(model(ids), lengths)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, **pick)
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        tokens.scatter_(1, lengths[:, None], nxt[:, None])
        lengths = lengths + 1
        if streamer is not None:
            streamer.put(nxt)
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        if use_cache:
            logits = decode_one_token(model, nxt, cache)
        else:
            logits = _last_logits(model(tokens[:, : int(lengths.max())]), lengths)
    if streamer is not None:
        streamer.end()
    if ragged:
        return [tokens[i, : int(n)] for i, n in enumerate(lengths)]
    out = tokens[:, : int(lengths.max())]
    return out[0] if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() == 1 else out
