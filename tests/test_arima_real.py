"""ARIMA on real series: the fitted log-likelihood is never below statsmodels' on the same data and order.

The series are the ones statsmodels bundles (nothing is downloaded). A single start settled in a worse
local optimum on some of them (elnino (0, 2, 2): -925.33 against -889.75; monthly CO2 (1, 1, 1):
-836.49 against -633.48), so the cases below are those plus a sample of the grid p, q <= 2, d <= 2;
the whole grid (189 fits) is the slow sweep.

Same quantity: genkern's llf is the exact likelihood of the d-times differenced series. statsmodels'
default fit starts the integrated states from a variance of 1e6 instead, so for d > 0 its llf depends
on the level of the series (by up to 0.05 on nile). Its fitted parameters are therefore scored with
statsmodels' own exact likelihood of the differenced series (ARIMA(p, 0, q) on np.diff(y, d)), which is
checked to equal genkern's llf at genkern's parameters.
"""

import itertools
import time
import warnings

import numpy as np
import pytest

from arima_series import SERIES, load_series
from genkern.models.arima import ARIMA

pytest.importorskip("statsmodels.api")
SM = pytest.importorskip("statsmodels.tsa.arima.model").ARIMA

REL = 1e-6


def _exact_llf(y: np.ndarray, order, params) -> float:
    """statsmodels' exact Gaussian log-likelihood of the differenced series at params (default trends)."""
    p, d, q = order
    model = SM(np.diff(y, n=d), order=(p, 0, q), trend="c" if d == 0 else "n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(model.loglike(np.asarray(params, dtype=float)))


def _check_never_worse(name: str, order) -> float:
    """Fit both; assert genkern's llf is the same quantity and not below statsmodels'. Returns genkern's fit time."""
    y = load_series(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' start-value and convergence notes
        ref = SM(y, order=order).fit()
        start = time.perf_counter()
        ours = ARIMA(order).fit(y)
        seconds = time.perf_counter() - start
    at_ours = _exact_llf(y, order, list(ours.params.values()))
    assert ours.llf == pytest.approx(at_ours, rel=REL, abs=1e-9), "not the same likelihood"
    at_ref = _exact_llf(y, order, ref.params)
    assert ours.llf >= at_ref - REL * abs(at_ref), (name, order, ours.llf, at_ref)
    if order[1] == 0:  # without differencing statsmodels' own llf is this quantity
        assert ours.llf >= ref.llf - REL * abs(ref.llf)
    return seconds


# Fits a single Hannan-Rissanen start lost (13 of the 189 of the grid), then a sample with every
# series and the largest orders of the grid.
FAILED_BEFORE = [
    ("elnino", (0, 2, 2)),  # -925.33 against -889.75
    ("co2", (1, 1, 1)),  # -836.49 against -633.48
    ("co2", (0, 2, 1)),  # -838.44 against -690.29
    ("elnino", (1, 1, 2)),  # -891.28 against -805.89
    ("realgdp", (2, 0, 1)),  # 610.97 against 669.79
    ("sunspots", (0, 2, 1)),  # -1414.33 against -1397.86
    ("co2", (0, 0, 2)),  # -1584.60 against -1584.32
    ("infl", (0, 2, 2)),  # -458.576 against -458.573
]
SAMPLE = [
    ("sunspots", (2, 0, 1)),
    ("nile", (1, 1, 1)),
    ("infl", (2, 1, 2)),
    ("unemp", (2, 2, 2)),
    ("realgdp", (1, 1, 2)),
    ("elnino", (2, 2, 1)),
]


@pytest.mark.parametrize("name, order", FAILED_BEFORE + SAMPLE)
def test_llf_never_below_statsmodels(name, order):
    _check_never_worse(name, order)


@pytest.mark.slow
@pytest.mark.parametrize("name", SERIES)
def test_llf_never_below_statsmodels_whole_grid(name):
    for p, d, q in itertools.product(range(3), range(3), range(3)):
        _check_never_worse(name, (p, d, q))


def test_high_order_fit_is_fast_and_never_worse():
    """ARIMA(8, 1, 8) on 100 values took 72 s and stopped at the evaluation limit with numerical
    gradients (statsmodels: about 1 s, 50 iterations, not converged). With the exact gradient it takes
    a few seconds, and its optimum is better than statsmodels'. The bound is loose: the machine is shared."""
    assert _check_never_worse("nile", (8, 1, 8)) < 30.0
