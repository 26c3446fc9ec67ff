"""The in-context regression setting shared by learners, meta-learners and in-context transformers.

Task family: y = W x (+ ε), W = U diag(s) Vᵀ with a fixed spectrum s (r = len(s)
modes), x ~ N(0, I_{N_x}), ε ~ N(0, σ² I_{N_y}). Two priors over (U, V):

* ``rotation`` — U (N_y × r) and V (N_x × r) Haar-random per task (:func:`make_linear_task`);
  the prior is invariant under rotations of input and output space, so no direction of the
  token space is privileged. This is the distribution every system is compared on.
* ``aligned`` — V = the first r coordinate axes of the input space (the same for every task),
  U Haar-random per task: mode α always reads input coordinate α with strength s_α, but what it
  writes is unknown until seen in context. Here a model's *weights* can tie the prior's strengths
  to fixed directions (are such directions learned one by one by a transformer's weights?).

Mode recovery of an estimate Ŵ (after k samples, or after t learning steps) of a task:

    m_α = u_αᵀ Ŵ v_α / s_α            (1 = mode fully recovered, 0 = absent)

Half-recovery point of mode α: the first k (or t) where the task-mean m_α reaches 0.5 (linear
interpolation between records). Concurrency index of a system: the coefficient of variation of
the modes' half-recovery points, std_α(k½_α) / mean_α(k½_α) — 0 when every mode is recovered at
the same moment, larger the more staggered; it does not depend on the unit of k or t, so a
learner (SGD steps) and an in-context estimator (samples) can be compared by it.

Probing a black-box in-context learner f (a meta-learner, a transformer) after k samples: queries
±c·e_i read out its linear map and random queries x ~ N(0, I) test how linear it is,

    Ŵ_k[:, i] = (f(+c e_i) − f(−c e_i)) / (2c),     R² of f(x) ≈ f(0) + Ŵ_k x

(:func:`probe_queries`, :func:`linear_readout`); the difference removes the part of f that is even
in the query, such as its value at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import coefficient_of_variation, first_crossing
from qkdissect.dynamics.linear.tasks import LinearTask, Seed, make_linear_task
from qkdissect.errors import QKDissectError

__all__ = [
    "PRIORS",
    "make_prior_tasks",
    "sample_episode",
    "mode_recovery",
    "Concurrency",
    "half_recovery_points",
    "concurrency",
    "task_subset",
    "probe_queries",
    "linear_readout",
]

PRIORS = ("rotation", "aligned")


def make_prior_tasks(
    strengths: Any,
    n_x: int,
    n_y: int,
    *,
    prior: str = "rotation",
    n_tasks: int = 1,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
) -> LinearTask:
    """``n_tasks`` tasks W = U diag(s) Vᵀ from the ``rotation`` or ``aligned`` prior (module docstring).

    Returns a :class:`LinearTask` with U ``(B, n_y, r)``, strengths ``(B, r)``, V ``(B, n_x, r)``.
    """
    if prior not in PRIORS:
        raise QKDissectError(f"prior: expected one of {', '.join(PRIORS)}, got {prior!r}.")
    if prior == "aligned":
        checks.strengths(strengths)  # positive: m_α divides by s_α
    task = make_linear_task(strengths, n_x, n_y, n_tasks=n_tasks, seed=seed, dtype=dtype)
    if prior == "rotation":
        return task
    # aligned: keep the Haar U (drawn first, so the same as a U-only draw), V = the first r input axes
    v = torch.eye(task.n_in, task.rank, dtype=dtype).expand(task.n_tasks, -1, -1).clone()
    return LinearTask(U=task.U, strengths=task.strengths, V=v)


def task_subset(task: LinearTask, index: torch.Tensor | slice) -> LinearTask:
    """The tasks ``index`` of a batch (a slice or an index tensor)."""
    return LinearTask(U=task.U[index], strengths=task.strengths[index], V=task.V[index])


def sample_episode(
    task: LinearTask, n_samples: int, *, noise: float = 0.0, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x ~ N(0, I) and targets y = W x + ε for every task: ``(B, n_samples, n_x)``, ``(B, n_samples, n_y)``."""
    dtype = task.U.dtype
    x = torch.randn(task.n_tasks, n_samples, task.n_in, generator=generator, dtype=dtype)
    y = x @ task.matrix.transpose(-1, -2)
    if noise > 0:
        y = y + noise * torch.randn(y.shape, generator=generator, dtype=dtype)
    return x, y


def mode_recovery(task: LinearTask, W_hat: torch.Tensor) -> torch.Tensor:
    """m_α = u_αᵀ Ŵ v_α / s_α for estimates ``W_hat`` ``(..., B, n_y, n_x)`` of the tasks -> ``(..., B, r)``."""
    return task.mode_strengths(W_hat.to(task.U.dtype)) / task.strengths


