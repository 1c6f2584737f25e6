"""Sample-quality metrics: the digit classifier, class coverage and the Fréchet distance."""

import pytest
import torch

from genkern.data.digits import digits
from genkern.eval.classifier import DigitClassifier, get_digit_classifier, train_digit_classifier
from genkern.eval.quality import class_coverage, digit_quality, frechet_distance


@pytest.fixture(scope="module")
def clf():
    return get_digit_classifier()  # trained once per process (under a second)


@pytest.fixture(scope="module")
def test_set():
    return digits("test")


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- the classifier -----------------------------------------------------------------------


def test_classifier_accuracy(clf, test_set):
    acc = clf.accuracy(test_set.x, test_set.y)
    assert acc >= 0.95
    assert acc == clf.test_accuracy
    assert not clf.training and not any(p.requires_grad for p in clf.parameters())


def test_classifier_outputs(clf, test_set):
    x = test_set.x[:50]
    feats, probs, labels = clf.features(x), clf.predict_proba(x), clf.predict(x)
    assert feats.shape == (50, clf.feature_dim) == (50, 128) and feats.min() >= 0  # after a ReLU
    assert probs.shape == (50, 10)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(50))
    assert labels.dtype == torch.int64 and torch.equal(labels, probs.argmax(dim=1))
    # The layouts (N, 1, 8, 8), (N, 8, 8), (N, 64) and float64 all read the same.
    for other in (x.reshape(50, 64), x.reshape(50, 8, 8), x.double()):
        torch.testing.assert_close(clf.features(other), feats)
    assert not feats.requires_grad


def test_get_digit_classifier_is_memoized(clf):
    assert get_digit_classifier() is clf and get_digit_classifier("cpu") is clf


def test_training_is_seeded_and_keeps_global_state():
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    with torch.no_grad():  # training must still work when the caller disabled grad
        a = train_digit_classifier(seed=3, steps=20)
    b = train_digit_classifier(seed=3, steps=20)
    c = train_digit_classifier(seed=4, steps=20)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.head.weight, c.head.weight)
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="steps"):
        train_digit_classifier(steps=0)


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.zeros(4, 1, 8, 7), ValueError, "shape"),
        (torch.zeros(4, 65), ValueError, "shape"),
        (torch.zeros(64), ValueError, "shape"),
        (torch.zeros(4, 64, dtype=torch.int64), TypeError, "floating"),
        (torch.full((4, 64), 1.5), ValueError, r"\[0, 1\]"),
        (torch.full((4, 64), float("nan")), ValueError, "finite"),
    ],
)
def test_classifier_rejects_bad_input(clf, x, error, match):
    with pytest.raises(error, match=match):
        clf.predict(x)


# --- class coverage -----------------------------------------------------------------------


def test_coverage_of_the_test_set(clf, test_set):
    cov = class_coverage(test_set.x, clf)
    assert cov["covered"] == 10 and sum(cov["counts"]) == 359 and len(cov["counts"]) == 10
    assert cov["mean_confidence"] > 0.9


def test_coverage_of_one_class(clf, test_set):
    zeros = test_set.x[test_set.y == 0]
    cov = class_coverage(zeros)  # the default classifier is the shared one
    assert cov["covered"] == 1 and cov["counts"][0] == len(zeros) and cov["mean_confidence"] > 0.9


def test_coverage_min_count(clf, test_set):
    x = torch.cat([test_set.x[test_set.y == 0], test_set.x[test_set.y == 1][:2]])
    assert class_coverage(x, clf)["covered"] == 2  # default min_count = 1% of 38 -> 1
    assert class_coverage(x, clf, min_count=3)["covered"] == 1
    with pytest.raises(ValueError, match="min_count"):
        class_coverage(x, clf, min_count=0)


