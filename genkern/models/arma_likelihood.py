"""The numerics behind ``genkern.models.arima``: series checks, least squares, start values, the
exact Gaussian likelihood of an ARMA(p, q) series and draws from the process.

The likelihood is exact. ``profile`` (what the fit searches, with ``profile_gradient``, its exact
gradient) needs no time loop: residuals from a zero pre-sample state plus a least-squares
integration of the unknown pre-sample state, whose covariance comes from the stationary one
(discrete Lyapunov equation); one QR gives the quadratic form, the determinant and the GLS
regression coefficients, with ``sigma2`` concentrated out. ``kalman`` (Harvey's state-space form,
switching to ``scipy.signal.lfilter`` once the filtered covariance has vanished) gives the same
likelihood and the filter state at the end of the series, for forecasts. Start values come from
Hannan-Rissanen and conditional sum of squares.

Everything here is numpy/scipy float64 and follows the sign convention of ``genkern.data.arma``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
from scipy import linalg, optimize, signal

__all__ = [
    "as_series",
    "css",
    "draw_arma",
    "gaussian_llf",
    "hannan_rissanen",
    "kalman",
    "lags",
    "ols",
    "pacf_coefficients",
    "profile",
    "profile_gradient",
    "search_objective",
    "SEARCH_BOUND",
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
    """Least-squares coefficients of target on the columns of design.

    The columns are scaled to unit norm first: lstsq's rank cut (rcond) compares singular values,
    so a column of ones beside columns of size 1e12 would otherwise be dropped as rank-deficient.
    """
    norms = np.linalg.norm(design, axis=0)
    norms[norms == 0.0] = 1.0
    return np.linalg.lstsq(design / norms, target, rcond=None)[0] / norms


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


class _System(NamedTuple):
    """The exact likelihood's least-squares system for given ARMA coefficients (see ``profile``)."""

    T: np.ndarray  # (r, r) Harvey transition
    lyap: tuple  # LU factors of I - T (x) T: the stationary covariance and its adjoint share them
    P: np.ndarray  # (r, r) stationary state covariance
    cov0: np.ndarray  # (s, s) covariance of the pre-sample filter state
    L: np.ndarray  # (s, s) cov0 = L L'
    h: np.ndarray  # (m,) impulse response of 1 / theta(L)
    G: np.ndarray  # (m, s) response of the residual filter to each pre-sample state entry: h delayed by j
    Q: np.ndarray  # (m + s, s + k + 1) and R: QR of the stacked system
    R: np.ndarray


def _system(phi: np.ndarray, theta: np.ndarray, w: np.ndarray, X: np.ndarray) -> _System:
    """Build and QR-factor the stacked system ``[[G L, E_X, E_w], [I, 0, 0]]`` of ``profile``.

    With x = 0 the residual filter's output from its pre-sample state z solves theta(L) g_t = z_{t-1}
    (z_t = 0 for t >= s), so G = H / theta(L) with H = [I_s; 0]. z is minus the first s = max(p, q)
    entries of T alpha_0 (Harvey form): independent of e_1.., with covariance (P - R R')[:s, :s]
    for the stationary P. That can be singular, so its factor comes from an eigen-decomposition.
    """
    m, k, s = len(w), X.shape[1], max(len(phi), len(theta))
    a = np.concatenate(([1.0], theta))
    T, RR = state_space(phi, theta)
    lyap = linalg.lu_factor(np.eye(T.size) - np.kron(T, T), check_finite=False)  # P = T P T' + RR', row-major vec
    P = linalg.lu_solve(lyap, RR.ravel(), check_finite=False).reshape(T.shape)
    cov0 = (P - RR)[:s, :s]
    lam, U = np.linalg.eigh(cov0)
    L = U * np.sqrt(np.clip(lam, 0.0, None))
    h = signal.lfilter([1.0], a, np.eye(1, m)[0])
    G = _shifted_columns(h, s)
    E = signal.lfilter(np.concatenate(([1.0], -phi)), a, np.column_stack([X, w]), axis=0)  # (m, k + 1)
    stacked = np.block([[G @ L, E], [np.eye(s, s + k + 1)]])  # (m + s, s + k + 1): the prior |u|^2 as s rows
    Q, R = np.linalg.qr(stacked)
    return _System(T, lyap, P, cov0, L, h, G, Q, R)


