"""Benchmark cases for attention that sees less than everything: sliding windows, packed (varlen)
batches, and a Hugging Face model's padded training batch.

- "window": causal attention with a sliding window, q, k, v (1, H, T, D). "torch" is torch's SDPA
  with the window as a boolean mask (what a user writes without genkern); the fast impl is
  genkern.flash_attention(window_size=(W - 1, 0)); "full causal" is the fast impl without the
  window, so the ratio against it says how much of the skipped work was really skipped (the work
  ratio of a W window at length T is about T / (2 W) for W << T).
- "varlen": a batch of B sequences of different lengths. "torch" is SDPA over the batch padded
  to the longest, with a causal padding mask; the fast impl is genkern.flash_attention_varlen over
  the sequences packed; "padded" is the fast impl's dense kernel over the padded batch, which
  computes the padding too. Packing should save at least the padding's share of the time.
- "hf-llama": forward+backward of a small randomly initialised Llama from transformers on a
  right-padded batch, attn_implementation="genkern" (genkern.integrations.transformers) against
  "sdpa" (torch's SDPA with transformers' 4-d mask). Listed only where transformers is installed.

Flops follow genkern.bench.attention (4 * T * S * D per head for the forward, counting only the
pairs a query sees); bytes are the inputs and outputs once.
"""

from __future__ import annotations

import importlib.util

import torch

from genkern.bench import Case, Target

OP = "attention_masks"
FULL = "full causal"  # the fast impl without the window
PADDED = "padded"  # the fast impl's dense kernel over the padded batch
_FLOPS_PER_FWD = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _sdpa():
    from genkern.functional import _TORCH_SDPA  # torch's own, even under genkern.patch()

    return _TORCH_SDPA


class WindowCase(Case):
    """Causal attention with a window of W keys (the query's own and W - 1 before it)."""

    op = OP
    grad_inputs = ("q", "k", "v")
    directions = ("fwd", "fwd+bwd")
    baselines = (FULL,)
    compiles = False

    def __init__(self, H: int, T: int, D: int, W: int, targets=(), quick=False):
        super().__init__({"H": H, "T": T, "D": D, "W": W}, torch.float32, targets, quick, devices=("cpu", "cuda"))

    @property
    def name(self) -> str:
        s = self.sizes
        return f"window-1x{s['H']}x{s['T']}x{s['D']}-w{s['W']}"

    def make_inputs(self, device) -> dict:
        s = self.sizes
        return {n: torch.randn(1, s["H"], s["T"], s["D"], device=device) for n in ("q", "k", "v")}

    def impl_fn(self, impl: str):
        from genkern.ops.attention import flash_attention
        from genkern.reference.attention import window_mask

        w = self.sizes["W"]
        if impl == "torch":
            sdpa, masks = _sdpa(), {}

            def run(x):
                t, dev = x["q"].shape[2], x["q"].device
                if dev not in masks:
                    masks[dev] = window_mask(t, t, True, (w - 1, 0), dev)
                return (sdpa(x["q"], x["k"], x["v"], attn_mask=masks[dev]),)

            return run
        window = (-1, -1) if impl == FULL else (w - 1, 0)
        backend = "auto" if impl == FULL else impl
        return lambda x: (flash_attention(x["q"], x["k"], x["v"], window_size=window, impl=backend),)

    def flops(self, direction: str) -> int:
        s = self.sizes
        t, w = s["T"], s["W"]
        pairs = w * (w + 1) // 2 + (t - w) * w if t > w else t * (t + 1) // 2
        return int(4 * s["H"] * pairs * s["D"] * _FLOPS_PER_FWD[direction])

    def bytes_moved(self, direction: str) -> int:
        n = self.sizes["H"] * self.sizes["T"] * self.sizes["D"] * 4
        return {"fwd": 4 * n, "bwd": 8 * n, "fwd+bwd": 12 * n}[direction]

    def memory_needed(self, impl: str, direction: str) -> int | None:
        t = self.sizes["T"]
        return 3 * self.sizes["H"] * t * t * 4 if impl == "torch" else None


