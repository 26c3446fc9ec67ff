"""Generalisation dynamics of a deep linear student learning a noisy low-rank teacher.

Setting (Lampinen & Ganguli 2019). The student sees Σ̂ = W̄ + Z (``N_o × N_i``, Z i.i.d. with
variance 1/N_i, A = N_o/N_i <= 1; see :mod:`qkdissect.dynamics.linear.rmt`) and is trained by full-batch
gradient descent on ½‖Σ̂ − W‖²_F from small initial weights. From decoupled init (aligned to the
SVD of Σ̂, product strength a₀ on every empirical mode) each empirical mode β, true or noise, is
learned with Saxe timing in its own singular value ŝ_β:
W(t) = Σ_β a(ŝ_β, t) û_β v̂_βᵀ with a(s, t) from :func:`qkdissect.dynamics.linear.theory.mode_strength`.

Error definitions (our choice; also written into every results.json):

* train error  E_train(t) = ‖Σ̂ − W(t)‖²_F / ‖W̄‖²_F   (training loss with P = N_i orthonormal
  inputs, up to the factor ½),
* test error   E_test(t)  = ‖W̄ − W(t)‖²_F / ‖W̄‖²_F   (expected squared error on a fresh whitened
  input against the *noise-free* teacher output; output noise would only add a constant).

Both are normalised by the teacher's squared norm Σ_α s̄_α², so E_test = 1 for W = 0.
Time t is in epochs (gradient steps), τ = 1/lr.

Theory in the limit of large N_i, N_o (fixed A). With detected teacher modes (s̄_α > A^{1/4})
producing outliers ŝ_α = ŝ(s̄_α) with overlap O_α = O(s̄_α), undetected teacher modes lost, and the
remaining N_o − r_det empirical modes distributed by the Marchenko–Pastur density p(σ)::

    ‖W̄‖² E_test(t)  = Σ_det [s̄² − 2 s̄ O a(ŝ,t) + a(ŝ,t)²] + Σ_undet s̄²
                      + (N_o − r_det) ∫ p(σ) a(σ,t)² dσ
    ‖W̄‖² E_train(t) = Σ_det (ŝ − a(ŝ,t))² + (N_o − r_det) ∫ p(σ) (σ − a(σ,t))² dσ

(the overlap of bulk singular vectors with the teacher is neglected; it is O(1/N) per mode).
The optimal early-stopping time t* minimises E_test. The non-gradient optimum keeps the empirical
singular vectors and sets each singular value to η(ŝ) = s̄(ŝ) O(s̄(ŝ)); its test error is
[Σ_det s̄²(1 − O²) + Σ_undet s̄²] / ‖W̄‖², never above E_test(t*).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import curve_minimum
from qkdissect.dynamics.linear import rmt
from qkdissect.dynamics.linear.simulate import INIT_KINDS, gradient_descent, init_weights
from qkdissect.dynamics.linear.tasks import make_generator, make_noisy_teacher
from qkdissect.dynamics.linear.theory import mode_strength_function, time_to_fraction
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, report

__all__ = [
    "ERROR_DEFINITIONS",
    "GeneralizationTheory",
    "generalization_theory",
    "GeneralizationSimulation",
    "simulate_generalization",
    "shrinkage_estimate",
    "ShrinkageComparison",
    "shrinkage_sweep",
]

ERROR_DEFINITIONS = {
    "train_error": "||Sigma_hat - W(t)||_F^2 / ||W_bar||_F^2",
    "test_error": "||W_bar - W(t)||_F^2 / ||W_bar||_F^2 (noise-free teacher, whitened test inputs)",
    "time_unit": "epochs = full-batch gradient steps; tau = 1/lr",
    "noise": "Z_ij ~ N(0, 1/N_i), aspect ratio A = N_o/N_i <= 1",
}


@dataclass(frozen=True)
class GeneralizationTheory:
    """Random-matrix theory of train/test error over time (module docstring for the formulas).

    Attributes:
        times: ``(T,)`` epochs.
        train_error, test_error: ``(T,)``.
        t_opt: optimal early-stopping time t* (epochs), minimiser of E_test.
        test_error_opt, train_error_opt: errors at t*.
        shrinkage_test_error: test error of the optimal shrinkage estimator.
        s_bar: ``(r,)`` teacher strengths; s_hat, overlap: ``(r,)`` predicted outliers and overlaps
            (bulk edge and 0 for undetected modes); detected: ``(r,)`` bool.
    """

    times: np.ndarray
    train_error: np.ndarray
    test_error: np.ndarray
    t_opt: float
    test_error_opt: float
    train_error_opt: float
    shrinkage_test_error: float
    s_bar: np.ndarray
    s_hat: np.ndarray
    overlap: np.ndarray
    detected: np.ndarray
    aspect_ratio: float
    n_out: int
    a0: float
    depth: int
    tau: float


def _theory_errors(
    s_bar: np.ndarray,
    a_ratio: float,
    n_out: int,
    a0: float,
    depth: int,
    tau: float,
    n_nodes: int,
    t_end: float,
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Return ``f(t) -> (E_train(t), E_test(t))`` for ``t`` of shape ``(T,)``."""
    det = s_bar > a_ratio**0.25
    sb = s_bar[det]
    sh = np.atleast_1d(rmt.spike_singular_value(sb, a_ratio)) if sb.size else sb
    ov = np.atleast_1d(rmt.spike_overlap(sb, a_ratio)) if sb.size else sb
    sig, w = rmt.marchenko_pastur_nodes(a_ratio, n_nodes)
    n_bulk = n_out - int(det.sum())
    norm = float(np.sum(s_bar**2))
    lost = float(np.sum(s_bar[~det] ** 2))
    all_s = np.concatenate([sh, sig])
    strength = mode_strength_function(all_s, np.full(all_s.shape, a0), depth, tau, t_end)

    def f(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a = strength(t)
        a_out, a_bulk = a[:, : sh.size], a[:, sh.size :]
        test = (sb**2 - 2 * sb * ov * a_out + a_out**2).sum(1) + lost + n_bulk * (a_bulk**2 @ w)
        train = ((sh - a_out) ** 2).sum(1) + n_bulk * ((sig - a_bulk) ** 2 @ w)
        return train / norm, test / norm

    return f


def generalization_theory(
    strengths: Any,
    n_in: int,
    n_out: int,
    times: Any | None = None,
    *,
    a0: float = 1e-5,
    depth: int = 2,
    lr: float = 1e-2,
    n_nodes: int = 256,
) -> GeneralizationTheory:
    """Theory curves E_train(t), E_test(t), the optimal stopping time t* and the shrinkage error.

    Args:
        strengths: teacher singular values s̄, ``(r,)``, > 0.
        n_in, n_out: N_i, N_o with A = N_o/N_i <= 1.
        times: ``(T,)`` epochs; default 400 points up to twice the half-time of a mode at the
            bulk edge 1 + √A (by then the top noise modes are learned).
        a0: initial product strength of every empirical mode (decoupled student init).
        depth: number of weight matrices of the student.
        lr: learning rate (τ = 1/lr).
        n_nodes: quadrature nodes for the Marchenko–Pastur integrals.
    """
    s_bar = checks.strengths(strengths)
    n_in = checks.count(n_in, "n_in")
    n_out = checks.count(n_out, "n_out")
    a_ratio = checks.aspect_ratio(n_out / n_in)
    if s_bar.size > n_out:
        raise QKDissectError(f"strengths: at most N_o = {n_out} teacher modes, got {s_bar.size}.")
    a0 = checks.positive(a0, "a0")
    depth = checks.depth(depth)
    tau = 1.0 / checks.positive(lr, "lr")
    edge = 1.0 + np.sqrt(a_ratio)
    if a0 >= edge / 2:
        raise QKDissectError(f"a0: expected a small initial strength (<< {edge:.3g}), got {a0!r}.")
    if times is None:
        t_edge = float(time_to_fraction([edge], a0, 0.5, depth=depth, tau=tau)[0])
        times = np.linspace(0.0, 2.0 * t_edge, 400)
    t = checks.times(times)
    f = _theory_errors(s_bar, a_ratio, n_out, a0, depth, tau, n_nodes, float(t.max()))
    train, test = f(t)
    t_opt, e_opt = curve_minimum(t, test, refine=lambda x: float(f(np.array([x]))[1][0]))
    tr_opt = float(f(np.array([t_opt]))[0][0])
    det = s_bar > a_ratio**0.25
    ov = np.atleast_1d(rmt.spike_overlap(s_bar, a_ratio))
    kept = np.sum(s_bar[det] ** 2 * (1 - ov[det] ** 2))
    shrink = float((kept + np.sum(s_bar[~det] ** 2)) / np.sum(s_bar**2))
    return GeneralizationTheory(
        times=t,
        train_error=train,
        test_error=test,
        t_opt=t_opt,
        test_error_opt=e_opt,
        train_error_opt=tr_opt,
        shrinkage_test_error=shrink,
        s_bar=s_bar,
        s_hat=np.atleast_1d(rmt.spike_singular_value(s_bar, a_ratio)),
        overlap=ov,
        detected=det,
        aspect_ratio=a_ratio,
        n_out=n_out,
        a0=a0,
        depth=depth,
        tau=tau,
    )


def shrinkage_estimate(sigma_hat: torch.Tensor, aspect_ratio: float | None = None) -> torch.Tensor:
    """The non-gradient estimator: Σ̂'s singular vectors with singular values η(ŝ) (see rmt).

    Args:
        sigma_hat: ``(B, N_o, N_i)`` with N_o <= N_i.
        aspect_ratio: A, default N_o/N_i.
    Returns:
        ``(B, N_o, N_i)``.
    """
    a_ratio = sigma_hat.shape[-2] / sigma_hat.shape[-1] if aspect_ratio is None else aspect_ratio
    u, s, vh = torch.linalg.svd(sigma_hat, full_matrices=False)
    eta = torch.as_tensor(
        rmt.optimal_shrinkage(s.reshape(-1).numpy(), a_ratio), dtype=s.dtype
    ).reshape(s.shape)
    return (u * eta.unsqueeze(-2)) @ vh


@dataclass(frozen=True)
class GeneralizationSimulation:
    """Train/test errors of students trained by gradient descent on Σ̂ = W̄ + Z, one per seed.

    Attributes:
        steps: ``(T,)`` epochs.
        train_error, test_error: ``(T, n_seeds)`` (definitions in the module docstring).
        s_hat: ``(n_seeds, N_o)`` empirical singular values of Σ̂, descending.
        overlap: ``(n_seeds, r)`` (ū_α·û_α)(v̄_α·v̂_α) of teacher mode α with empirical mode α.
        oracle_strength: ``(n_seeds, N_o)`` û_βᵀ W̄ v̂_β, the best value for each empirical mode.
        shrinkage_test_error: ``(n_seeds,)`` test error of the optimal shrinkage estimator.
        t_opt: argmin of the seed-mean test curve (parabolic refinement); test_error_opt: its value.
        test_error_at_t_opt: ``(n_seeds,)`` each seed's test error at the record nearest t_opt.
        best_test_error: ``(n_seeds,)`` each seed's own minimum over time (oracle early stopping).
    """

    steps: np.ndarray
    train_error: np.ndarray
    test_error: np.ndarray
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
    progress: ProgressFn | None = None,
) -> GeneralizationSimulation:
    """Simulate ``n_seeds`` teacher/noise draws and train one student on each (batched).

    ``init='decoupled'`` aligns the student to the SVD of its Σ̂ with product strength a₀ on all
    N_o empirical modes (the theory's assumption); ``init='random'`` uses small random weights
    (see :func:`qkdissect.dynamics.linear.simulate.init_weights`). ``n_steps`` defaults to the end of the
    default theory time window. Hidden width defaults to N_o.
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
    if n_steps is None:
        edge = 1.0 + np.sqrt(a_ratio)
        n_steps = int(np.ceil(2.0 * time_to_fraction([edge], a0, 0.5, depth=depth, tau=1 / lr)[0]))
    h = n_out if hidden is None else checks.count(hidden, "hidden")
    g = make_generator(seed)
    task = make_noisy_teacher(n_in, n_out, s_bar, n_seeds=n_seeds, seed=g)
    w_bar = task.teacher.matrix
    s_hat_m = task.sigma_hat
    u_hat, s_hat, vh_hat = torch.linalg.svd(s_hat_m, full_matrices=False)
    v_hat = vh_hat.transpose(-1, -2)
    sizes = [n_in] + [h] * (depth - 1) + [n_out]
    ws = init_weights(init, sizes, n_batch=n_seeds, a0=a0, modes=(u_hat, v_hat), seed=g)
    norm = (s_bar**2).sum()

    def observe(w: torch.Tensor) -> torch.Tensor:
        train = ((w - s_hat_m) ** 2).sum((-1, -2)) / norm
        test = ((w - w_bar) ** 2).sum((-1, -2)) / norm
        return torch.stack([train, test], -1)

    trace = gradient_descent(
        ws, s_hat_m, lr, n_steps, record_every=record_every, observe=observe, progress=progress
    )
    obs = trace.observations.numpy()
    train, test = obs[..., 0], obs[..., 1]
    r = s_bar.size
    ov = (
        torch.einsum("bor,bor->br", task.teacher.U, u_hat[..., :r])
        * torch.einsum("bir,bir->br", task.teacher.V, v_hat[..., :r])
    ).numpy()
    shrink = shrinkage_estimate(s_hat_m, a_ratio)
    shrink_err = (((shrink - w_bar) ** 2).sum((-1, -2)) / norm).numpy()
    mean_test = test.mean(1)
    t_opt, e_opt = curve_minimum(trace.steps.astype(np.float64), mean_test)
    i_opt = int(np.argmin(np.abs(trace.steps - t_opt)))
    return GeneralizationSimulation(
        steps=trace.steps,
        train_error=train,
        test_error=test,
        s_hat=s_hat.numpy(),
        overlap=ov,
        oracle_strength=torch.einsum("bor,boi,bir->br", u_hat, w_bar, v_hat).numpy(),
        shrinkage_test_error=shrink_err,
        t_opt=t_opt,
        test_error_opt=e_opt,
        test_error_at_t_opt=test[i_opt],
        best_test_error=test.min(0),
        s_bar=s_bar,
        n_in=n_in,
        n_out=n_out,
        depth=depth,
        a0=a0,
        lr=lr,
        init=init,
        hidden=h,
        n_seeds=n_seeds,
        seed=int(seed),
    )


@dataclass(frozen=True)
class ShrinkageComparison:
    """Shrinkage vs gradient descent at its optimal stopping time, per setting of a sweep.

    Each row i is one setting ``settings[i] = (n_in, n_out, strengths)``. ``*_theory`` come from
    :func:`generalization_theory`, ``*_sim`` are seed means from :func:`simulate_generalization`
    (GD at the mean curve's t*), ``frac_seeds_shrinkage_better`` the fraction of seeds whose
    shrinkage error is <= their GD test error at the common t* of the seed-mean curve.
    """

    settings: tuple[tuple[int, int, tuple[float, ...]], ...]
    shrinkage_theory: np.ndarray
    gd_opt_theory: np.ndarray
    shrinkage_sim: np.ndarray
    gd_opt_sim: np.ndarray
    frac_seeds_shrinkage_better: np.ndarray


def shrinkage_sweep(
    settings: Any,
    *,
    n_seeds: int = 5,
    a0: float = 1e-5,
    lr: float = 1e-2,
    depth: int = 2,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> ShrinkageComparison:
    """Compare the shrinkage estimator with early-stopped gradient descent over several settings."""
    rows = [(int(ni), int(no), tuple(float(x) for x in np.atleast_1d(s))) for ni, no, s in settings]
    out = np.zeros((5, len(rows)))
    for i, (ni, no, s) in enumerate(rows):
        th = generalization_theory(s, ni, no, a0=a0, depth=depth, lr=lr)
        sim = simulate_generalization(s, ni, no, n_seeds=n_seeds, a0=a0, lr=lr, depth=depth, seed=seed + i)
        out[:, i] = [
            th.shrinkage_test_error,
            th.test_error_opt,
            sim.shrinkage_test_error.mean(),
            sim.test_error_opt,
            np.mean(sim.shrinkage_test_error <= sim.test_error_at_t_opt),
        ]
        report(progress, "shrinkage sweep", i + 1, len(rows))
    return ShrinkageComparison(tuple(rows), *out)