def profile(phi: np.ndarray, theta: np.ndarray, w: np.ndarray, X: np.ndarray):
    """Concentrated log-likelihood, GLS beta and sigma2 of ``w = X beta + ARMA`` for given ARMA coefficients.

    The exact likelihood without a time loop: the residual filter run from a zero state gives
    e0 = e + G z, linear in the unknown pre-sample state z = L u (u ~ N(0, sigma2 I); see
    ``_system``). Integrating u out leaves ``SSR = min_{u, beta} |e0 - E_X beta - G L u|^2 + |u|^2``
    as the quadratic form and ``det(I + L'G'G L)`` as the determinant (the product of the Kalman
    innovation variances), so one QR of the stacked (m + s, s + k + 1) system gives both, with
    beta. Exact for any stationary AR part and any MA part, however close to non-invertible.
    """
    llf, beta, sigma2, _ = _profile(phi, theta, w, X)
    return llf, beta, sigma2


def _profile(phi, theta, w, X):
    m, k, s = len(w), X.shape[1], max(len(phi), len(theta))
    sys = _system(phi, theta, w, X)
    diag = np.abs(np.diag(sys.R))
    beta = linalg.solve_triangular(sys.R[s:-1, s:-1], sys.R[s:-1, -1], check_finite=False) if k else np.empty(0)
    sigma2 = float(diag[-1]) ** 2 / m
    llf = -0.5 * m * (math.log(2 * math.pi * sigma2) + 1.0) - float(np.log(diag[:s]).sum())
    return llf, beta, sigma2, sys


