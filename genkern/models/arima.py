"""ARIMA(p, d, q) models for univariate series, fitted by exact Gaussian maximum likelihood.

The model follows statsmodels' ``tsa.arima.model.ARIMA`` (regression with ARIMA errors)::

    y_t = x_t' beta + u_t,   (1 - L)^d u_t = w_t,
    w_t = phi_1 w_{t-1} + ... + phi_p w_{t-p} + e_t + theta_1 e_{t-1} + ... + theta_q e_{t-q},

with ``e_t ~ N(0, sigma2)`` and the sign convention of ``genkern.data.arma``. The trend
``x_t`` holds powers of the time index ``t = 1, ..., n``: ``"n"`` none, ``"c"`` a constant, ``"t"``
a linear trend, ``"ct"`` both. So for ``d = 0`` the ``"const"`` parameter is the *mean* of the
series, not the intercept of the ARMA recursion, and for ``d = 1`` the ``"trend"`` coefficient
(statsmodels' ``"x1"``) is the mean of the differenced series (the drift). As in statsmodels,
trend terms of order below ``d`` are rejected (differencing would remove them).

Fitting works on the d-times differenced series ``Δ^d y = Δ^d x' beta + w``. The likelihood of
``w`` is exact (the stationary start, without a time loop; see ``genkern.models.arma_likelihood``),
with ``beta`` and ``sigma2`` concentrated out in closed form, so L-BFGS-B only searches the ARMA
coefficients, with the exact gradient, through partial autocorrelations ``tanh(x)`` (Monahan / Jones)
that keep every iterate stationary and invertible. It starts from several points and keeps the
best optimum. The log-likelihood is that of the ``n - d`` differenced values (the exact diffuse
limit; statsmodels starts the integrated states with variance 1e6 instead, so for d > 0 its llf
differs from this one by an amount that grows with the level of the series: 1e-6 on unit-scale
data, 0.05 on the Nile flows).

Inputs may be lists, numpy arrays or tensors; the computation is numpy/scipy float64, and every
series returned (``forecast``, ``simulate``) is a 1-D torch.float64 CPU tensor.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import numpy as np
import torch
from scipy import optimize, stats

from genkern.data.arma import (
    as_coefficients,
    check_invertible,
    check_stationary,
    pacf_from_ar,
    psi_weights,
)
from genkern.models.arma_likelihood import (
    SEARCH_BOUND,
    as_series,
    css,
    draw_arma,
    gaussian_llf,
    hannan_rissanen,
    kalman,
    lags,
    ols,
    pacf_coefficients,
    profile,
    search_objective,
    state_loadings,
)

__all__ = ["AR", "ARIMA", "Forecast"]

_TREND_TERMS = {"n": (), "c": (0,), "t": (1,), "ct": (0, 1)}
_TREND_NAMES = {0: "const", 1: "trend"}


class Forecast(NamedTuple):
    """Forecasts for steps 1..h ahead: each field an (h,) torch.float64 tensor."""

    mean: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    se: torch.Tensor  # standard error of the forecast (prediction error std)


class ARIMA:
    """ARIMA(p, d, q) with an optional deterministic trend, fitted by exact maximum likelihood.

    Args:
        order: ``(p, d, q)`` non-negative ints.
        trend: ``"n"``, ``"c"``, ``"t"`` or ``"ct"`` (see the module docstring). Default ``"c"``
            when ``d == 0`` and ``"n"`` otherwise, as in statsmodels.

    After ``fit(y)``: ``params`` (dict: ``const``/``trend``, ``ar.L1``.., ``ma.L1``..,
    ``sigma2``), ``sigma2``, ``llf``, ``aic``, ``bic`` (the parameter count includes sigma2; BIC
    uses the ``n - d`` differenced values, as statsmodels), ``nobs``.
    """

    def __init__(self, order=(1, 0, 0), trend: str | None = None):
        if (
            not isinstance(order, (tuple, list))
            or len(order) != 3
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 for v in order)
        ):
            raise ValueError(f"order must be (p, d, q) with non-negative ints, got {order!r}")
        self.p, self.d, self.q = (int(v) for v in order)
        self.trend = ("c" if self.d == 0 else "n") if trend is None else trend
        if self.trend not in _TREND_TERMS:
            raise ValueError(f"trend must be one of 'n', 'c', 't', 'ct' or None, got {trend!r}")
        self._terms = _TREND_TERMS[self.trend]
        if self._terms and min(self._terms) < self.d:
            raise ValueError(
                f"trend={self.trend!r} has terms of lower order than d={self.d}; differencing "
                "removes them (use trend='t' with d=1, or 'n')"
            )
        self.param_names = (
            [_TREND_NAMES[k] for k in self._terms]
            + [f"ar.L{i}" for i in range(1, self.p + 1)]
            + [f"ma.L{j}" for j in range(1, self.q + 1)]
            + ["sigma2"]
        )
        self._fitted = False

    # ---- data preparation -------------------------------------------------------------
    def _differenced(self, y: np.ndarray, extra: int = 0):
        """Δ^d y (m,) and Δ^d of the trend columns for t = 1..len(y)+extra, ((m + extra), k)."""
        t = np.arange(1, len(y) + extra + 1, dtype=np.float64)
        X = np.column_stack([t**k for k in self._terms]) if self._terms else np.empty((len(t), 0))
        return np.diff(y, n=self.d), np.diff(X, n=self.d, axis=0)

    def _check_length(self, y: np.ndarray, need: int):
        if len(y) < need:
            raise ValueError(
                f"y has {len(y)} values; ARIMA{(self.p, self.d, self.q)} with trend={self.trend!r} "
                f"needs at least {need}"
            )

    # ---- estimation --------------------------------------------------------------------
    def fit(self, y, *, start_params=None, maxiter: int = 1000) -> ARIMA:
        """Exact maximum-likelihood fit to the series ``y`` ((n,) array or tensor). Returns self.

        start_params: optional ARMA start values, either ``[ar..., ma...]`` (p + q values) or a
            full vector in ``param_names`` order (only its AR and MA entries are used). They must
            be stationary and invertible, and are the only start. Default: several starts
            (Hannan-Rissanen with a long and with a short autoregression, zeros, conditional sum
            of squares), keeping the best optimum: on real series the likelihood often has local
            optima near the non-invertible boundary that a single start can settle in.
        """
        y = as_series(y)
        self._check_length(y, self.d + len(self._terms) + self.p + self.q + 2)
        w, X = self._differenced(y)
        detrended = w - X @ ols(w, X) if X.shape[1] else w
        if not _varies(detrended, w):
            raise ValueError("y has no variation left after differencing and removing the trend")
        p, q = self.p, self.q

        def objective(x):
            return search_objective(x, p, w, X)

        self.optimizer_result = None
        x = np.empty(0)
        if p + q:
            # Every start is searched to a loose tolerance (relative llf change 1e-8); only the best is
            # then polished, for at most 50 steps: on flat, over-parameterised surfaces (ARIMA(8, 1, 8)
            # on 100 values) the tight search crawls for thousands of steps to gain 1e-7 of the llf.
            # A start that reaches an optimum already found, or that crawls in a clearly worse one, stops early.
            results = []
            for x0 in self._starts(detrended, start_params):
                results.append(_maximise(objective, x0, maxiter, loose=True, found=results))
            best = min(results, key=lambda r: r.fun)
            self.optimizer_result = _maximise(objective, best.x, min(maxiter, 50))
            if self.optimizer_result.fun > best.fun:
                self.optimizer_result = best
            x = self.optimizer_result.x
            if not best.success:
                warnings.warn(
                    f"ARIMA{(p, self.d, q)} fit: L-BFGS-B did not converge ({best.message})",
                    RuntimeWarning,
                    stacklevel=2,
                )
        phi, theta = pacf_coefficients(x, p)
        _, beta, sigma2 = profile(phi, theta, w, X)
        self._set_fit(y, phi, theta, beta, sigma2)
        return self

    def _starts(self, detrended: np.ndarray, start_params) -> list[np.ndarray]:
        """Distinct start vectors (search space of ``pacf_coefficients``) for the likelihood search."""
        p, q = self.p, self.q
        if start_params is not None:
            sp = as_coefficients(start_params, "start_params")
            if len(sp) not in (p + q, len(self.param_names)):
                raise ValueError(
                    f"start_params must have {p + q} (ar, ma) or {len(self.param_names)} values, got {len(sp)}"
                )
            sp = sp[len(self._terms) : len(self._terms) + p + q] if len(sp) != p + q else sp
            phi0 = check_stationary(sp[:p], "start_params (AR part)")
            theta0 = check_invertible(sp[p:], "start_params (MA part)")
            return [_search_vector(phi0, theta0)]
        hr = _search_vector(*hannan_rissanen(detrended, p, q))
        short = _search_vector(*hannan_rissanen(detrended, p, q, long_ar=2 * q))
        starts = [hr, np.zeros(p + q), css(detrended, p, q, hr), short]
        return [x0 for i, x0 in enumerate(starts) if not any(np.allclose(x0, s, atol=1e-6) for s in starts[:i])]

    def _set_fit(self, y, phi, theta, beta, sigma2):
        """Store the parameters and the filter state at the end of y (for forecasts)."""
        self._phi, self._theta = np.asarray(phi, float), np.asarray(theta, float)
        self._beta, self._sigma2 = np.asarray(beta, float), float(sigma2)
        self._fitted = True
        w, X = self._differenced(y)
        V, f, a, P = kalman((w - X @ self._beta)[:, None], self._phi, self._theta)
        self._a_end, self._P_end = a[:, 0], P
        # Last value of each Δ^j y (j < d): the anchors for integrating forecasts back.
        self._levels = [float(np.diff(y, n=j)[-1]) for j in range(self.d)]
        self.nobs = len(y)
        self._llf_value = gaussian_llf(V[:, 0], f, self._sigma2)

    def _require_fit(self, what: str):
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}.{what} needs a fitted model; call .fit(y) first")

    # ---- results -----------------------------------------------------------------------
    @property
    def params(self) -> dict:
        """Fitted parameters by name, in ``param_names`` order (floats)."""
        self._require_fit("params")
        values = np.concatenate((self._beta, self._phi, self._theta, [self._sigma2]))
        return dict(zip(self.param_names, (float(v) for v in values)))

    @property
    def llf(self) -> float:
        """Exact log-likelihood of the fitted series (its n - d differenced values)."""
        self._require_fit("llf")
        return self._llf_value

    @property
    def sigma2(self) -> float:
        self._require_fit("sigma2")
        return self._sigma2

    @property
    def aic(self) -> float:
        self._require_fit("aic")
        return -2.0 * self.llf + 2.0 * len(self.param_names)

    @property
    def bic(self) -> float:
        self._require_fit("bic")
        return -2.0 * self.llf + len(self.param_names) * math.log(self.nobs - self.d)

    def log_likelihood(self, y) -> float:
        """Exact Gaussian log-likelihood of the series ``y`` ((n,), time index 1..n) under the
        fitted parameters; like ``llf``, it is the density of the n - d differenced values."""
        self._require_fit("log_likelihood")
        y = as_series(y)
        self._check_length(y, self.d + 1)
        w, X = self._differenced(y)
        V, f, _, _ = kalman((w - X @ self._beta)[:, None], self._phi, self._theta)
        return gaussian_llf(V[:, 0], f, self._sigma2)

    def _integrate(self, w_new: np.ndarray) -> np.ndarray:
        """Future Δ^d values -> future levels of y, continuing from the fitted series' end."""
        for level in reversed(self._levels):
            w_new = level + np.cumsum(w_new)
        return w_new

    def forecast(self, steps: int, alpha: float = 0.05) -> Forecast:
        """Forecast ``steps`` values past the end of the fitted series.

        Mean: the Kalman prediction of the differenced series plus its trend, integrated back
        ``d`` times from the last observed values. Variance (exact, known past):
        ``sigma2 * (g_h P g_h' + sum_{i < h-1} psi_i^2)``, where P is the state prediction
        covariance at n + 1, g_h the integrated loading of that state, and psi the ARIMA
        psi-weights of theta(z) / (phi(z) (1 - z)^d). Interval: mean -/+ z_{1 - alpha/2} * se.
        Returns a ``Forecast`` of (steps,) float64 tensors.
        """
        self._require_fit("forecast")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if not (isinstance(alpha, numbers.Real) and 0 < alpha < 1):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        G = state_loadings(self._phi, self._theta, steps)
        X = self._differenced(np.zeros(self.nobs), extra=steps)[1][-steps:]
        mean = self._integrate(X @ self._beta + G @ self._a_end)
        for _ in range(self.d):
            G = np.cumsum(G, axis=0)
        psi = psi_weights(self._phi, self._theta, steps, self.d)
        shocks = np.concatenate(([0.0], np.cumsum(psi[:-1] ** 2)))
        se = np.sqrt(self._sigma2 * (np.einsum("hi,ij,hj->h", G, self._P_end, G) + shocks))
        z = stats.norm.ppf(1.0 - alpha / 2.0)
        out = [torch.from_numpy(np.ascontiguousarray(v)) for v in (mean, mean - z * se, mean + z * se, se)]
        return Forecast(*out)

    def simulate(
        self, n: int, *, seed: int | None = None, generator: torch.Generator | None = None, initial: str = "stationary"
    ) -> torch.Tensor:
        """Draw ``n`` values from the fitted model; returns an (n,) torch.float64 tensor.

        initial: ``"stationary"`` starts the ARMA state from its stationary distribution, with
            the trend at t = 1..n and (for d > 0) the integration starting from 0;
            ``"continue"`` draws the state from its distribution given the fitted series and
            continues it (times n_fit + 1 ..., integrated from the last observed values).
        seed / generator: reproducible draws (a fresh ``torch.Generator``, or the one given).
        """
        self._require_fit("simulate")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if initial not in ("stationary", "continue"):
            raise ValueError(f"initial must be 'stationary' or 'continue', got {initial!r}")
        if seed is not None and generator is not None:
            raise ValueError("give at most one of seed and generator")
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(seed)) if seed is not None else generator.seed()
        if initial == "continue":
            w = draw_arma(self._phi, self._theta, self._sigma2, n, generator, self._a_end, self._P_end)
            X = self._differenced(np.zeros(self.nobs), extra=n)[1][-n:]
        else:
            w = draw_arma(self._phi, self._theta, self._sigma2, n, generator)
            X = self._differenced(np.zeros(n + self.d))[1]
        w = w + X @ self._beta
        if initial == "continue":
            w = self._integrate(w)
        else:
            for _ in range(self.d):
                w = np.cumsum(w)
        return torch.from_numpy(np.ascontiguousarray(w))


