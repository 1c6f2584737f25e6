"""Simulated ARMA / ARIMA series with known parameters, and the ARMA polynomial helpers.

Sign convention (used throughout genkern, and by ``genkern.models.arima``)::

    y_t = c + phi_1 y_{t-1} + ... + phi_p y_{t-p} + e_t + theta_1 e_{t-1} + ... + theta_q e_{t-q},
    e_t ~ N(0, sigma^2) i.i.d.

so ``ar = [phi_1, ..., phi_p]`` and ``ma = [theta_1, ..., theta_q]``. The lag polynomials are
``phi(z) = 1 - phi_1 z - ... - phi_p z^p`` and ``theta(z) = 1 + theta_1 z + ... + theta_q z^q``.
statsmodels' ``ArmaProcess(ar, ma)`` takes the lag-polynomial coefficients ``[1, -phi_1, ...]``
(the AR signs flipped), while its ARIMA ``params`` use the same signs as here.

The process is stationary when every root of phi(z) lies strictly outside the unit circle, and
invertible when every root of theta(z) does; the mean is ``c / (1 - sum(phi))``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from scipy import signal

__all__ = [
    "ar_from_pacf",
    "arma_process",
    "as_coefficients",
    "check_invertible",
    "check_stationary",
    "pacf_from_ar",
    "psi_weights",
]


def as_coefficients(value, name: str) -> np.ndarray:
    """A 1-D float64 array of finite polynomial coefficients (list, tuple, ndarray or tensor)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a sequence of real numbers, got {value!r}") from exc
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _min_root_modulus(poly_tail: np.ndarray, sign: float) -> float:
    """Smallest |z| over roots of 1 + sign * (c_1 z + ... + c_k z^k); inf when it has no roots."""
    coeffs = np.trim_zeros(np.concatenate(([1.0], sign * poly_tail)), "b")
    if coeffs.size <= 1:
        return math.inf
    # np.roots wants the highest power first.
    return float(np.min(np.abs(np.roots(coeffs[::-1]))))


def check_stationary(ar, name: str = "ar") -> np.ndarray:
    """Validate ``ar = [phi_1..phi_p]``: roots of phi(z) strictly outside the unit circle.

    Returns the coefficients as a float64 array; raises ValueError naming ``name`` otherwise.
    """
    phi = as_coefficients(ar, name)
    modulus = _min_root_modulus(phi, -1.0)
    if not modulus > 1.0 + 1e-10:
        raise ValueError(
            f"{name}={phi.tolist()} is not stationary: the AR polynomial 1 - phi_1 z - ... has a "
            f"root of modulus {modulus:.6g}, but all roots must lie outside the unit circle"
        )
    return phi


def check_invertible(ma, name: str = "ma") -> np.ndarray:
    """Validate ``ma = [theta_1..theta_q]``: roots of theta(z) strictly outside the unit circle."""
    theta = as_coefficients(ma, name)
    modulus = _min_root_modulus(theta, 1.0)
    if not modulus > 1.0 + 1e-10:
        raise ValueError(
            f"{name}={theta.tolist()} is not invertible: the MA polynomial 1 + theta_1 z + ... has a "
            f"root of modulus {modulus:.6g}, but all roots must lie outside the unit circle"
        )
    return theta


def ar_from_pacf(u: np.ndarray) -> np.ndarray:
    """Unconstrained reals (k,) -> coefficients (k,) of a stationary AR polynomial (Monahan / Jones).

    ``u`` is mapped to partial autocorrelations ``r = u / sqrt(1 + u^2)`` in (-1, 1), and the
    Durbin-Levinson recursion builds ``[phi_1..phi_k]`` from them; |r_j| < 1 for all j is exactly
    stationarity, so an optimizer over ``u`` never leaves the stationary region.
    """
    phi = np.empty(0)
    for rk in u / np.sqrt(1.0 + u * u):
        phi = np.concatenate((phi - rk * phi[::-1], [rk]))
    return phi


def pacf_from_ar(phi: np.ndarray) -> np.ndarray:
    """Inverse of ``ar_from_pacf`` for stationary ``phi`` (k,) -> (k,)."""
    phi, r = np.array(phi, dtype=np.float64), np.empty(len(phi))
    for j in range(len(phi) - 1, -1, -1):
        r[j] = phi[j]
        phi = (phi[:j] + r[j] * phi[:j][::-1]) / (1.0 - r[j] ** 2)
    return r / np.sqrt(1.0 - r * r)