def probe_queries(random_queries: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries ``[+c e_1 … +c e_{N_x}, −c e_1 … −c e_{N_x}, 0, random…]``: ``(..., 2 N_x + 1 + R, N_x)``.

    Args:
        random_queries: ``(..., R, N_x)`` (their dtype is the result's).
        scale: c > 0.
    """
    n_x = random_queries.shape[-1]
    eye = torch.eye(n_x, dtype=random_queries.dtype) * scale
    basis = torch.cat([eye, -eye, torch.zeros(1, n_x, dtype=random_queries.dtype)])
    return torch.cat([basis.expand(*random_queries.shape[:-2], -1, -1), random_queries], dim=-2)


def linear_readout(
    outputs: torch.Tensor, random_queries: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ŵ and R² from a learner's outputs on :func:`probe_queries` (module docstring); float64.

    Args:
        outputs: ``(..., B, 2 N_x + 1 + R, N_y)`` f at the probe queries of B tasks.
        random_queries: ``(..., B, R, N_x)`` the random queries among them.
        scale: c.
    Returns:
        Ŵ ``(..., B, N_y, N_x)`` and R² ``(...)`` over the B tasks' random queries (NaN if they
        all give the same output).
    """
    n_x = random_queries.shape[-1]
    f = outputs.double()
    w = ((f[..., :n_x, :] - f[..., n_x : 2 * n_x, :]) / (2 * scale)).transpose(-1, -2)
    pred = f[..., 2 * n_x, None, :] + random_queries.double() @ w.transpose(-1, -2)
    fr = f[..., 2 * n_x + 1 :, :]
    ss_res = ((fr - pred) ** 2).sum((-3, -2, -1))
    ss_tot = ((fr - fr.mean(-2, keepdim=True)) ** 2).sum((-3, -2, -1))
    r2 = torch.where(ss_tot > 0, 1 - ss_res / ss_tot.clamp_min(1e-300), torch.nan)
    return w, r2


@dataclass(frozen=True)
class Concurrency:
    """How concurrently a system recovers the modes.

    Attributes:
        index: std/mean of the half-recovery points over modes (0 = all at once). When some mode
            never reaches the level, its point is set to the last record (a censored estimate,
            ``censored`` is True); NaN when no mode reaches it.
        half_points: ``(r,)`` half-recovery point per mode (NaN = not reached).
        censored: True if some mode did not reach the level.
        level: the recovery level used (0.5 of the true strength by default).
        relative_index: the same statistic with each mode's level = 0.5 × its own final recovery
            (shape only: insensitive to modes that plateau below 1); NaN if a final value is <= 0.
        relative_half_points: ``(r,)`` the points for ``relative_index``.
        order_matches_strengths: True when the half points never decrease as the strength
            decreases (the staggered order of Saxe et al.; ties allowed); None when some mode was not
            reached.
    """

    index: float
    half_points: np.ndarray
    censored: bool
    level: float
    relative_index: float
    relative_half_points: np.ndarray
    order_matches_strengths: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "half_points": self.half_points, "censored": self.censored,
            "level": self.level, "relative_index": self.relative_index,
            "relative_half_points": self.relative_half_points,
            "order_matches_strengths": self.order_matches_strengths,
        }


def half_recovery_points(steps: Any, recovery: Any, level: Any = 0.5) -> np.ndarray:
    """First step at which each mode's mean recovery reaches ``level``.

    Args:
        steps: ``(T,)`` increasing k (samples) or t (learning steps).
        recovery: ``(T, r)`` mean m_α over tasks at those steps.
        level: scalar or ``(r,)``.
    Returns:
        ``(r,)`` (NaN where never reached; linear interpolation between records).
    """
    st = np.asarray(steps, dtype=np.float64)
    m = np.asarray(recovery, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != st.size:
        raise QKDissectError(
            f"recovery: expected shape (len(steps), modes) = ({st.size}, r), got {m.shape}."
        )
    return first_crossing(m, np.asarray(level, dtype=np.float64), st)


def concurrency(
    steps: Any, recovery: Any, strengths: Sequence[float], *, level: float = 0.5
) -> Concurrency:
    """Concurrency index of mean recovery curves ``(T, r)`` recorded at ``steps`` (module docstring)."""
    st = np.asarray(steps, dtype=np.float64)
    m = np.asarray(recovery, dtype=np.float64)
    s = np.asarray(strengths, dtype=np.float64)
    pts = half_recovery_points(st, m, level)
    censored = bool(np.isnan(pts).any())
    filled = np.where(np.isnan(pts), st[-1], pts)
    final = m[-1]
    if np.all(final > 0):
        rel_pts = half_recovery_points(st, m, 0.5 * final)
        rel = coefficient_of_variation(rel_pts)
    else:
        rel_pts, rel = np.full(s.size, np.nan), float("nan")
    order = None
    if not censored:
        by_strength = pts[np.argsort(-s, kind="stable")]
        order = bool(np.all(np.diff(by_strength) >= 0))
    index = coefficient_of_variation(filled) if not np.isnan(pts).all() else float("nan")
    return Concurrency(
        index=index, half_points=pts, censored=censored, level=float(level),
        relative_index=rel, relative_half_points=rel_pts, order_matches_strengths=order,
    )