class AR(ARIMA):
    """AR(p) fitted in closed form by ordinary least squares (conditional on the first p values).

    ``y_t = c + phi_1 y_{t-1} + ... + phi_p y_{t-p} + e_t`` is regressed on its lags (and a
    constant when ``trend="c"``); ``sigma2 = SSR / (n - p)``, as statsmodels' ``AutoReg``.
    ``intercept`` holds c; ``params["const"]`` is the mean ``c / (1 - sum(phi))``, as in ARIMA,
    so forecasts, simulation and ``llf`` (the *exact* Gaussian log-likelihood at the OLS
    estimates) are those of the ARIMA(p, 0, 0) model with these parameters.
    """

    def __init__(self, p: int, trend: str = "c"):
        if trend not in ("n", "c"):
            raise ValueError(f"trend must be 'n' or 'c' for AR, got {trend!r}")
        super().__init__(order=(p, 0, 0), trend=trend)

    def fit(self, y) -> AR:
        """Least-squares fit to ``y`` ((n,) array or tensor). Returns self."""
        y = as_series(y)
        p, k = self.p, len(self._terms)
        self._check_length(y, 2 * p + k + 1)
        if not _varies(y - y.mean() if k else y, y):
            raise ValueError("y has no variation left after differencing and removing the trend")
        target, design = y[p:], lags(y, p, p)
        if k:  # the constant by centring (Frisch-Waugh), so the solve never sees a column of ones beside |y|
            phi = ols(target - target.mean(), design - design.mean(axis=0))
            self.intercept = float(target.mean() - design.mean(axis=0) @ phi)
        else:
            phi, self.intercept = ols(target, design), 0.0
        resid = target - design @ phi - self.intercept
        try:
            check_stationary(phi, "ar")
        except ValueError as exc:
            raise ValueError(
                f"y: the least-squares AR estimates are not stationary ({exc}); difference the "
                "series or fit ARIMA by maximum likelihood"
            ) from None
        sigma2 = float(resid @ resid) / (len(y) - p)
        if not math.sqrt(sigma2) > 1e-10 * np.abs(y).max():  # rounding, not noise: a relative test
            raise ValueError("y is fitted exactly by the AR recursion (zero residual variance)")
        beta = [self.intercept / (1.0 - phi.sum())] if k else []
        self._set_fit(y, phi, np.empty(0), beta, sigma2)
        return self


