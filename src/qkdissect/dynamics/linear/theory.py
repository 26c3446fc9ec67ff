"""Exact learning dynamics of deep linear networks from decoupled initial conditions (Saxe et al. 2014).

Setting and normalisation. Whitened inputs (Σ_xx = I), input-output correlation
Σ_yx = Σ_α s_α u_α v_αᵀ, a network W = W_N ⋯ W_1 of N weight matrices, trained by full-batch
gradient descent on

    L(W_1, …, W_N) = ½ ‖Σ_yx − W_N ⋯ W_1‖²_F      (whitened inputs; up to a constant)

with learning rate ``lr``. Time is counted in epochs (= gradient steps, full batch), and the
gradient-flow time constant is τ = 1/lr. From "decoupled" (aligned, balanced) initial conditions
each mode keeps its singular vectors and its strength a_α(t) = u_αᵀ W(t) v_α obeys

    τ da/dt = N · a^{2 − 2/N} · (s − a),        a(0) = a₀ (the strength of the *product*).

All functions here are pure numpy/scipy. Shapes: ``strengths`` is ``(M,)`` (one value per mode),
``a0`` a scalar or ``(M,)``, ``t`` is ``(T,)`` epochs; curves are returned as ``(T, M)``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from scipy import integrate

from qkdissect.dynamics import checks

__all__ = [
    "saxe_depth2",
    "mode_strength",
    "half_time",
    "time_to_fraction",
    "discrete_mode_strength",
    "mode_strength_function",
]


def saxe_depth2(strengths: Any, a0: Any, t: Any, tau: float = 1000.0) -> np.ndarray:
    """Closed-form mode strengths of a two-layer (N = 2) linear network.

    Formula::

        a(t) = s / (1 + (s/a₀ − 1) · exp(−2 s t / τ))

    Args:
        strengths: target singular values s, shape ``(M,)``, all > 0.
        a0: initial strength of the product per mode, scalar or ``(M,)``, 0 < a₀ < s.
        t: times in epochs, shape ``(T,)``, >= 0.
        tau: time constant τ = 1/learning-rate (epochs).

    Returns:
        ``(T, M)`` array of a_α(t).
    """
    s = checks.strengths(strengths)
    a = checks.initial_strength(a0, s)
    tt = checks.times(t)
    tau = checks.positive(tau, "tau")
    return _closed_form(s, a, tt, 2, tau)


def mode_strength(
    strengths: Any,
    a0: Any,
    t: Any,
    depth: int = 2,
    tau: float = 1000.0,
    *,
    rtol: float = 1e-10,
) -> np.ndarray:
    """Mode strengths a_α(t) of a depth-N linear network from decoupled initial conditions.

    Solves ``τ da/dt = N a^{2−2/N} (s − a)``, a(0) = a₀. Closed forms are used for N = 1
    (a = s − (s − a₀) e^{−t/τ}) and N = 2 (see :func:`saxe_depth2`); for N >= 3 the ODE is
    integrated numerically (scipy DOP853 in the variable ln a, relative tolerance ``rtol``).

    Args:
        strengths: target singular values s, ``(M,)``, > 0.
        a0: initial product strength, scalar or ``(M,)``, 0 < a₀ < s.
        t: times in epochs ``(T,)``, >= 0 (any order).
        depth: number of weight matrices N >= 1.
        tau: τ = 1/lr in epochs.

    Returns:
        ``(T, M)`` array.
    """
    s = checks.strengths(strengths)
    a = checks.initial_strength(a0, s)
    tt = checks.times(t)
    n = checks.depth(depth)
    tau = checks.positive(tau, "tau")
    return _mode_strength_unchecked(s, a, tt, n, tau, rtol=rtol)


def half_time(strengths: Any, a0: Any, depth: int = 2, tau: float = 1000.0) -> np.ndarray:
    """Time (epochs) at which each mode reaches half its target strength, a(t½) = s/2.

    Exact for every depth::

        t½ = τ ∫_{a₀}^{s/2} da / (N a^{2−2/N} (s − a))

    which for N = 2 is ``t½ = (τ / 2s) · ln(s/a₀ − 1)`` and for N = 1 is
    ``t½ = τ · ln(2 (s − a₀)/s)``; for N >= 3 the integral is evaluated by adaptive quadrature.
    Negative if a₀ > s/2 (the mode starts above half strength).

    Returns:
        ``(M,)`` array.
    """
    return time_to_fraction(strengths, a0, 0.5, depth=depth, tau=tau)


def time_to_fraction(
    strengths: Any, a0: Any, fraction: float, depth: int = 2, tau: float = 1000.0
) -> np.ndarray:
    """Time (epochs) at which each mode reaches ``fraction · s`` (0 < fraction < 1).

    ``t_f = τ ∫_{a₀}^{f s} da / (N a^{2−2/N} (s − a))``; for N = 2 this is
    ``(τ/2s) · ln[(f/(1−f)) · (s − a₀)/a₀]``, for N = 1 ``τ · ln[(s − a₀)/((1 − f) s)]``.

    Returns:
        ``(M,)`` array (negative where a₀ > f·s).
    """
    s = checks.strengths(strengths)
    a = checks.initial_strength(a0, s)
    f = checks.fraction(fraction)
    n = checks.depth(depth)
    tau = checks.positive(tau, "tau")
    if n == 1:
        return tau * np.log((s - a) / ((1.0 - f) * s))
    if n == 2:
        return tau / (2.0 * s) * np.log((f / (1.0 - f)) * (s - a) / a)
    out = np.empty_like(s)
    for i, (si, ai) in enumerate(zip(s, a)):
        # substitute a = e^u: dt = τ a^{2/N − 1} / (N (s − a)) du
        def integrand(u: float, si: float = si) -> float:
            x = np.exp(u)
            return x ** (2.0 / n - 1.0) / (n * (si - x))

        val, _ = integrate.quad(
            integrand, np.log(ai), np.log(f * si), epsabs=0.0, epsrel=1e-12, limit=400
        )
        out[i] = tau * val
    return out


def discrete_mode_strength(
    strengths: Any, a0: Any, n_steps: int, depth: int = 2, lr: float = 1e-3
) -> np.ndarray:
    """Mode strengths under *discrete* full-batch gradient descent from balanced decoupled init.

    With every layer aligned to the modes and balanced, each layer carries the per-mode scalar
    b = a^{1/N} and gradient descent on ½‖Σ_yx − W‖²_F is exactly the scalar recursion::

        b_{k+1} = b_k + lr · b_k^{N−1} (s − b_k^N),    a_k = b_k^N,    b_0 = a₀^{1/N}

    This is what a full-matrix simulation must reproduce to rounding error; its difference from
    :func:`mode_strength` (gradient flow, t = k) is the discretisation error of the step size.

    Returns:
        ``(n_steps + 1, M)`` array, row k = strength after k steps.
    """
    s = checks.strengths(strengths)
    a = checks.initial_strength(a0, s)
    n = checks.depth(depth)
    lr = checks.positive(lr, "lr")
    steps = checks.count(n_steps, "n_steps", minimum=0)
    out = np.empty((steps + 1, s.size))
    b = a ** (1.0 / n)
    out[0] = a
    for k in range(steps):
        b = b + lr * b ** (n - 1) * (s - b**n)
        out[k + 1] = b**n
    return out


def mode_strength_function(
    s: np.ndarray, a0: np.ndarray, n: int, tau: float, t_end: float, *, rtol: float = 1e-10
) -> Callable[[np.ndarray], np.ndarray]:
    """``f(t) -> (T, M)`` strengths a(t) for any 0 <= t <= t_end, from one ODE solve (dense output).

    Solves ``τ da/dt = N a^{2−2/N} (s − a)``, a(0) = a₀ *without parameter checks*: s >= 0 and a₀ > 0
    arbitrary (a₀ > s gives a decaying mode), shapes ``(M,)``.

    Closed forms for N <= 2; for N >= 3 the DOP853 solution's 7th-order interpolant, so repeated
    evaluations (e.g. minimising an error curve over t) cost no further integration.
    """
    s = np.asarray(s, dtype=np.float64)
    a0 = np.broadcast_to(np.asarray(a0, dtype=np.float64), s.shape).copy()
    if n <= 2:
        return lambda t: _closed_form(s, a0, np.atleast_1d(np.asarray(t, dtype=np.float64)), n, tau)
    sol = _integrate(s, a0, n, tau, max(float(t_end), 1e-12), rtol=rtol)
    return lambda t: np.exp(sol.sol(np.atleast_1d(np.asarray(t, dtype=np.float64))).T)


# ----------------------------------------------------------------------------- internals


def _closed_form(s: np.ndarray, a0: np.ndarray, t: np.ndarray, n: int, tau: float) -> np.ndarray:
    tt = t[:, None]
    if n == 1:
        return s - (s - a0) * np.exp(-tt / tau)
    # N = 2: logistic; also valid for s < a0 (decaying curve). s -> 0 limit handled explicitly.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        out = s / (1.0 + (s / a0 - 1.0) * np.exp(-2.0 * s * tt / tau))
    tiny = s < 1e-300
    if np.any(tiny):
        out[:, tiny] = a0[tiny] / (1.0 + 2.0 * a0[tiny] * tt / tau)
    return out


def _mode_strength_unchecked(
    s: np.ndarray, a0: np.ndarray, t: np.ndarray, n: int, tau: float, *, rtol: float = 1e-10
) -> np.ndarray:
    """Same as :func:`mode_strength` without parameter checks; s >= 0 and a0 > 0 arbitrary."""
    s = np.asarray(s, dtype=np.float64)
    a0 = np.broadcast_to(np.asarray(a0, dtype=np.float64), s.shape).copy()
    t = np.asarray(t, dtype=np.float64)
    if n <= 2:
        return _closed_form(s, a0, t, n, tau)
    order = np.argsort(t)
    ts = t[order]
    t_end = float(ts[-1]) if ts.size else 0.0
    if t_end == 0.0:
        return np.broadcast_to(a0, (t.size, s.size)).copy()
    sol = _integrate(s, a0, n, tau, t_end, rtol=rtol, t_eval=ts)
    out = np.empty((t.size, s.size))
    out[order] = np.exp(sol.y.T)
    return out


def _integrate(
    s: np.ndarray, a0: np.ndarray, n: int, tau: float, t_end: float, *, rtol: float, t_eval: np.ndarray | None = None
) -> Any:
    """DOP853 solution of the mode ODE in the variable u = ln a, du/dt = N a^{1−2/N} (s − a)/τ, on [0, t_end].

    Returns scipy's solution at ``t_eval``, or with a dense interpolant (``.sol``) when ``t_eval`` is None.
    """
    expo = 1.0 - 2.0 / n

    def rhs(_t: float, u: np.ndarray) -> np.ndarray:
        x = np.exp(u)
        return n * x**expo * (s - x) / tau

    sol = integrate.solve_ivp(rhs, (0.0, t_end), np.log(a0), method="DOP853", t_eval=t_eval,
                              dense_output=t_eval is None, rtol=rtol, atol=1e-12)
    if not sol.success:  # pragma: no cover - DOP853 on this smooth ODE does not fail in practice
        raise RuntimeError(f"ODE integration failed: {sol.message}")
    return sol
