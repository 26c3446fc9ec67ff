"""Ideal in-context estimators of a linear map from k samples, and their mode recovery.

Given k samples X ``(B, k, N_x)`` (rows x_tᵀ) and Y ``(B, k, N_y)`` (rows y_tᵀ = (W x_t + ε_t)ᵀ):

* minimum-norm least squares   Ŵ = Yᵀ (X⁺)ᵀ         (X⁺ the pseudo-inverse; Ŵ = 0 for k = 0)
* ridge                        Ŵ = Yᵀ X (XᵀX + λ I)⁻¹
* Bayes posterior mean         Ŵ = Yᵀ (X C Xᵀ + σ² I)⁺ X C
  under a Gaussian prior on the rows of W with the task prior's second moments,
  C = E[w_i w_iᵀ] = Σ_α s_α² E[v_α v_αᵀ] / N_y, i.e. (Σ s²/(N_x N_y)) I for the ``rotation``
  prior and diag(s², 0…)/N_y for the ``aligned`` prior (see :mod:`~qkdissect.dynamics.incontext.setting`).

Exactness of "Bayes". For the rotation prior without noise the exact posterior mean under the
true (non-Gaussian, fixed-spectrum) prior *is* the minimum-norm estimate: the data fix W on
span(x_1…x_k) = range(P), P = X⁺X, and the reflection R = P − (I − P) leaves both the likelihood
(W R P = W P) and the prior (V → Rᵀ V is again Haar) unchanged while negating W(I − P), so
E[W(I − P) | data] = 0 and E[W | data] = W P. The Gaussian formula above reduces to the same
W P in that case. With noise, or for the aligned prior, the formula is the Gaussian
approximation (exact Bayes under the fixed-spectrum prior has no closed form).

Mode recovery (closed forms). Without noise the min-norm estimate is Ŵ = W P, so
m_α = v_αᵀ P v_α; P is a uniformly random rank-min(k, N_x) projection (x isotropic), hence

    m_α(k) ~ Beta(k/2, (N_x − k)/2),   E[m_α(k)] = min(k, N_x) / N_x   for every α,
    sd[m_α(k)] = √( (k/N_x)(1 − k/N_x) / (N_x/2 + 1) ),

whatever the strengths: all modes are recovered concurrently (:func:`min_norm_recovery`). Noise
adds a zero-mean term (the expectation is unchanged; its variance diverges at k = N_x). Ridge
without noise gives m_α = v_αᵀ XᵀX(XᵀX + λI)⁻¹ v_α, whose expectation is again the same for
every mode (rotation invariance) but has no finite-size closed form: it is estimated by
Monte Carlo (:func:`estimator_recovery`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.incontext.setting import PRIORS, mode_recovery, sample_episode
from qkdissect.dynamics.linear.tasks import LinearTask, Seed, make_generator
from qkdissect.errors import QKDissectError

__all__ = [
    "ESTIMATORS",
    "min_norm_estimate",
    "ridge_estimate",
    "prior_row_covariance",
    "bayes_estimate",
    "min_norm_recovery",
    "min_norm_recovery_sd",
    "EstimatorRecovery",
    "estimator_recovery",
]

#: Names accepted by :func:`estimator_recovery`.
ESTIMATORS = ("min_norm", "ridge", "bayes")


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 3 or y.ndim != 3 or x.shape[:2] != y.shape[:2]:
        raise QKDissectError(
            f"expected X (B, k, N_x) and Y (B, k, N_y) with the same B and k, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}."
        )


def min_norm_estimate(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ŵ = Yᵀ (X⁺)ᵀ, ``(B, N_y, N_x)`` (zero for k = 0)."""
    _check_xy(x, y)
    b, k, n_x = x.shape
    if k == 0:
        return torch.zeros(b, y.shape[-1], n_x, dtype=x.dtype)
    return (torch.linalg.pinv(x) @ y).transpose(-1, -2)


