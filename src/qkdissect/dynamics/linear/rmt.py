"""Random-matrix facts for a low-rank teacher seen through noise (Lampinen & Ganguli 2019).

Normalisation. The training correlation is Σ̂ = W̄ + Z, an ``N_o × N_i`` matrix with
W̄ = Σ_α s̄_α ū_α v̄_αᵀ and Z with i.i.d. entries of variance 1/N_i. The aspect ratio is
A = N_o / N_i and must satisfy 0 < A <= 1 (transpose the problem otherwise). In the limit
N_i, N_o → ∞ at fixed A:

* the singular values of Z fill the Marchenko–Pastur bulk [1 − √A, 1 + √A];
* a teacher mode with s̄ > A^{1/4} produces an outlier
  ŝ(s̄) = √((1 + s̄²)(A + s̄²)) / s̄ above the bulk edge 1 + √A; weaker modes are lost in the bulk;
* the outlier's singular vectors overlap the teacher's:
  (ū·û)² = 1 − A(1 + s̄²) / (s̄²(A + s̄²))   (output side),
  (v̄·v̂)² = 1 − (A + s̄²) / (s̄²(1 + s̄²))   (input side),
  O(s̄) = (ū·û)(v̄·v̂) = the square root of their product, 0 at or below threshold.

These are the rectangular spiked-model results of Benaych-Georges & Nadakuditi (2012); the
optimal singular-value shrinker for Frobenius loss built from them, s̄(ŝ)·O(s̄(ŝ)), is the
Gavish–Donoho (2017) shrinker. All functions are pure numpy and act elementwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from qkdissect.dynamics import checks

__all__ = [
    "marchenko_pastur_edges",
    "marchenko_pastur_density",
    "marchenko_pastur_expectation",
    "marchenko_pastur_nodes",
    "detection_threshold",
    "spike_singular_value",
    "spike_overlaps",
    "spike_overlap",
    "inverse_spike",
    "optimal_shrinkage",
]


def marchenko_pastur_edges(aspect_ratio: float) -> tuple[float, float]:
    """Edges of the noise singular-value bulk: ``(1 − √A, 1 + √A)``."""
    a = checks.aspect_ratio(aspect_ratio)
    return 1.0 - np.sqrt(a), 1.0 + np.sqrt(a)


def marchenko_pastur_density(sigma: Any, aspect_ratio: float) -> np.ndarray:
    """Density of the *singular values* σ of Z (entries of variance 1/N_i, A = N_o/N_i <= 1).

    With λ± = (1 ± √A)², the eigenvalues λ = σ² of Z Zᵀ have density
    ``√((λ₊ − λ)(λ − λ₋)) / (2π A λ)`` on [λ₋, λ₊], so the singular values have density::

        p(σ) = √((λ₊ − σ²)(σ² − λ₋)) / (π A σ),   1 − √A <= σ <= 1 + √A,

    and 0 outside. It integrates to 1 (no atom at 0 because A <= 1).

    Args:
        sigma: singular values, any shape.
    Returns:
        array with the shape of ``sigma``.
    """
    a = checks.aspect_ratio(aspect_ratio)
    x = np.asarray(sigma, dtype=np.float64)
    lo, hi = (1.0 - np.sqrt(a)) ** 2, (1.0 + np.sqrt(a)) ** 2
    lam = x * x
    inside = (lam > lo) & (lam < hi) & (x > 0)
    out = np.zeros_like(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.sqrt(np.clip((hi - lam) * (lam - lo), 0.0, None)) / (np.pi * a * x)
    out[inside] = val[inside]
    return out


def marchenko_pastur_expectation(
    fn: Callable[[np.ndarray], np.ndarray], aspect_ratio: float, n_nodes: int = 256
) -> np.ndarray:
    """``∫ p(σ) fn(σ) dσ`` over the Marchenko–Pastur singular-value density.

    Uses λ = σ² = λ₋ + (λ₊ − λ₋)(1 − cos θ)/2, which turns the square-root edges into a smooth
    integrand in θ ∈ (0, π), and Gauss–Legendre quadrature with ``n_nodes`` nodes. ``fn`` maps a
    ``(n_nodes,)`` array of σ to ``(n_nodes, ...)``; the result has shape ``(...)``.
    """
    sig, w = marchenko_pastur_nodes(checks.aspect_ratio(aspect_ratio), n_nodes)
    vals = np.asarray(fn(sig), dtype=np.float64)
    return np.tensordot(w, vals, axes=(0, 0))


def marchenko_pastur_nodes(a: float, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes σ ``(n_nodes,)`` and weights w ``(n_nodes,)`` with Σ w f(σ) ≈ ∫ p_MP(σ) f(σ) dσ.

    A = ``a`` (not checked here); λ = σ² = λ₋ + (λ₊ − λ₋)(1 − cos θ)/2 with Gauss–Legendre nodes in
    θ ∈ (0, π); the weights are normalised so that Σ w = 1 exactly.
    """
    x, wx = _leggauss(n_nodes)
    theta = 0.5 * np.pi * (x + 1.0)
    lo, hi = (1.0 - np.sqrt(a)) ** 2, (1.0 + np.sqrt(a)) ** 2
    half = 0.5 * (hi - lo)
    lam = lo + half * (1.0 - np.cos(theta))
    # p(λ) dλ = half² sin²θ / (2π A λ) dθ
    w = 0.5 * np.pi * wx * half**2 * np.sin(theta) ** 2 / (2.0 * np.pi * a * lam)
    w = w / w.sum()  # exact normalisation (quadrature error ~1e-15 for these n_nodes)
    return np.sqrt(lam), w


