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
import warnings

import numpy as np
import pytest

from genkern.models.arima import ARIMA

sm_api = pytest.importorskip("statsmodels.api")
SM = pytest.importorskip("statsmodels.tsa.arima.model").ARIMA

REL = 1e-6


def _load(name: str) -> np.ndarray:
    ds = sm_api.datasets
    if name == "elnino":  # (year, month) table -> one monthly series
        return ds.elnino.load_pandas().data.drop(columns="YEAR").to_numpy(float).ravel()
    if name == "co2":  # weekly with gaps -> monthly means, gaps carried forward
        return ds.co2.load_pandas().data["co2"].resample("MS").mean().ffill().to_numpy(float)
    column = {"sunspots": "SUNACTIVITY", "nile": "volume"}.get(name)
    if column:
        return getattr(ds, name).load_pandas().data[column].to_numpy(float)
    return ds.macrodata.load_pandas().data[name].to_numpy(float)  # realgdp, infl, unemp


def _exact_llf(y: np.ndarray, order, params) -> float:
    """statsmodels' exact Gaussian log-likelihood of the differenced series at params (default trends)."""
    p, d, q = order
    model = SM(np.diff(y, n=d), order=(p, 0, q), trend="c" if d == 0 else "n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(model.loglike(np.asarray(params, dtype=float)))


def _check_never_worse(name: str, order):
    y = _load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' start-value and convergence notes
        ref = SM(y, order=order).fit()
        ours = ARIMA(order).fit(y)
    at_ours = _exact_llf(y, order, list(ours.params.values()))
    assert ours.llf == pytest.approx(at_ours, rel=REL, abs=1e-9), "not the same likelihood"
    at_ref = _exact_llf(y, order, ref.params)
    assert ours.llf >= at_ref - REL * abs(at_ref), (name, order, ours.llf, at_ref)
    if order[1] == 0:  # without differencing statsmodels' own llf is this quantity
        assert ours.llf >= ref.llf - REL * abs(ref.llf)


# Fits a single Hannan-Rissanen start lost (the first two from the report; the others from the grid),
# then a sample with every series and the largest orders of the grid.
FAILED_BEFORE = [
    ("elnino", (0, 2, 2)),
    ("co2", (1, 1, 1)),
    ("co2", (0, 0, 2)),
    ("realgdp", (2, 0, 1)),
    ("sunspots", (2, 2, 2)),
    ("nile", (2, 0, 2)),
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
@pytest.mark.parametrize("name", ["sunspots", "nile", "elnino", "co2", "realgdp", "infl", "unemp"])
def test_llf_never_below_statsmodels_whole_grid(name):
    for p, d, q in itertools.product(range(3), range(3), range(3)):
        _check_never_worse(name, (p, d, q))


def test_high_order_fit_converges():
    """ARIMA(8, 1, 8) on 100 values stopped at the evaluation limit after 72 s with numerical
    gradients; with the exact gradient every start converges and the best beats statsmodels'."""
    _check_never_worse("nile", (8, 1, 8))
    model = ARIMA((8, 1, 8)).fit(_load("nile"))
    assert model.optimizer_result.success and model.optimizer_result.nfev < 1000