def ridge_estimate(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Ŵ = Yᵀ X (XᵀX + λI)⁻¹, ``(B, N_y, N_x)``; λ > 0."""
    _check_xy(x, y)
    lam = checks.positive(lam, "ridge lambda")
    n_x = x.shape[-1]
    gram = x.transpose(-1, -2) @ x + lam * torch.eye(n_x, dtype=x.dtype)
    return torch.linalg.solve(gram, x.transpose(-1, -2) @ y).transpose(-1, -2)


def prior_row_covariance(
    strengths: Any, n_x: int, n_y: int, prior: str = "rotation", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """C = E[w_i w_iᵀ] ``(N_x, N_x)`` of a row of W under the task prior (module docstring)."""
    s = checks.strengths(strengths)
    if prior == "rotation":
        return torch.eye(n_x, dtype=dtype) * float((s**2).sum()) / (n_x * n_y)
    if prior == "aligned":
        d = torch.zeros(n_x, dtype=dtype)
        d[: s.size] = torch.as_tensor(s**2, dtype=dtype) / n_y
        return torch.diag(d)
    raise QKDissectError(f"prior: expected one of {', '.join(PRIORS)}, got {prior!r}.")


def bayes_estimate(x: torch.Tensor, y: torch.Tensor, covariance: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """Gaussian-prior posterior mean Ŵ = Yᵀ (X C Xᵀ + σ²I)⁺ X C, ``(B, N_y, N_x)``.

    Args:
        covariance: C ``(N_x, N_x)``, the prior covariance of a row of W
            (:func:`prior_row_covariance`).
        noise: σ, the standard deviation of the observation noise (0 = noise-free).
    """
    _check_xy(x, y)
    b, k, n_x = x.shape
    if k == 0:
        return torch.zeros(b, y.shape[-1], n_x, dtype=x.dtype)
    xc = x @ covariance.to(x.dtype)
    kernel = xc @ x.transpose(-1, -2)
    if noise > 0:
        kernel = kernel + noise**2 * torch.eye(k, dtype=x.dtype)
    # rtol: the kernel has exact zero eigenvalues for k > rank(C); round-off must not be inverted
    return (y.transpose(-1, -2) @ torch.linalg.pinv(kernel, hermitian=True, rtol=1e-10)) @ xc


def min_norm_recovery(ks: Any, n_x: int) -> np.ndarray:
    """E[m_α(k)] = min(k, N_x)/N_x of the min-norm estimator (every mode), ``(K,)``."""
    k = np.asarray(ks, dtype=np.float64)
    return np.minimum(k, n_x) / n_x


def min_norm_recovery_sd(ks: Any, n_x: int) -> np.ndarray:
    """Per-task standard deviation of m_α(k) for the noise-free min-norm estimator, ``(K,)``."""
    f = np.clip(np.asarray(ks, dtype=np.float64) / n_x, 0.0, 1.0)
    return np.sqrt(f * (1.0 - f) / (n_x / 2.0 + 1.0))


@dataclass(frozen=True)
class EstimatorRecovery:
    """Monte-Carlo mode recovery of one estimator.

    Attributes:
        name: estimator name; ks: ``(K,)`` numbers of samples;
        mean: ``(K, r)`` mean m_α(k) over tasks; sem: ``(K, r)`` its standard error;
        per_task: ``(K, B, r)`` m_α(k) of every task.
    """

    name: str
    ks: np.ndarray
    mean: np.ndarray
    sem: np.ndarray
    per_task: np.ndarray


def _estimator(name: str, *, ridge: float, covariance: torch.Tensor | None, noise: float) -> Callable:
    if name == "min_norm":
        return min_norm_estimate
    if name == "ridge":
        checks.positive(ridge, "ridge lambda")
        return lambda x, y: ridge_estimate(x, y, ridge)
    if name == "bayes":
        return lambda x, y: bayes_estimate(x, y, covariance, noise)
    raise QKDissectError(f"estimator: expected one of {', '.join(ESTIMATORS)}, got {name!r}.")


def estimator_recovery(
    task: LinearTask,
    ks: Sequence[int],
    estimators: Sequence[str] = ESTIMATORS,
    *,
    ridge: float = 1.0,
    noise: float = 0.0,
    prior: str = "rotation",
    seed: Seed = 0,
) -> dict[str, EstimatorRecovery]:
    """Monte-Carlo m_α(k) of each estimator on the tasks ``task`` (one episode of max(ks) samples each).

    The same samples are used for every estimator and every k (the first k of the episode).
    """
    kk = np.asarray([checks.count(k, "k", minimum=0) for k in ks], dtype=np.int64)
    if kk.size == 0:
        raise QKDissectError("ks: expected at least one number of samples.")
    if noise < 0:
        raise QKDissectError(f"noise: expected a standard deviation >= 0, got {noise!r}.")
    g = make_generator(seed)
    x, y = sample_episode(task, int(kk.max()), noise=noise, generator=g)
    cov = prior_row_covariance(task.strengths[0].numpy(), task.n_in, task.n_out, prior, dtype=x.dtype)
    out: dict[str, EstimatorRecovery] = {}
    for name in estimators:
        fn = _estimator(name, ridge=ridge, covariance=cov, noise=noise)
        per = torch.stack([mode_recovery(task, fn(x[:, :k], y[:, :k])) for k in kk]).numpy()
        b = per.shape[1]
        out[name] = EstimatorRecovery(
            name=name, ks=kk, mean=per.mean(1), sem=per.std(1, ddof=1) / np.sqrt(b) if b > 1 else np.zeros_like(per[:, 0]),
            per_task=per,
        )
    return out
