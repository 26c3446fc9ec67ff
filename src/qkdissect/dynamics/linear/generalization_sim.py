"""Simulated students of a noisy low-rank teacher: gradient descent, early stopping, shrinkage, finite size.

Data (as in :mod:`qkdissect.dynamics.linear.generalization`). The training set, P = N_i orthonormal
inputs with outputs y = W̄x + noise, gives the student the correlation Σ̂ = W̄ + Z, Z_ij ~ N(0, 1/N_i).
A *validation set drawn like the training set* gives Σ̂_val = W̄ + Z_val with an independent Z_val.
For orthonormal validation inputs X_val the squared error of a student W on it is
‖Y_val − W X_val‖²_F = ‖Σ̂_val − W‖²_F + const, so the learner's validation loss is

    L_val(W) = ‖Σ̂_val − W‖²_F / ‖Σ̂_val‖²_F          (:func:`validation_loss`)

Early stopping on it: each student stops at the step where its own L_val is smallest
(:func:`validation_stopping_index`). Both functions see only the student and the validation data —
never the teacher — so the chosen time is one a practitioner could choose. Its test error
‖W̄ − W(t_val)‖²_F / ‖W̄‖²_F is evaluated afterwards. The *oracle* t* (the minimum of the seed-mean test
curve, which needs the teacher) and each seed's own test minimum are reported separately.

Two ways to run gradient descent (``method``):

* ``matrices`` — the full weight matrices, any initialisation (:func:`~.simulate.gradient_descent`);
* ``modes`` — from decoupled init the student stays in Σ̂'s singular basis, W(t) = Σ_k a_k(t) û_k v̂_kᵀ,
  and the per-layer strength b_k = a_k^{1/N} follows the exact recursion
  b ← b + lr · b^{N−1} (ŝ_k − b^N) (:func:`~.theory.discrete_mode_strength`): the same numbers as
  ``matrices`` to rounding error, at O(N_o) instead of O(N_o N_i h) per step, so N in the thousands is
  cheap (the SVD of Σ̂ dominates).

:func:`finite_size_trend` uses ``modes`` to follow GD at validation t*, GD at the oracle t* and the
shrinkage estimator as N grows at fixed aspect ratio, against the large-N theory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import curve_minimum
from qkdissect.dynamics.linear import rmt
from qkdissect.dynamics.linear.generalization import generalization_theory
from qkdissect.dynamics.linear.simulate import INIT_KINDS, gradient_descent, init_weights
from qkdissect.dynamics.linear.tasks import make_generator, make_noisy_teacher
from qkdissect.dynamics.linear.theory import time_to_fraction
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, report, throttled

__all__ = [
    "SIMULATION_METHODS",
    "validation_loss",
    "validation_loss_from_modes",
    "validation_stopping_index",
    "GeneralizationSimulation",
    "simulate_generalization",
    "ShrinkageComparison",
    "shrinkage_sweep",
    "FiniteSizeTrend",
    "finite_size_trend",
]

SIMULATION_METHODS = ("matrices", "modes")


def validation_loss(product: torch.Tensor, sigma_validation: torch.Tensor) -> torch.Tensor:
    """L_val = ‖Σ̂_val − W‖²_F / ‖Σ̂_val‖²_F of students ``product`` ``(..., B, N_o, N_i)`` → ``(..., B)``.

    ``sigma_validation`` ``(B, N_o, N_i)``: the validation set's correlation Σ̂_val = Y_val X_valᵀ.
    """
    norm = (sigma_validation**2).sum((-1, -2))
    return ((product - sigma_validation) ** 2).sum((-1, -2)) / norm


def validation_loss_from_modes(
    strengths: torch.Tensor, projections: torch.Tensor, validation_norm: torch.Tensor
) -> torch.Tensor:
    """:func:`validation_loss` of students W = Σ_k a_k û_k v̂_kᵀ, from their strengths alone.

    L_val = (‖Σ̂_val‖² − 2 Σ_k a_k c_k + Σ_k a_k²) / ‖Σ̂_val‖², with c_k = û_kᵀ Σ̂_val v̂_k.

    Args:
        strengths: a ``(T, B, K)``; projections: c ``(B, K)``; validation_norm: ‖Σ̂_val‖²_F ``(B,)``.
    Returns:
        ``(T, B)``.
    """
    return (validation_norm - 2.0 * (strengths * projections).sum(-1) + (strengths**2).sum(-1)) / validation_norm


def validation_stopping_index(validation_curves: np.ndarray) -> np.ndarray:
    """For each student, the record with the smallest validation loss (the first if tied).

    Args:
        validation_curves: ``(T, B)`` L_val over the records of B students.
    Returns:
        ``(B,)`` record indices.
    """
    curves = np.asarray(validation_curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[0] == 0:
        raise QKDissectError(f"validation_curves: expected shape (records, students), got {curves.shape}.")
    return np.argmin(np.where(np.isnan(curves), np.inf, curves), axis=0)


@dataclass(frozen=True)
class GeneralizationSimulation:
    """Train/test errors of students trained by gradient descent on Σ̂ = W̄ + Z, one per seed.

    Attributes:
        steps: ``(T,)`` epochs.
        train_error, test_error: ``(T, n_seeds)`` (definitions in the generalization module).
        validation_loss: ``(T, n_seeds)`` L_val (module docstring).
        t_validation: ``(n_seeds,)`` each student's validation-chosen stopping step;
        test_error_at_validation: ``(n_seeds,)`` its test error there.
        s_hat: ``(n_seeds, N_o)`` empirical singular values of Σ̂, descending.
        overlap: ``(n_seeds, r)`` (ū_α·û_α)(v̄_α·v̂_α) of teacher mode α with empirical mode α.
        oracle_strength: ``(n_seeds, N_o)`` û_βᵀ W̄ v̂_β, the best value for each empirical mode.
        shrinkage_test_error: ``(n_seeds,)`` test error of the optimal shrinkage estimator.
        t_opt: argmin of the seed-mean test curve (the oracle t*, parabolic refinement); test_error_opt:
            its value. test_error_at_t_opt: ``(n_seeds,)`` each seed's test error at the record nearest t_opt.
        best_test_error: ``(n_seeds,)`` each seed's own minimum over time (per-seed oracle).
    """

    steps: np.ndarray
    train_error: np.ndarray
    test_error: np.ndarray
    validation_loss: np.ndarray
    t_validation: np.ndarray
    test_error_at_validation: np.ndarray
    s_hat: np.ndarray
    overlap: np.ndarray
    oracle_strength: np.ndarray
    shrinkage_test_error: np.ndarray
    t_opt: float
    test_error_opt: float
    test_error_at_t_opt: np.ndarray
    best_test_error: np.ndarray
    s_bar: np.ndarray
    n_in: int
    n_out: int
    depth: int
    a0: float
    lr: float
    init: str
    hidden: int
    n_seeds: int
    seed: int
    method: str


def _validation_generator(seed: int) -> torch.Generator:
    """The validation noise's own generator: the training run's random draws do not depend on it."""
    return make_generator(int(np.random.default_rng([int(seed), 1]).integers(2**62)))


def _run_modes(s_hat: torch.Tensor, oracle: torch.Tensor, projections: torch.Tensor, validation_norm: torch.Tensor,
               norm: float, *, a0: float, lr: float, depth: int, n_steps: int, record_every: int,
               progress: ProgressFn | None) -> tuple[np.ndarray, torch.Tensor]:
    """Exact GD from decoupled init in Σ̂'s singular basis; (steps, (T, B, 3) train / test / validation)."""
    b = torch.full_like(s_hat, a0 ** (1.0 / depth))
    tick = throttled(progress, "gradient descent", n_steps)
    steps, records = [], []
    for k in range(n_steps + 1):
        if k % record_every == 0 or k == n_steps:
            a = b**depth
            train = ((s_hat - a) ** 2).sum(-1) / norm
            test = 1.0 - (2.0 * (a * oracle).sum(-1) - (a**2).sum(-1)) / norm
            val = validation_loss_from_modes(a[None], projections, validation_norm)[0]
            steps.append(k)
            records.append(torch.stack([train, test, val], -1))
        if k == n_steps:
            break
        b = b + lr * b ** (depth - 1) * (s_hat - b**depth)
        tick(k + 1)
    return np.asarray(steps, dtype=np.int64), torch.stack(records)


