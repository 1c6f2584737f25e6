"""The numerics behind ``genkern.models.arima``: series checks, least squares, start values, the
exact Gaussian likelihood of an ARMA(p, q) series and draws from the process.

The likelihood is exact: a Kalman filter on Harvey's state-space form, started from the
stationary covariance (discrete Lyapunov equation). Once the filtered covariance has vanished
(the innovations then equal the ARMA residuals) the rest of the series is filtered with
``scipy.signal.lfilter``, which makes long series cheap. The regression coefficients and
``sigma2`` are concentrated out in closed form (GLS on the innovations, ``profile``), so an
optimizer only has to search the ARMA coefficients. Start values come from Hannan-Rissanen.

Everything here is numpy/scipy float64 and follows the sign convention of ``genkern.data.arma``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import linalg, optimize, signal

from genkern.data.arma import ar_from_pacf, check_invertible, check_stationary

__all__ = [
    "as_series",
    "css",
    "draw_arma",
    "gaussian_llf",
    "hannan_rissanen",
    "initial_state_factor",
    "kalman",
    "lags",
    "ols",
    "pacf_coefficients",
    "profile",
    "state_loadings",
    "state_space",
]


def as_series(y, name: str = "y") -> np.ndarray:
    """y as a 1-D finite float64 array (copy-free where possible)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().to(torch.float64).numpy()
    try:
        arr = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of real numbers") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def lags(x: np.ndarray, k: int, start: int) -> np.ndarray:
    """(len(x) - start, k) matrix whose row for t holds x[t-1], ..., x[t-k]."""
    return np.column_stack([x[start - j : len(x) - j] for j in range(1, k + 1)]) if k else np.empty((len(x) - start, 0))


