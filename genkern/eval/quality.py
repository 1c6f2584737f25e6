"""Sample quality for digit models: class coverage and the Fréchet distance.

Both read samples through the small digit classifier (genkern.eval.classifier):
coverage counts how many digit classes the samples reach (mode dropping), the
Fréchet distance compares Gaussians fitted to the classifier's penultimate
features of the samples and of held-out data (FID, with a digit classifier in
place of Inception).
"""

from __future__ import annotations

import math

import torch

from genkern.data.base import Dataset
from genkern.data.digits import NUM_CLASSES, digits
from genkern.eval.classifier import DigitClassifier, get_digit_classifier

# Samples this far outside [0, 1] are rejected rather than clamped: they are not float
# rounding but a model emitting values in another range (e.g. tanh's [-1, 1]).
_OUT_OF_RANGE = 0.5


def class_coverage(
    samples: torch.Tensor, classifier: DigitClassifier | None = None, min_count: int | None = None
) -> dict:
    """How many digit classes the samples reach, by the classifier's predictions.

    Args:
        samples: floating (N, 1, 8, 8) or (N, 64), N >= 1, values in [0, 1]; values within
            0.5 outside it (e.g. a Gaussian decoder's sample) are clamped to [0, 1].
        classifier: default get_digit_classifier() on the samples' device.
        min_count: predictions a class needs to count as covered; default 1% of N, at
            least 1.

    Returns:
        dict(covered: int, classes predicted for >= min_count samples;
             counts: list of 10 ints, predictions per class;
             mean_confidence: float, mean over samples of the top class probability).
    """
    samples = _check_samples("samples", samples)
    n = samples.shape[0]
    if min_count is None:
        min_count = max(1, math.ceil(0.01 * n))
    elif isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an int >= 1 or None, got {min_count!r}")
    classifier = classifier if classifier is not None else get_digit_classifier(samples.device)
    probs = classifier.predict_proba(samples).double().cpu()  # (N, 10)
    confidence, labels = probs.max(dim=1)  # (N,) each
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    return {
        "covered": int((counts >= min_count).sum()),
        "counts": counts.tolist(),
        "mean_confidence": float(confidence.mean()),
    }


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets, computed in float64.

        d^2 = |mu_a - mu_b|^2 + tr(A) + tr(B) - 2 tr((A B)^(1/2))

    with mu the means and A, B the (unbiased) covariances. A B is similar to the
    symmetric positive semi-definite S = A^(1/2) B A^(1/2), so tr((A B)^(1/2)) is the sum
    of the square roots of S's eigenvalues; eigh on symmetric matrices is stable where a
    general matrix square root of A B is not.

    Args:
        feats_a: (N_a, D) tensor or array, N_a >= 2, finite.
        feats_b: (N_b, D) tensor or array, N_b >= 2, finite.

    Returns:
        The squared distance d^2 (FID's convention), a float >= 0.
    """
    a = _check_features("feats_a", feats_a)
    b = _check_features("feats_b", feats_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feats_a and feats_b must have the same feature dim, got {a.shape[1]} and {b.shape[1]}")
    mu_a, cov_a = _mean_cov(a)
    mu_b, cov_b = _mean_cov(b)
    sqrt_a = _sqrt_psd(cov_a)
    s = sqrt_a @ cov_b @ sqrt_a  # (D, D)
    eig_s = torch.linalg.eigvalsh((s + s.T) / 2).clamp_min(0)  # symmetrize away rounding
    d2 = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eig_s.sqrt().sum()
    return max(float(d2), 0.0)  # rounding can leave -1e-12 for identical sets


def digit_quality(samples: torch.Tensor, classifier: DigitClassifier | None = None, reference=None) -> dict:
    """Class coverage plus the Fréchet distance to held-out digits, in the classifier's features.

    Args:
        samples: floating (N, 1, 8, 8) or (N, 64), N >= 2, values in [0, 1] (see class_coverage).
        classifier: default get_digit_classifier() on the samples' device.
        reference: a Dataset or a tensor of digits to compare with; default digits("test").

    Returns:
        class_coverage's dict plus frechet: float, the Fréchet distance (smaller is better;
        digits("train") against digits("test") gives the floor a perfect model could reach).
    """
    samples = _check_samples("samples", samples)
    classifier = classifier if classifier is not None else get_digit_classifier(samples.device)
    if reference is None:
        reference = digits("test")
    ref = _check_samples("reference", reference.x if isinstance(reference, Dataset) else reference)
    result = class_coverage(samples, classifier)
    result["frechet"] = frechet_distance(classifier.features(samples), classifier.features(ref))
    return result


# The name the shared plan uses for the digit metrics.
sample_quality = digit_quality


def _check_samples(name: str, x) -> torch.Tensor:
    """A floating tensor of 8x8 images with N >= 1, clamped to [0, 1]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2 or x.shape[0] == 0 or x.shape[1:] not in ((1, 8, 8), (8, 8), (64,)):
        raise ValueError(f"{name} must have shape (N, 1, 8, 8), (N, 8, 8) or (N, 64) with N >= 1, got {tuple(x.shape)}")
    x = x.detach()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_OUT_OF_RANGE or hi > 1 + _OUT_OF_RANGE:
        raise ValueError(
            f"{name} must hold values in [0, 1] (digit level / 16), got values in "
            f"[{lo:.4g}, {hi:.4g}]; map model outputs to the data range first"
        )
    return x.clamp(0, 1)


def _check_features(name: str, f) -> torch.Tensor:
    f = torch.as_tensor(f).detach().to("cpu", torch.float64)
    if f.dim() != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= 2 samples and D >= 1, got {tuple(f.shape)}")
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")
    return f


def _mean_cov(f: torch.Tensor):
    """Mean (D,) and unbiased covariance (D, D) of float64 features (N, D)."""
    mu = f.mean(dim=0)
    centred = f - mu  # (N, D)
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (D, D)."""
    w, v = torch.linalg.eigh(m)  # (D,), (D, D)
    return (v * w.clamp_min(0).sqrt()) @ v.T
