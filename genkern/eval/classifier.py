"""A small digit classifier: the feature space for sample-quality metrics on the 8x8 digits.

It plays the part Inception plays for FID on photographs: `features` gives the
penultimate activations for the Fréchet distance, `predict_proba` the class
probabilities for class coverage. It trains in seconds on the CPU.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import torch
import torch.nn.functional as F
from torch import nn

from genkern.data.digits import NUM_CLASSES, PIXELS, digits

# Values this far outside [0, 1] are still accepted (float rounding in model samples).
_RANGE_SLACK = 1e-4


class DigitClassifier(nn.Module):
    """MLP 64 -> 256 -> 128 -> 10 with ReLU on 8x8 digits with values in [0, 1].

    Every method takes x as (N, 1, 8, 8), (N, 8, 8) or (N, 64), any floating dtype, any
    device (it is moved to the classifier's device and dtype).
    """

    def __init__(self, hidden: tuple = (256, 128)):
        super().__init__()
        widths = (PIXELS, *hidden)
        self.body = nn.Sequential(
            *[m for i in range(len(hidden)) for m in (nn.Linear(widths[i], widths[i + 1]), nn.ReLU())]
        )
        self.head = nn.Linear(widths[-1], NUM_CLASSES)
        self.feature_dim = widths[-1]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init (uniform in +-1/sqrt(fan_in)), drawn from `generator`."""
        with torch.no_grad():
            for layer in self.modules():
                if isinstance(layer, nn.Linear):
                    bound = layer.in_features**-0.5
                    for p in (layer.weight, layer.bias):
                        p.copy_(torch.rand(p.shape, generator=generator) * (2 * bound) - bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 10)."""
        return self.head(self.body(self._prepare(x)))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim) (after the last ReLU)."""
        return self.body(self._prepare(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, 10)."""
        return F.softmax(self(x), dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels, int64 (N,)."""
        return self(x).argmax(dim=1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of x classified as y (int labels (N,))."""
        y = torch.as_tensor(y)
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape (N,) = ({x.shape[0]},), got {tuple(y.shape)}")
        return float((self.predict(x).cpu() == y.cpu()).double().mean())

    def _prepare(self, x) -> torch.Tensor:
        """Checks x and returns it as (N, 64) on the parameters' device and dtype."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 2 or x.shape[1:] not in ((1, 8, 8), (8, 8), (64,)):
            raise ValueError(f"x must have shape (N, 1, 8, 8), (N, 8, 8) or (N, 64), got {tuple(x.shape)}")
        if x.numel() and not torch.isfinite(x).all():
            raise ValueError("x must be finite (found NaN or inf)")
        if x.numel() and (x.min() < -_RANGE_SLACK or x.max() > 1 + _RANGE_SLACK):
            raise ValueError(
                f"x must lie in [0, 1] (pixel level / 16), got values in "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}]; clamp model samples first"
            )
        param = self.head.weight
        return x.reshape(x.shape[0], PIXELS).to(param.device, param.dtype).clamp(0, 1)  # (N, 64)


def train_digit_classifier(
    seed: int = 0,
    steps: int = 500,
    device="cpu",
    *,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
) -> DigitClassifier:
    """Trains a DigitClassifier on digits("train") with Adam and returns it frozen, in eval mode.

    The run depends only on `seed` (a private torch.Generator draws the init and the
    batch order; there is no dropout), so a given torch version and CPU give the same
    weights every time. torch's global RNG is left as it was. `.test_accuracy` holds the
    accuracy on digits("test") (about 0.97 with the defaults).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    # nn.Linear's constructor draws its own init from the global RNG; fork it so the
    # caller's stream is untouched, then redraw everything from `gen`.
    with torch.random.fork_rng(devices=[]):
        model = DigitClassifier()
    model.reset_parameters(gen)
    model.to(device).train()
    train = digits("train", device=device)
    x, y = train.x.reshape(len(train), PIXELS), train.y  # (N, 64), (N,)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order, pos = torch.randperm(len(train), generator=gen), 0
    with torch.enable_grad(), _one_cpu_thread(device):
        for _ in range(steps):
            if pos + batch_size > len(order):  # a new epoch: reshuffle, drop the ragged tail
                order, pos = torch.randperm(len(train), generator=gen), 0
            idx = order[pos : pos + batch_size].to(device)
            pos += batch_size
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    test = digits("test", device=device)
    model.test_accuracy = model.accuracy(test.x, test.y)
    return model


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Runs CPU training on one thread, then restores the caller's thread count.

    The matrices are tiny (128 x 256), so fork/join costs more than the arithmetic, and
    on a busy machine a thread team waiting for each other makes it 10-50x slower. It
    also makes the weights independent of the caller's thread count.
    """
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_CACHE: dict = {}
_LOCK = threading.Lock()


def get_digit_classifier(device="cpu") -> DigitClassifier:
    """The process-wide classifier (seed 0, default steps): trained once on the CPU, then copied
    to each device asked for. Shared: do not train or modify it."""
    device = torch.device(device)
    with _LOCK:
        if "cpu" not in _CACHE:
            _CACHE["cpu"] = train_digit_classifier(seed=0, device="cpu")
        key = str(device)
        if key not in _CACHE:
            moved = copy.deepcopy(_CACHE["cpu"]).to(device)
            _CACHE[key] = moved
        return _CACHE[key]