def detection_threshold(aspect_ratio: float) -> float:
    """Teacher strength at which a mode separates from the bulk: ``s̄_c = A^{1/4}``."""
    return float(checks.aspect_ratio(aspect_ratio) ** 0.25)


def spike_singular_value(s_bar: Any, aspect_ratio: float) -> np.ndarray:
    """Limit of the empirical singular value produced by a teacher mode of strength s̄.

    ``ŝ = √((1 + s̄²)(A + s̄²)) / s̄`` for s̄ > A^{1/4}; otherwise the mode is lost and the top
    of the spectrum sits at the bulk edge 1 + √A (returned for those entries).
    """
    a = checks.aspect_ratio(aspect_ratio)
    s = checks.strengths(s_bar, "s_bar", allow_zero=True)
    out = np.full_like(s, 1.0 + np.sqrt(a))
    above = s > a**0.25
    sa = s[above]
    out[above] = np.sqrt((1.0 + sa**2) * (a + sa**2)) / sa
    return _like(out, s_bar)


def spike_overlaps(s_bar: Any, aspect_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Squared-root overlaps ``(|ū·û|, |v̄·v̂|)`` of an outlier's singular vectors with the teacher's.

    ``|ū·û|² = 1 − A(1 + s̄²)/(s̄²(A + s̄²))`` (output side, dimension N_o) and
    ``|v̄·v̂|² = 1 − (A + s̄²)/(s̄²(1 + s̄²))`` (input side, dimension N_i), for s̄ > A^{1/4};
    both 0 at or below threshold.
    """
    a = checks.aspect_ratio(aspect_ratio)
    s = checks.strengths(s_bar, "s_bar", allow_zero=True)
    ou = np.zeros_like(s)
    ov = np.zeros_like(s)
    above = s > a**0.25
    s2 = s[above] ** 2
    ou[above] = np.sqrt(np.clip(1.0 - a * (1.0 + s2) / (s2 * (a + s2)), 0.0, None))
    ov[above] = np.sqrt(np.clip(1.0 - (a + s2) / (s2 * (1.0 + s2)), 0.0, None))
    return _like(ou, s_bar), _like(ov, s_bar)


def spike_overlap(s_bar: Any, aspect_ratio: float) -> np.ndarray:
    """``O(s̄) = (ū·û)(v̄·v̂)``, the product of the two overlaps (see :func:`spike_overlaps`).

    ``O = √{[1 − A(1 + s̄²)/(s̄²(A + s̄²))]·[1 − (A + s̄²)/(s̄²(1 + s̄²))]}`` above threshold, else 0.
    """
    ou, ov = spike_overlaps(s_bar, aspect_ratio)
    return ou * ov


def inverse_spike(s_hat: Any, aspect_ratio: float) -> np.ndarray:
    """Invert ŝ(s̄): the teacher strength that produces an empirical singular value ŝ.

    Solving ŝ² s̄² = (1 + s̄²)(A + s̄²) for the root above threshold::

        s̄² = [(ŝ² − 1 − A) + √((ŝ² − 1 − A)² − 4A)] / 2,    ŝ > 1 + √A,

    and 0 at or below the bulk edge ŝ <= 1 + √A (no detectable teacher mode).
    """
    a = checks.aspect_ratio(aspect_ratio)
    y = checks.strengths(s_hat, "s_hat", allow_zero=True)
    out = np.zeros_like(y)
    above = y > 1.0 + np.sqrt(a)
    b = y[above] ** 2 - 1.0 - a
    out[above] = np.sqrt(0.5 * (b + np.sqrt(np.clip(b * b - 4.0 * a, 0.0, None))))
    return _like(out, s_hat)


def optimal_shrinkage(s_hat: Any, aspect_ratio: float) -> np.ndarray:
    """The non-gradient estimator's singular values: ``η(ŝ) = s̄(ŝ) · O(s̄(ŝ))``, 0 at/below the edge.

    Keeping the empirical singular vectors and replacing each ŝ by η(ŝ) minimises the
    asymptotic Frobenius (test) error. It equals Gavish & Donoho's closed form
    ``η(ŝ) = √((ŝ² − A − 1)² − 4A) / ŝ`` for ŝ > 1 + √A (checked in the tests).
    """
    sb = np.atleast_1d(inverse_spike(s_hat, aspect_ratio))
    out = np.zeros_like(sb)
    pos = sb > 0
    if np.any(pos):
        out[pos] = sb[pos] * np.atleast_1d(spike_overlap(sb[pos], aspect_ratio))
    return _like(out, s_hat)


# ----------------------------------------------------------------------------- internals


def _like(out: np.ndarray, ref: Any) -> np.ndarray:
    """Return a 0-d array for scalar input, the 1-D array otherwise."""
    return out.reshape(()) if np.ndim(ref) == 0 else out.reshape(np.shape(ref))


@functools.lru_cache(maxsize=8)
def _leggauss(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.legendre.leggauss(n)
    x.setflags(write=False)
    w.setflags(write=False)
    return x, w