def simulate_generalization(
    strengths: Any,
    n_in: int,
    n_out: int,
    *,
    n_seeds: int = 10,
    depth: int = 2,
    a0: float = 1e-5,
    lr: float = 1e-2,
    n_steps: int | None = None,
    init: str = "decoupled",
    hidden: int | None = None,
    seed: int = 0,
    record_every: int = 1,
    method: str = "matrices",
    progress: ProgressFn | None = None,
) -> GeneralizationSimulation:
    """Simulate ``n_seeds`` teacher/noise draws and train one student on each (batched).

    ``init='decoupled'`` aligns the student to the SVD of its Σ̂ with product strength a₀ on all
    N_o empirical modes (the theory's assumption); ``init='random'`` uses small random weights
    (see :func:`qkdissect.dynamics.linear.simulate.init_weights`); ``method='modes'`` needs decoupled
    init (module docstring). ``n_steps`` defaults to twice the half-time of a mode at the bulk edge.
    Hidden width defaults to N_o. The validation set's noise has its own generator (derived from
    ``seed``), so the training run is the same with or without it.
    """
    s_bar = checks.strengths(strengths)
    n_in = checks.count(n_in, "n_in")
    n_out = checks.count(n_out, "n_out")
    a_ratio = checks.aspect_ratio(n_out / n_in)
    depth = checks.depth(depth)
    a0 = checks.positive(a0, "a0")
    lr = checks.positive(lr, "lr")
    if init not in ("decoupled", "random"):
        raise QKDissectError(
            f"init: the generalisation theory assumes small initial weights; expected 'decoupled' or "
            f"'random', got {init!r} (available in simulate_modes: {', '.join(INIT_KINDS)})."
        )
    if method not in SIMULATION_METHODS:
        raise QKDissectError(f"method: expected one of {', '.join(SIMULATION_METHODS)}, got {method!r}.")
    if method == "modes" and init != "decoupled":
        raise QKDissectError("method 'modes' follows the student in Σ̂'s singular basis, which needs init "
                             f"'decoupled', got {init!r}; use method 'matrices' for random init.")
    if n_steps is None:
        edge = 1.0 + np.sqrt(a_ratio)
        n_steps = int(np.ceil(2.0 * time_to_fraction([edge], a0, 0.5, depth=depth, tau=1 / lr)[0]))
    h = n_out if hidden is None else checks.count(hidden, "hidden")
    g = make_generator(seed)
    task = make_noisy_teacher(n_in, n_out, s_bar, n_seeds=n_seeds, seed=g)
    w_bar = task.teacher.matrix
    s_hat_m = task.sigma_hat
    sigma_val = w_bar + torch.randn(w_bar.shape, generator=_validation_generator(seed), dtype=w_bar.dtype) / np.sqrt(
        n_in)
    u_hat, s_hat, vh_hat = torch.linalg.svd(s_hat_m, full_matrices=False)
    v_hat = vh_hat.transpose(-1, -2)
    norm = float((s_bar**2).sum())
    oracle = torch.einsum("bok,boi,bik->bk", u_hat, w_bar, v_hat)  # (B, N_o): û_kᵀ W̄ v̂_k
    if method == "modes":
        projections = torch.einsum("bok,boi,bik->bk", u_hat, sigma_val, v_hat)
        steps, obs = _run_modes(s_hat, oracle, projections, (sigma_val**2).sum((-1, -2)), norm, a0=a0, lr=lr,
                                depth=depth, n_steps=n_steps, record_every=record_every, progress=progress)
    else:
        sizes = [n_in] + [h] * (depth - 1) + [n_out]
        ws = init_weights(init, sizes, n_batch=n_seeds, a0=a0, modes=(u_hat, v_hat), seed=g)

        def observe(w: torch.Tensor) -> torch.Tensor:
            train = ((w - s_hat_m) ** 2).sum((-1, -2)) / norm
            test = ((w - w_bar) ** 2).sum((-1, -2)) / norm
            return torch.stack([train, test, validation_loss(w, sigma_val)], -1)

        trace = gradient_descent(ws, s_hat_m, lr, n_steps, record_every=record_every, observe=observe,
                                 progress=progress)
        steps, obs = trace.steps, trace.observations
    train, test, val = (x.numpy() for x in obs.unbind(-1))
    r = s_bar.size
    ov = (torch.einsum("bor,bor->br", task.teacher.U, u_hat[..., :r])
          * torch.einsum("bir,bir->br", task.teacher.V, v_hat[..., :r])).numpy()
    eta = torch.as_tensor(rmt.optimal_shrinkage(s_hat.reshape(-1).numpy(), a_ratio)).reshape(s_hat.shape)
    shrink_err = (1.0 - (2.0 * (eta * oracle).sum(-1) - (eta**2).sum(-1)) / norm).numpy()  # Σ_k η_k û_k v̂_kᵀ
    t_opt, e_opt = curve_minimum(steps.astype(np.float64), test.mean(1))
    i_opt = int(np.argmin(np.abs(steps - t_opt)))
    i_val = validation_stopping_index(val)
    seeds = np.arange(n_seeds)
    return GeneralizationSimulation(
        steps=steps, train_error=train, test_error=test, validation_loss=val, t_validation=steps[i_val],
        test_error_at_validation=test[i_val, seeds], s_hat=s_hat.numpy(), overlap=ov, oracle_strength=oracle.numpy(),
        shrinkage_test_error=shrink_err, t_opt=t_opt, test_error_opt=e_opt, test_error_at_t_opt=test[i_opt],
        best_test_error=test.min(0), s_bar=s_bar, n_in=n_in, n_out=n_out, depth=depth, a0=a0, lr=lr, init=init,
        hidden=h, n_seeds=n_seeds, seed=int(seed), method=method,
    )