def test_coverage_clamps_slightly_out_of_range_samples(clf, test_set):
    x = test_set.x[:40]
    stretched = x * 1.2 - 0.1  # values in [-0.1, 1.1], clamped to [0, 1]
    assert class_coverage(stretched, clf)["counts"] == class_coverage(stretched.clamp(0, 1), clf)["counts"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        class_coverage(x * 4 - 2, clf)  # another range entirely


@pytest.mark.parametrize(
    "x, error", [(torch.zeros(0, 64), ValueError), (torch.zeros(3, 10), ValueError), ([[0.0] * 64], TypeError)]
)
def test_coverage_rejects_bad_input(clf, x, error):
    with pytest.raises(error, match="samples"):
        class_coverage(x, clf)


# --- Fréchet distance ---------------------------------------------------------------------


def _with_moments(mean, cov_sqrt, n, seed):
    """n samples whose sample mean is exactly `mean` and sample covariance exactly cov_sqrt @ cov_sqrt.T."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    white = torch.linalg.solve_triangular(chol, z.T, upper=False).T  # sample covariance = I
    return mean + white @ cov_sqrt.T


def test_frechet_of_identical_sets_is_zero():
    a = _rand(500, 16) ** 3
    fd = frechet_distance(a, a.clone())
    trace = torch.cov(a.T).trace().item()
    assert 0 <= fd <= 1e-6 * trace


def test_frechet_matches_the_closed_form_for_gaussians():
    d = 6
    mu1, mu2 = torch.linspace(-1, 1, d, dtype=torch.float64), torch.linspace(0, 3, d, dtype=torch.float64) ** 2
    s1, s2 = torch.linspace(0.5, 3, d, dtype=torch.float64), torch.linspace(4, 0.1, d, dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
    a = _with_moments(mu1, torch.diag(s1.sqrt()), 200, seed=1)
    b = _with_moments(mu2, torch.diag(s2.sqrt()), 300, seed=2)
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)
    # A common rotation of both sets (non-diagonal covariances) leaves the distance unchanged.
    q, _ = torch.linalg.qr(_rand(d, d, seed=3))
    assert frechet_distance(a @ q.T, b @ q.T) == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a, b = _rand(300, 8, seed=1), _rand(200, 8, seed=2) ** 2
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    cross = scipy_linalg.sqrtm(ca @ cb).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + ca.trace() + cb.trace() - 2 * cross.trace()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_is_symmetric_and_handles_few_samples():
    a, b = _rand(400, 32, seed=1), _rand(300, 32, seed=2) ** 2
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    # Fewer samples than features: singular covariances still give a finite, non-negative distance.
    small = frechet_distance(a[:5], b[:7])
    assert small > 0 and torch.isfinite(torch.tensor(small))
    assert frechet_distance(a[:5].float(), a[:5].numpy()) < 1e-10


@pytest.mark.parametrize(
    "a, b, match",
    [
        (torch.zeros(1, 4), torch.zeros(5, 4), "feats_a"),
        (torch.zeros(5, 4), torch.zeros(5), "feats_b"),
        (torch.zeros(5, 4), torch.zeros(5, 3), "feature dim"),
        (torch.full((5, 4), float("inf")), torch.zeros(5, 4), "finite"),
    ],
)
def test_frechet_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


# --- digit_quality ------------------------------------------------------------------------


def test_digit_quality_ranks_noise_below_real_digits(clf, test_set):
    real = digit_quality(digits("train").x, clf)
    noise = digit_quality(_rand(500, 1, 8, 8, dtype=torch.float32), clf)
    assert real["covered"] == 10 and real["mean_confidence"] > 0.9
    assert noise["frechet"] > 10 * real["frechet"]
    assert set(real) == {"covered", "counts", "mean_confidence", "frechet"}
    # The default reference is the test set, as a Dataset or a tensor.
    assert digit_quality(test_set.x[:100], clf, reference=test_set)["frechet"] == pytest.approx(
        digit_quality(test_set.x[:100])["frechet"], rel=1e-9
    )
    assert digit_quality(test_set.x[:100], clf, reference=test_set.x[:100])["frechet"] < 1e-6


def test_digit_quality_rejects_bad_reference(clf, test_set):
    with pytest.raises(ValueError, match="reference"):
        digit_quality(test_set.x[:10], clf, reference=torch.zeros(5, 3))


def test_classifier_accepts_a_fresh_untrained_model(test_set):
    state = torch.get_rng_state()
    model = DigitClassifier()
    model.reset_parameters(torch.Generator().manual_seed(0))
    assert class_coverage(test_set.x, model)["covered"] >= 1
    torch.set_rng_state(state)
