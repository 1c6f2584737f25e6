"""Metrics shared by every model family: likelihoods, sample quality, speed."""
from genkern.eval.classifier import DigitClassifier, get_digit_classifier, train_digit_classifier
from genkern.eval.quality import class_coverage, digit_quality, frechet_distance

__all__ = ["DigitClassifier", "class_coverage", "digit_quality", "frechet_distance", "get_digit_classifier",
           "train_digit_classifier"]