@dataclass(frozen=True)
class ShrinkageComparison:
    """Shrinkage vs gradient descent at its optimal stopping time, per setting of a sweep.

    Each row i is one setting ``settings[i] = (n_in, n_out, strengths)``. ``*_theory`` come from
    :func:`generalization_theory`, ``*_sim`` are seed means from :func:`simulate_generalization`:
    ``gd_opt_sim`` GD at the seed-mean curve's t* (oracle), ``gd_validation_sim`` GD at each student's
    validation-chosen t. ``frac_seeds_shrinkage_better`` is the fraction of seeds whose shrinkage error
    is <= their GD test error at the oracle t*, ``frac_seeds_shrinkage_better_than_validation`` the
    same against GD at the validation t.
    """

    settings: tuple[tuple[int, int, tuple[float, ...]], ...]
    shrinkage_theory: np.ndarray
    gd_opt_theory: np.ndarray
    shrinkage_sim: np.ndarray
    gd_opt_sim: np.ndarray
    frac_seeds_shrinkage_better: np.ndarray
    gd_validation_sim: np.ndarray
    frac_seeds_shrinkage_better_than_validation: np.ndarray


def shrinkage_sweep(
    settings: Any,
    *,
    n_seeds: int = 5,
    a0: float = 1e-5,
    lr: float = 1e-2,
    depth: int = 2,
    seed: int = 0,
    method: str = "matrices",
    progress: ProgressFn | None = None,
) -> ShrinkageComparison:
    """Compare the shrinkage estimator with early-stopped gradient descent over several settings."""
    rows = [(int(ni), int(no), tuple(float(x) for x in np.atleast_1d(s))) for ni, no, s in settings]
    out = np.zeros((7, len(rows)))
    for i, (ni, no, s) in enumerate(rows):
        th = generalization_theory(s, ni, no, a0=a0, depth=depth, lr=lr)
        sim = simulate_generalization(s, ni, no, n_seeds=n_seeds, a0=a0, lr=lr, depth=depth, seed=seed + i,
                                      method=method)
        out[:, i] = [
            th.shrinkage_test_error,
            th.test_error_opt,
            sim.shrinkage_test_error.mean(),
            sim.test_error_opt,
            np.mean(sim.shrinkage_test_error <= sim.test_error_at_t_opt),
            sim.test_error_at_validation.mean(),
            np.mean(sim.shrinkage_test_error <= sim.test_error_at_validation),
        ]
        report(progress, "shrinkage sweep", i + 1, len(rows))
    return ShrinkageComparison(tuple(rows), *out)