def ols(target: np.ndarray, design: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of target on the columns of design."""
    return np.linalg.lstsq(design, target, rcond=None)[0]


def state_space(phi: np.ndarray, theta: np.ndarray):
    """Harvey form: alpha_t = T alpha_{t-1} + R e_t, w_t = alpha_t[0]; r = max(p, q + 1)."""
    p, q = len(phi), len(theta)
    r = max(p, q + 1)
    T = np.eye(r, k=1)
    T[:p, 0] = phi
    R = np.zeros(r)
    R[0], R[1 : q + 1] = 1.0, theta
    return T, np.outer(R, R)


def state_loadings(phi: np.ndarray, theta: np.ndarray, steps: int) -> np.ndarray:
    """(steps, r) matrix whose row h-1 is Z T^(h-1): the loading of alpha_{n+1} on w_{n+h}."""
    T, _ = state_space(phi, theta)
    G = np.empty((steps, T.shape[0]))
    G[0] = np.eye(T.shape[0])[0]
    for h in range(1, steps):
        G[h] = G[h - 1] @ T
    return G


def kalman(Y: np.ndarray, phi: np.ndarray, theta: np.ndarray, tol: float = 1e-14):
    """Innovations of the zero-mean, unit-variance-shock ARMA model for each column of Y.

    Y: (m, k). Returns V (m, k) innovations, f (m,) their variances (in units of sigma2),
    and the one-step prediction a (r, k), P (r, r) for time m + 1. The gains do not depend on
    the data, so all columns share one filter pass. ``tol < 0`` disables the steady-state switch.
    """
    T, RR = state_space(phi, theta)
    P = linalg.solve_discrete_lyapunov(T, RR)
    scale = max(1.0, float(np.abs(P).max()))  # rounding noise in P grows with its size
    m, k = Y.shape
    V, f = np.empty((m, k)), np.ones(m)
    a = np.zeros((T.shape[0], k))
    t = 0
    while t < m:
        F = P[0, 0]
        V[t], f[t] = Y[t] - a[0], F
        K = P[:, 0] / F
        Pf = P - np.outer(K, P[0])
        a = T @ (a + np.outer(K, V[t]))
        P = T @ Pf @ T.T + RR
        t += 1
        # AR(p) states are known exactly after p values; otherwise wait for Pf to vanish.
        if tol >= 0 and ((len(theta) == 0 and t >= len(phi)) or np.abs(Pf).max() <= tol * scale):
            break
    if t < m:
        # Steady state: innovations are the ARMA residuals phi(L) w / theta(L). lfilter's
        # transposed direct-form state is then minus the predicted Harvey state.
        s = max(len(phi), len(theta))
        V[t:], zf = signal.lfilter(np.r_[1.0, -phi], np.r_[1.0, theta], Y[t:], axis=0, zi=-a[:s])
        a = np.zeros_like(a)
        a[:s] = -zf
        P = RR
    return V, f, a, P


def initial_state_factor(phi: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """(s, s) factor L, L L' = covariance (in units of sigma2) of the pre-sample state of the residual filter.

    ``lfilter([1, -phi], [1, theta], w, zi=z)`` gives the shocks e_1.. when z is the filter state
    carried in from before t = 1: minus the first s = max(p, q) entries of T alpha_0 (Harvey form),
    which is independent of e_1.., with covariance (P - R R')[:s, :s] for the stationary P. That
    matrix can be singular, so the factor comes from an eigen-decomposition, not Cholesky.
    """
    s = max(len(phi), len(theta))
    T, RR = state_space(phi, theta)
    lam, U = np.linalg.eigh((linalg.solve_discrete_lyapunov(T, RR) - RR)[:s, :s])
    return U * np.sqrt(np.clip(lam, 0.0, None))


def profile(phi: np.ndarray, theta: np.ndarray, w: np.ndarray, X: np.ndarray):
    """Concentrated log-likelihood, GLS beta and sigma2 of ``w = X beta + ARMA`` for given ARMA coefficients.

    The exact likelihood without a time loop: the residual filter run from a zero state gives
    e0 = e + G z, linear in the unknown pre-sample state z = L u (u ~ N(0, sigma2 I), see
    ``initial_state_factor``). Integrating u out leaves ``min_{u, beta} |e0 - E_X beta - G L u|^2 + |u|^2``
    as the quadratic form and ``det(I + L'G'G L)`` as the determinant (the product of the Kalman
    innovation variances), so one QR of the stacked (m + s, s + k + 1) system gives both, with
    beta. Exact for any stationary AR part and any MA part, however close to non-invertible.
    """
    m, k = len(w), X.shape[1]
    s = max(len(phi), len(theta))
    cols = np.column_stack([np.zeros((m, s)), X, w])  # (m, s + k + 1): state responses, trend, data
    if s:
        zi = np.zeros((s, s + k + 1))
        zi[:, :s] = initial_state_factor(phi, theta)
        E = signal.lfilter(np.r_[1.0, -phi], np.r_[1.0, theta], cols, axis=0, zi=zi)[0]
        cols = np.vstack([E, np.eye(s, s + k + 1)])  # (m + s, s + k + 1): the prior |u|^2 as s extra rows
    R = np.linalg.qr(cols, mode="r")
    diag = np.abs(np.diag(R))
    beta = linalg.solve_triangular(R[s:-1, s:-1], R[s:-1, -1]) if k else np.empty(0)
    sigma2 = float(diag[-1]) ** 2 / m
    llf = -0.5 * m * (math.log(2 * math.pi * sigma2) + 1.0) - float(np.log(diag[:s]).sum())
    return llf, beta, sigma2


def gaussian_llf(v: np.ndarray, f: np.ndarray, sigma2: float) -> float:
    """Gaussian log-likelihood of innovations v with variances sigma2 * f."""
    return float(-0.5 * np.sum(np.log(2 * math.pi * sigma2 * f) + v * v / (sigma2 * f)))


def draw_arma(
    phi: np.ndarray,
    theta: np.ndarray,
    sigma2: float,
    n: int,
    generator: torch.Generator,
    mean0: np.ndarray | None = None,
    cov0: np.ndarray | None = None,
) -> np.ndarray:
    """n values w_1..w_n of the zero-mean ARMA process with shock variance sigma2, (n,) float64.

    The Harvey state alpha_1 is drawn from N(mean0, sigma2 cov0): by default the stationary
    distribution, or a filtered prediction (``kalman``'s a, P) to continue a series.
    """
    T, RR = state_space(phi, theta)
    r, scale = T.shape[0], math.sqrt(sigma2)
    z = torch.randn(r + n - 1, generator=generator, dtype=torch.float64).numpy()
    if cov0 is None:
        mean0, cov0 = np.zeros(r), linalg.solve_discrete_lyapunov(T, RR)
    # cov0 may be singular (e.g. R R'), so draw through its eigen-decomposition.
    lam, U = np.linalg.eigh(cov0)
    alpha1 = mean0 + scale * (U @ (np.sqrt(np.clip(lam, 0.0, None)) * z[:r]))
    w = np.empty(n)
    w[0] = alpha1[0]
    if n > 1:  # after alpha_1 the lfilter state is T alpha_1 (transposed direct form = Harvey form)
        w[1:] = signal.lfilter(
            np.r_[1.0, theta], np.r_[1.0, -phi], scale * z[r:], zi=(T @ alpha1)[: max(len(phi), len(theta))]
        )[0]
    return w


def hannan_rissanen(u: np.ndarray, p: int, q: int):
    """Start values for ARMA(p, q) on a zero-mean series u; zeros where they are unusable."""
    m = len(u)
    phi, theta = np.zeros(p), np.zeros(q)
    if q == 0:
        if m - p > p:
            phi = ols(u[p:], lags(u, p, p))
    else:
        # A long autoregression estimates the shocks, then y is regressed on its lags and them.
        L = min(max(int(math.log(m) ** 2), 2 * max(p, q)), (m - 1) // 3)
        start = max(p, L + q)
        if L >= 1 and m - start > p + q:
            # Yule-Walker (a Toeplitz solve) keeps the long AR cheap: least squares on an
            # (m, L) lag matrix costs O(m L^2), and these are only start values.
            acov = np.array([u[: m - j] @ u[j:] for j in range(L + 1)]) / m
            e = np.zeros(m)
            e[L:] = u[L:] - lags(u, L, L) @ linalg.solve_toeplitz(acov[:L], acov[1:])
            coef = ols(u[start:], np.column_stack([lags(u, p, start), lags(e, q, start)]))
            phi, theta = coef[:p], coef[p:]
    try:
        check_stationary(phi)
    except ValueError:
        phi = np.zeros(p)
    try:
        check_invertible(theta)
    except ValueError:
        theta = np.zeros(q)
    return phi, theta


def pacf_coefficients(x: np.ndarray, p: int):
    """Search vector (p + q,) -> (phi, theta): both parts through the PACF transform, so every
    point is stationary and invertible (theta(z) = 1 + ... is read as an AR-type polynomial)."""
    return ar_from_pacf(x[:p]), -ar_from_pacf(x[p:])


def css(u: np.ndarray, p: int, q: int, x0: np.ndarray) -> np.ndarray:
    """Conditional-sum-of-squares estimate for a zero-mean series u, as a search vector (see
    ``pacf_coefficients``), searched from x0: residuals from a zero pre-sample state, the first p
    dropped. Cheap (one filter pass per evaluation) and a different basin from Hannan-Rissanen's."""

    def ssr(x):
        phi, theta = pacf_coefficients(x, p)
        e = signal.lfilter(np.r_[1.0, -phi], np.r_[1.0, theta], u)[p:]
        return float(e @ e) / len(e)

    return optimize.minimize(ssr, x0, method="L-BFGS-B", bounds=[(-1e3, 1e3)] * (p + q)).x
