"""Metrics shared by every model family: likelihoods, sample quality, speed."""

from genkern.eval.classifier import DigitClassifier, get_digit_classifier, train_digit_classifier
from genkern.eval.likelihood import LikelihoodResult, bits_per_dim, log_likelihood
from genkern.eval.quality import class_coverage, digit_quality, frechet_distance
from genkern.eval.sampling import draw_samples
from genkern.eval.speed import sampling_speed, timed_samples, training_speed

__all__ = [
    "DigitClassifier",
    "LikelihoodResult",
    "bits_per_dim",
    "class_coverage",
    "digit_quality",
    "draw_samples",
    "frechet_distance",
    "get_digit_classifier",
    "log_likelihood",
    "sampling_speed",
    "timed_samples",
    "train_digit_classifier",
    "training_speed",
]