class VarlenCase(Case):
    """B causal sequences of the given lengths, H query heads reading Hkv key/value heads."""

    op = OP
    grad_inputs = ("q", "k", "v")
    directions = ("fwd", "fwd+bwd")
    baselines = (PADDED,)
    compiles = False

    def __init__(self, lengths, H: int, Hkv: int, D: int, targets=(), quick=False):
        self.lengths = tuple(int(n) for n in lengths)
        super().__init__({"B": len(self.lengths), "H": H, "Hkv": Hkv, "D": D}, torch.float32, targets, quick)

    @property
    def name(self) -> str:
        s = self.sizes
        return f"varlen-{'+'.join(map(str, self.lengths))}x{s['H']}x{s['D']}-kv{s['Hkv']}"

    @property
    def padding(self) -> float:
        """The padded batch's share of padding tokens."""
        return 1 - sum(self.lengths) / (len(self.lengths) * max(self.lengths))

    def make_inputs(self, device) -> dict:
        s, total = self.sizes, sum(self.lengths)
        q = torch.randn(total, s["H"], s["D"], device=device)
        k, v = (torch.randn(total, s["Hkv"], s["D"], device=device) for _ in range(2))
        return {"q": q, "k": k, "v": v}

    def impl_fn(self, impl: str):
        from genkern.ops.attention import flash_attention
        from genkern.ops.attention_varlen import flash_attention_varlen

        lengths, tmax = self.lengths, max(self.lengths)
        masks = {}

        def padded(x):  # (B, H, Tmax, D) each, zeros after each sequence; differentiable, a small copy
            return [
                torch.nn.utils.rnn.pad_sequence(x[n].split(lengths), batch_first=True).transpose(1, 2)
                for n in ("q", "k", "v")
            ]

        if impl == "torch":
            sdpa = _sdpa()

            def run_sdpa(x):
                dev = x["q"].device
                if dev not in masks:
                    masks[dev] = self._mask(dev)
                return (sdpa(*padded(x), attn_mask=masks[dev], enable_gqa=True),)

            return run_sdpa
        if impl == PADDED:
            return lambda x: (flash_attention(*padded(x), causal=True),)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

        def run(x):
            c = cu.to(x["q"].device)
            return (flash_attention_varlen(x["q"], x["k"], x["v"], c, c, tmax, tmax, causal=True, impl=impl),)

        return run

    def _mask(self, device):
        tmax = max(self.lengths)
        causal = torch.ones(tmax, tmax, dtype=torch.bool, device=device).tril()
        keys = torch.arange(tmax, device=device) < torch.tensor(self.lengths, device=device).unsqueeze(1)  # (B, S)
        mask = causal & keys[:, None, :]  # (B, T, S)
        mask |= ~keys[:, :, None]  # padded query rows see everything (their output is discarded): no NaN
        return mask.unsqueeze(1)  # (B, 1, T, S)

    def flops(self, direction: str) -> int:
        s = self.sizes
        pairs = sum(n * (n + 1) // 2 for n in self.lengths)
        return int(4 * s["H"] * pairs * s["D"] * _FLOPS_PER_FWD[direction])

    def bytes_moved(self, direction: str) -> int:
        s, total = self.sizes, sum(self.lengths)
        n = total * (2 * s["H"] + 2 * s["Hkv"]) * s["D"] * 4
        return {"fwd": n, "bwd": 2 * n, "fwd+bwd": 3 * n}[direction]


class HFModelCase(Case):
    """A Llama from transformers (random weights), forward+backward of a right-padded batch."""

    op = OP
    directions = ("step",)  # forward and backward of the model, its own loss
    baselines = ()
    compiles = False

    def __init__(self, B, T, hidden, layers, heads, kv_heads, pad_fraction, targets=(), quick=False):
        sizes = {"B": B, "T": T, "hidden": hidden, "layers": layers, "heads": heads, "kv": kv_heads}
        super().__init__(sizes, torch.float32, targets, quick)
        self.pad_fraction = pad_fraction

    @property
    def name(self) -> str:
        s = self.sizes
        return (
            f"hf-llama-{s['B']}x{s['T']}-h{s['hidden']}-l{s['layers']}-{s['heads']}kv{s['kv']}-pad{self.pad_fraction:g}"
        )

    def lengths(self) -> list[int]:
        """Row lengths from T down to T * (1 - 2 * pad_fraction), a pad_fraction share of padding in all."""
        b, t = self.sizes["B"], self.sizes["T"]
        short = round(t * (1 - 2 * self.pad_fraction))
        return [t - (t - short) * i // max(1, b - 1) for i in range(b)]

    def make_inputs(self, device) -> dict:
        b, t = self.sizes["B"], self.sizes["T"]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 256, (b, t), generator=g)
        mask = (torch.arange(t) < torch.tensor(self.lengths()).unsqueeze(1)).long()
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    def impl_fn(self, impl: str):
        from genkern.integrations import transformers as integration

        integration.register()
        state = {}

        def run(x):
            if not state:
                state["model"] = self._model("sdpa" if impl == "torch" else "genkern", x["input_ids"].device)
            model = state["model"]
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).logits
            # the loss of the real tokens only: padded positions' logits never reach it
            (logits * x["attention_mask"].unsqueeze(-1)).sum().backward()
            return (logits.detach(),)

        return run

    def _model(self, attn: str, device):
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.sizes
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=s["hidden"],
            intermediate_size=2 * s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv"],
            max_position_embeddings=s["T"],
            attn_implementation=attn,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(device)

    def flops(self, direction: str) -> int | None:
        return None

    def bytes_moved(self, direction: str) -> int:
        return 0  # a whole model step: no single bandwidth bound to read it against


def _cases():
    window = WindowCase(8, 8192, 64, 1024)  # the work ratio is about 4.2
    window.targets = tuple(
        Target(dev, d, "speedup", 3.0, vs=FULL) for dev in ("cpu", "cuda") for d in ("fwd", "fwd+bwd")
    )
    varlen = VarlenCase((1024, 768, 512, 768), 8, 2, 64)
    need = round(1 / (1 - varlen.padding), 3)  # packed time <= (1 - padding) * padded time
    varlen.targets = tuple(Target(dev, "fwd+bwd", "speedup", need, vs=PADDED) for dev in ("cpu", "cuda"))
    cases = [WindowCase(2, 256, 32, 64, quick=True), VarlenCase((100, 37, 0, 64), 4, 2, 32, quick=True), window, varlen]
    if importlib.util.find_spec("transformers") is not None:
        hf = HFModelCase(4, 1024, 256, 4, 8, 2, 0.25, targets=(Target("cpu", "step", "speedup", 1.5),))
        hf.devices = ("cpu",)
        cases.append(hf)
    return cases


CASES = _cases()
# A default run times every target of this module: the window, the packed batch and the model.
DEFAULT = {dev: tuple(c.name for c in CASES if any(t.device == dev for t in c.targets)) for dev in ("cpu", "cuda")}