def psi_weights(ar, ma, n: int, d: int = 0) -> np.ndarray:
    """First ``n`` MA(infinity) weights psi_0 = 1, psi_1, ... of theta(z) / (phi(z) (1 - z)^d).

    ar, ma: 1-D coefficient arrays in the module's sign convention. Returns (n,) float64.
    The h-step forecast error variance of an ARIMA model (known past) is
    ``sigma^2 * sum(psi[:h]**2)``.
    """
    denom = np.concatenate(([1.0], -np.asarray(ar, dtype=np.float64)))
    for _ in range(d):
        denom = np.convolve(denom, [1.0, -1.0])
    if n == 0:  # lfilter rejects empty input for some filter lengths
        return np.zeros(0)
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return signal.lfilter(np.concatenate(([1.0], np.asarray(ma, dtype=np.float64))), denom, impulse)


def _default_burnin(phi: np.ndarray, theta: np.ndarray) -> int:
    """Steps for the zero start's influence to fall below 1e-12 of the stationary scale."""
    if phi.size == 0:
        return theta.size
    rho = 1.0 / _min_root_modulus(phi, -1.0)  # largest |eigenvalue| of the AR companion matrix
    if rho <= 0.0:
        return phi.size + theta.size
    # rho**k < 1e-12, plus slack for polynomial factors of repeated roots; capped so near-unit
    # roots do not allocate unbounded memory (pass burnin= explicitly for those).
    return int(min(100_000, math.ceil(math.log(1e-12) / math.log(rho)) + 10 * (phi.size + theta.size) + 100))


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def arma_process(
    ar,
    ma,
    n: int,
    *,
    sigma: float = 1.0,
    const: float = 0.0,
    d: int = 0,
    burnin: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Simulate ``n`` values of an ARMA(p, q) series, or of an ARIMA(p, d, q) series when ``d > 0``.

    Args:
        ar: ``[phi_1, ..., phi_p]`` (sequence, ndarray or tensor; may be empty). Must be stationary.
        ma: ``[theta_1, ..., theta_q]`` (may be empty). Must be invertible.
        n: number of values returned, >= 0.
        sigma: innovation standard deviation, > 0.
        const: the intercept ``c`` of the ARMA equation (the mean is ``c / (1 - sum(ar))``).
        d: integration order; the ARMA series is cumulatively summed ``d`` times (each sum
            starting from 0), so ``d``-times differencing the result gives back the ARMA values
            after the first ``d``.
        burnin: ARMA values simulated and dropped before the returned ones, so that the zero
            start is forgotten. Default: enough for the slowest AR root to decay to 1e-12.
        seed: seed for a fresh ``torch.Generator`` (reproducible draws).
        generator: a ``torch.Generator`` to draw from (give at most one of seed/generator).

    Returns:
        (n,) torch.float64 CPU tensor.

    Raises:
        ValueError: non-stationary ``ar``, non-invertible ``ma``, non-finite entries, bad
            ``n``/``sigma``/``d``/``burnin``, or both ``seed`` and ``generator``.
    """
    phi = check_stationary(ar, "ar")
    theta = check_invertible(ma, "ma")
    n = _check_int(n, "n", 0)
    d = _check_int(d, "d", 0)
    if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (isinstance(const, numbers.Real) and math.isfinite(const)):
        raise ValueError(f"const must be a finite number, got {const!r}")
    burnin = _default_burnin(phi, theta) if burnin is None else _check_int(burnin, "burnin", 0)
    if seed is not None and generator is not None:
        raise ValueError("give at most one of seed and generator")
    if generator is None:
        generator = torch.Generator()
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()

    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    noise = torch.randn(burnin + n, generator=generator, dtype=torch.float64).numpy() * sigma
    # lfilter(b, a) runs a(L) y = b(L) e, i.e. phi(L) y = theta(L) e: the ARMA recursion.
    x = signal.lfilter(np.concatenate(([1.0], theta)), np.concatenate(([1.0], -phi)), noise)[burnin:]
    # Adding the mean (rather than c inside the recursion) starts the level at its stationary value.
    x = x + const / (1.0 - phi.sum())
    for _ in range(d):
        x = np.cumsum(x)
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