def _sem(x: np.ndarray) -> float:
    """Standard error of the mean of ``x`` ``(n,)`` (NaN for n = 1)."""
    return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")


@dataclass(frozen=True)
class FiniteSizeTrend:
    """Test errors as N_i = N grows at fixed aspect ratio (seed means, ``*_sem`` standard errors).

    Attributes:
        n_in, n_out: ``(S,)`` sizes; strengths: teacher s̄; n_seeds: seeds per size; a0: initial strength.
        shrinkage, gd_validation: ``(S,)`` the shrinkage estimator and GD at each student's validation t.
        gd_oracle: ``(S,)`` GD at the oracle t* (minimum of the seed-mean test curve);
        gd_oracle_per_seed: ``(S,)`` mean of each seed's own minimum.
        t_validation: ``(S,)`` mean validation-chosen t; t_oracle: ``(S,)`` the oracle t*.
        theory_shrinkage, theory_gd, theory_t_opt: ``(S,)`` large-N theory at each size (the GD error at t*
            rises slowly with N_o through the bulk noise modes learned by t*).
        seconds: ``(S,)`` wall-clock time per size.
    """

    n_in: np.ndarray
    n_out: np.ndarray
    strengths: np.ndarray
    n_seeds: int
    a0: float
    shrinkage: np.ndarray
    shrinkage_sem: np.ndarray
    gd_validation: np.ndarray
    gd_validation_sem: np.ndarray
    gd_oracle: np.ndarray
    gd_oracle_per_seed: np.ndarray
    t_validation: np.ndarray
    t_oracle: np.ndarray
    theory_shrinkage: np.ndarray
    theory_gd: np.ndarray
    theory_t_opt: np.ndarray
    seconds: np.ndarray