def _lagged_dots(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """(n,) sums over t of x_t * y_{t-j} for j = 1..n (over all columns when 2-D): one vdot per lag, as
    the search evaluates this a few times per step on short series, where call overhead is the cost."""
    m = len(x)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    return np.array([np.vdot(x[j:], y[: m - j]) for j in range(1, n + 1)])


@functools.lru_cache(maxsize=64)
def _delay_index(m: int, s: int) -> np.ndarray:
    """(m, s) indices t - j + s - 1 into a series with s - 1 zeros in front (see ``_shifted_columns``)."""
    return np.arange(m)[:, None] - np.arange(s)[None, :] + (s - 1)


def _shifted_columns(h: np.ndarray, s: int) -> np.ndarray:
    """(m, s) matrix with column j holding h delayed by j (zeros first): the response to a unit impulse at j."""
    return np.concatenate((np.zeros(s - 1), h))[_delay_index(len(h), s)] if s else np.empty((len(h), 0))


def profile_gradient(phi: np.ndarray, theta: np.ndarray, w: np.ndarray, X: np.ndarray):
    """``profile``'s log-likelihood and its exact gradient ((p + q,): d/dphi, d/dtheta).

    llf = -m/2 log SSR - 1/2 logdet(I + G cov0 G') + const. By the envelope theorem beta and u stay
    at their optimum, so with r the residual, v = G'r and S = I + G cov0 G':
    dSSR = 2 r'(d e0 - dG z) - v' dcov0 v, dlogdet = 2 tr(cov0 G'S^-1 dG) + tr(G'S^-1 G dcov0).
    d e0 / dphi_j = -L^j (w - X beta) / theta(L), (d e0 - dG z) / dtheta_j = -L^j r / theta(L),
    dG / dtheta_j = -L^j G / theta(L). The cov0 terms go through one adjoint Lyapunov solve
    (Y = T'Y T + Gamma) instead of one per coefficient.
    """
    p, q = len(phi), len(theta)
    m, s = len(w), max(p, q)
    llf, beta, sigma2, sys = _profile(phi, theta, w, X)
    ssr = sigma2 * m
    r = sys.R[-1, -1] * sys.Q[:m, -1]  # residual of the data rows
    F = signal.lfilter([1.0], np.concatenate(([1.0], theta)), np.column_stack([w - X @ beta, r, sys.h]), axis=0)
    g_ssr = -2.0 * np.concatenate((_lagged_dots(r, F[:, 0], p), _lagged_dots(r, F[:, 1], q)))
    FG = _shifted_columns(F[:, 2], s)  # (m, s): G filtered by 1 / theta(L), column by column
    K = sys.G.T @ sys.G
    RA = sys.R[:s, :s]  # RA'RA = I + L'K L
    LCL = sys.L @ linalg.cho_solve((RA, False), sys.L.T, check_finite=False)
    WK = K - K @ LCL @ K  # G' S^-1 G
    Mt = sys.G @ ((np.eye(s) - LCL @ K) @ sys.cov0)  # S^-1 G cov0
    g_logdet = np.zeros(p + q)
    g_logdet[p:] = -2.0 * _lagged_dots(Mt, FG, q)
    grad = -0.5 * m / ssr * g_ssr - 0.5 * g_logdet
    # d llf = tr(Gamma dcov0) through the stationary covariance.
    v = sys.G.T @ r
    gamma = np.zeros_like(sys.P)
    gamma[:s, :s] = 0.5 * m / ssr * np.outer(v, v) - 0.25 * (WK + WK.T)
    Y = linalg.lu_solve(sys.lyap, gamma.ravel(), trans=1, check_finite=False).reshape(gamma.shape)  # Y = T'Y T + Gamma
    Rvec = np.zeros(len(sys.P))
    Rvec[0], Rvec[1 : q + 1] = 1.0, theta
    grad[:p] += 2.0 * (sys.P @ sys.T.T @ Y)[0, :p]
    grad[p:] += 2.0 * ((Y - gamma) @ Rvec)[1 : q + 1]
    return llf, grad


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


def hannan_rissanen(u: np.ndarray, p: int, q: int, long_ar: int | None = None):
    """Start values for ARMA(p, q) on a zero-mean series u; zeros where they are unusable.

    long_ar: order of the autoregression that estimates the shocks; default max(log(m)^2, 2 max(p, q)).
    A short one (statsmodels' start uses 2q) lands in a different basin on some series.
    """
    m = len(u)
    phi, theta = np.zeros(p), np.zeros(q)
    if q == 0:
        if m - p > p:
            phi = ols(u[p:], lags(u, p, p))
    else:
        # A long autoregression estimates the shocks, then y is regressed on its lags and them.
        L = min(max(int(math.log(m) ** 2), 2 * max(p, q)) if long_ar is None else long_ar, (m - 1) // 3)
        start = max(p, L + q)
        if L >= 1 and m - start > p + q:
            # Yule-Walker (a Toeplitz solve) keeps the long AR cheap: least squares on an
            # (m, L) lag matrix costs O(m L^2), and these are only start values.
            # A short one is fitted by least squares, as statsmodels' start does.
            acov = np.array([u[: m - j] @ u[j:] for j in range(L + 1)]) / m
            e = np.zeros(m)
            long = linalg.solve_toeplitz(acov[:L], acov[1:]) if long_ar is None else ols(u[L:], lags(u, L, L))
            e[L:] = u[L:] - lags(u, L, L) @ long
            coef = ols(u[start:], np.column_stack([lags(u, p, start), lags(e, q, start)]))
            phi, theta = coef[:p], coef[p:]
    return -_reflect_roots(-phi), _reflect_roots(theta)


def _reflect_roots(c: np.ndarray, least: float = 1.01) -> np.ndarray:
    """Coefficients of 1 + c_1 z + ... + c_k z^k with every root z of modulus below ``least`` moved to
    modulus max(1 / |z|, least): the reflection keeps the autocovariances of an MA polynomial, so a
    start estimate outside the admissible region keeps its shape instead of dropping to zeros."""
    if not len(c) or not np.all(np.isfinite(c)):
        return np.zeros(len(c))
    roots = np.roots(np.concatenate((c[::-1], [1.0])))
    if np.all(np.abs(roots) >= least):  # fewer than len(c) roots when c_k = 0
        return c
    moduli = np.maximum(np.where(np.abs(roots) < 1.0, 1.0 / np.abs(roots), np.abs(roots)), least)
    poly = np.poly(moduli * np.exp(1j * np.angle(roots)))[::-1]  # prod (z - root), lowest power first
    out = np.zeros(len(c))
    out[: len(roots)] = np.real(poly[1:] / poly[0])
    return out


# |x| <= asinh(1e3) keeps every partial autocorrelation within 5e-7 of +-1, where the Lyapunov solve is finite.
SEARCH_BOUND = math.asinh(1e3)


def pacf_coefficients(x: np.ndarray, p: int):
    """Search vector (p + q,) -> (phi, theta): partial autocorrelations tanh(x), so every point is
    stationary and invertible (theta(z) = 1 + ... is read as an AR-type polynomial). tanh rather than
    x / sqrt(1 + x^2): optima on the invertibility boundary (over-differenced series) are common,
    and tanh reaches them in a few steps where the algebraic map needs hundreds."""
    phi, _ = _pacf_map(x[:p])
    theta, _ = _pacf_map(x[p:])
    return phi, -theta


def _pacf_map(x: np.ndarray):
    """x (k,) -> the AR coefficients with partial autocorrelations tanh(x) (the Durbin-Levinson
    recursion of ``genkern.data.arma.ar_from_pacf``) and their (k, k) Jacobian, differentiated forward
    in place: the search evaluates both at every step, so nothing is re-allocated per order."""
    k = len(x)
    r = np.tanh(x)
    dr = 1.0 - r * r
    phi, D = np.zeros(k), np.zeros((k, k))
    for j in range(k):
        if j:
            old, Dold = phi[:j].copy(), D[:j].copy()
            D[:j] = Dold - r[j] * Dold[::-1]
            D[:j, j] -= dr[j] * old[::-1]
            phi[:j] = old - r[j] * old[::-1]
        phi[j], D[j, j] = r[j], dr[j]
    return phi, D


def search_objective(x: np.ndarray, p: int, w: np.ndarray, X: np.ndarray):
    """-llf / m and its gradient at the search vector x (see ``pacf_coefficients``): what the fit minimises."""
    (phi, Dphi), (theta, Dtheta) = _pacf_map(x[:p]), _pacf_map(x[p:])
    llf, g = profile_gradient(phi, -theta, w, X)
    grad = np.concatenate((Dphi.T @ g[:p], -Dtheta.T @ g[p:]))
    return -llf / len(w), -grad / len(w)


def css(u: np.ndarray, p: int, q: int, x0: np.ndarray) -> np.ndarray:
    """Conditional-sum-of-squares estimate for a zero-mean series u, as a search vector (see
    ``pacf_coefficients``), searched from x0: residuals from a zero pre-sample state, the first p
    dropped. Cheap (one filter pass per evaluation) and a different basin from Hannan-Rissanen's.
    Gradient: de / dphi_j = -L^j u / theta(L), de / dtheta_j = -L^j e / theta(L)."""
    m = len(u) - p

    def ssr(x):
        (phi, Dphi), (theta, Dtheta) = _pacf_map(x[:p]), _pacf_map(x[p:])
        theta = -theta
        a = np.concatenate(([1.0], theta))
        e = signal.lfilter(np.concatenate(([1.0], -phi)), a, u)
        F = signal.lfilter([1.0], a, np.column_stack([u, e]), axis=0)
        e_kept = np.concatenate((np.zeros(p), e[p:]))
        g = -2.0 * np.concatenate((_lagged_dots(e_kept, F[:, 0], p), _lagged_dots(e_kept, F[:, 1], len(theta))))
        grad = np.concatenate((Dphi.T @ g[:p], -Dtheta.T @ g[p:]))
        return float(e[p:] @ e[p:]) / m, grad / m

    bounds = [(-SEARCH_BOUND, SEARCH_BOUND)] * (p + q)
    return optimize.minimize(ssr, x0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 200}).x