def _varies(x: np.ndarray, scale: np.ndarray) -> bool:
    """Whether x has variation beyond rounding relative to the magnitude of ``scale``."""
    return bool(np.ptp(x) > 1e-10 * np.abs(scale).max())


def _search_vector(phi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Stationary phi, invertible theta -> the search vector of ``pacf_coefficients`` (clipped to its bounds)."""
    return np.clip(np.arcsinh(np.concatenate((pacf_from_ar(phi), pacf_from_ar(-theta)))), -SEARCH_BOUND, SEARCH_BOUND)


def _maximise(objective, x0: np.ndarray, maxiter: int, loose: bool = False, found=()):
    """L-BFGS-B from x0 within the search bounds (see ``SEARCH_BOUND``); with ``found`` (the results of
    earlier starts) it stops early once it cannot change which optimum is best (see ``_EarlyStop``)."""
    return optimize.minimize(
        objective,
        x0,
        jac=True,
        method="L-BFGS-B",
        bounds=[(-SEARCH_BOUND, SEARCH_BOUND)] * len(x0),
        options={"maxiter": maxiter, "ftol": 1e-8 if loose else 1e-14, "gtol": 1e-5 if loose else 1e-9},
        callback=_EarlyStop(found) if len(found) else None,
    )


class _EarlyStop:
    """L-BFGS-B callback for a later start: stop when the iterate sits at an optimum an earlier start
    already reached (within 1e-3 in the search space and at most 1e-6 above it in the objective, -llf / m:
    the best is polished afterwards anyway), or when it is worse than the best so far by more than 100 times what
    it gained over its last 10 steps (it is settling in a worse local optimum). The loose searches of
    high orders spend most of their steps creeping like that."""

    WINDOW, RATIO = 10, 100.0

    def __init__(self, found):
        self.found, self.history = list(found), []
        self.best = min(r.fun for r in self.found)

    def __call__(self, intermediate_result):
        x, f = intermediate_result.x, float(intermediate_result.fun)
        self.history.append(f)
        for r in self.found:
            if 0.0 <= f - r.fun <= 1e-6 and np.max(np.abs(x - r.x)) <= 1e-3:  # never better: not the best
                raise StopIteration
        if len(self.history) > self.WINDOW:
            gained = self.history[-self.WINDOW - 1] - f
            if f - self.best > self.RATIO * gained:
                raise StopIteration