def finite_size_trend(
    strengths: Any,
    sizes: Any = (100, 200, 400, 800),
    *,
    aspect_ratio: float = 1.0,
    n_seeds: int = 10,
    a0: float = 1e-5,
    lr: float = 1e-2,
    depth: int = 2,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> FiniteSizeTrend:
    """Shrinkage vs GD at validation / oracle t* for N_i = N in ``sizes``, N_o = round(A·N) (method 'modes').

    Each seed is simulated on its own (one N × N problem in memory at a time); seed j of size i uses
    ``seed + 1000 i + j``.
    """
    ns = [checks.count(n, "size", minimum=2) for n in np.atleast_1d(sizes)]
    a_ratio = checks.aspect_ratio(aspect_ratio)
    n_seeds = checks.count(n_seeds, "n_seeds")
    cols: dict[str, list[Any]] = {k: [] for k in ("n_out", "shr", "shr_sem", "val", "val_sem", "orc", "orc_seed",
                                                  "t_val", "t_orc", "th_shr", "th_gd", "th_t", "sec")}
    for i, n in enumerate(ns):
        started = time.perf_counter()
        n_out = max(1, round(a_ratio * n))
        sims = [simulate_generalization(strengths, n, n_out, n_seeds=1, a0=a0, lr=lr, depth=depth, method="modes",
                                        seed=seed + 1000 * i + j) for j in range(n_seeds)]
        test = np.concatenate([s.test_error for s in sims], axis=1)  # (T, seeds): same steps for every seed
        shr = np.concatenate([s.shrinkage_test_error for s in sims])
        val = np.concatenate([s.test_error_at_validation for s in sims])
        t_orc, e_orc = curve_minimum(sims[0].steps.astype(np.float64), test.mean(1))
        th = generalization_theory(strengths, n, n_out, a0=a0, depth=depth, lr=lr)
        for key, value in (("n_out", n_out), ("shr", shr.mean()), ("shr_sem", _sem(shr)), ("val", val.mean()),
                           ("val_sem", _sem(val)), ("orc", e_orc), ("orc_seed", test.min(0).mean()),
                           ("t_val", np.mean([s.t_validation for s in sims])), ("t_orc", t_orc),
                           ("th_shr", th.shrinkage_test_error), ("th_gd", th.test_error_opt), ("th_t", th.t_opt),
                           ("sec", time.perf_counter() - started)):
            cols[key].append(value)
        report(progress, "finite-size trend", i + 1, len(ns))
    arr = {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}
    return FiniteSizeTrend(
        n_in=np.asarray(ns), n_out=arr["n_out"].astype(int), strengths=checks.strengths(strengths), n_seeds=n_seeds, a0=float(a0),
        shrinkage=arr["shr"], shrinkage_sem=arr["shr_sem"], gd_validation=arr["val"], gd_validation_sem=arr["val_sem"],
        gd_oracle=arr["orc"], gd_oracle_per_seed=arr["orc_seed"], t_validation=arr["t_val"], t_oracle=arr["t_orc"],
        theory_shrinkage=arr["th_shr"], theory_gd=arr["th_gd"], theory_t_opt=arr["th_t"], seconds=arr["sec"],
    )
