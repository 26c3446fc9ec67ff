"""Transfer between two tasks that share input features (Lampinen & Ganguli 2019).

Setting. A source teacher W̄_S = s̄_S ū_S v̄_Sᵀ (N_oS × N_i) and a target teacher
W̄_T = s̄_T ū_T v̄_Tᵀ (N_oT × N_i), input alignment q = v̄_S·v̄_T, each seen through its own noise
(Σ̂_S = W̄_S + Z_S, Σ̂_T = W̄_T + Z_T, entries of variance 1/N_i). A network with a shared first layer
and one head per task, trained jointly by gradient descent on ½‖Σ̂_S − W_S‖² + ½‖Σ̂_T − W_T‖², is a
two-layer network trained on the stacked matrix Σ̂ = [Σ̂_S; Σ̂_T] (aspect ratio
A' = (N_oS + N_oT)/N_i <= 1). We compare the target's test error (normalised by s̄_T², see
:mod:`qkdissect.dynamics.linear.generalization`) at its optimal stopping time when trained jointly vs
alone on Σ̂_T. ``transfer benefit = E_T,alone(t*) − E_T,joint(t*)``: positive = positive transfer.

Theory (our derivation, large-N limit). The stacked teacher has singular values σ_k² = the
eigenvalues of [[s̄_S², s̄_S s̄_T q], [s̄_S s̄_T q, s̄_T²]], right vectors x_k in span(v̄_S, v̄_T) and
left vectors y_k whose target block has squared norm π_k = s̄_T²(v̄_T·x_k)²/σ_k². Each detected
stacked mode (σ_k > A'^{1/4}) yields an outlier ŝ_k with overlaps (O_u,k, O_v,k) from
:mod:`qkdissect.dynamics.linear.rmt`; the delocalised rest of an empirical output vector, and every
bulk vector, puts a fraction f_T = N_oT/(N_oS + N_oT) of its norm in the target block. With
a_k(t) the Saxe curve of mode k::

    s̄_T² E_T,joint(t) = s̄_T² − 2 Σ_k a_k O_u,k O_v,k σ_k π_k
                        + Σ_k a_k² [O_u,k² π_k + (1 − O_u,k²) f_T]
                        + f_T (N_oS + N_oT − r_det) ∫ p_{A'}(σ) a(σ,t)² dσ

and E_T,alone(t) is the rank-1 formula of the generalisation theory with A_T = N_oT/N_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import curve_minimum
from qkdissect.dynamics.linear import rmt
from qkdissect.dynamics.linear.generalization import generalization_theory
from qkdissect.dynamics.linear.simulate import gradient_descent, init_weights
from qkdissect.dynamics.linear.tasks import make_generator, make_transfer_pair
from qkdissect.dynamics.linear.theory import mode_strength_function, time_to_fraction
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn

__all__ = ["TransferTheory", "transfer_theory", "TransferSimulation", "simulate_transfer"]


@dataclass(frozen=True)
class TransferTheory:
    """Theory of the target's test error, jointly vs alone.

    Attributes:
        times: ``(T,)`` epochs.
        test_error_joint, test_error_alone: ``(T,)`` target test error / s̄_T².
        t_opt_joint, t_opt_alone, error_opt_joint, error_opt_alone: optimal stopping.
        benefit: error_opt_alone − error_opt_joint.
        stacked_strengths: ``(2,)`` σ_k of the stacked teacher; target_share: ``(2,)`` π_k.
    """

    times: np.ndarray
    test_error_joint: np.ndarray
    test_error_alone: np.ndarray
    t_opt_joint: float
    t_opt_alone: float
    error_opt_joint: float
    error_opt_alone: float
    benefit: float
    stacked_strengths: np.ndarray
    target_share: np.ndarray


def _stacked_modes(s_s: float, s_t: float, q: float) -> tuple[np.ndarray, np.ndarray]:
    """σ_k (descending) and target-block shares π_k of the stacked rank-2 teacher."""
    gram = np.array([[s_s**2, s_s * s_t * q], [s_s * s_t * q, s_t**2]])
    lam, c = np.linalg.eigh(gram)
    lam, c = lam[::-1], c[:, ::-1]
    sig = np.sqrt(np.clip(lam, 0.0, None))
    # v_T·x_k = v_Tᵀ M c_k / σ_k with M = [s_S v_S, s_T v_T]: v_Tᵀ M = [s_S q, s_T]
    with np.errstate(divide="ignore", invalid="ignore"):
        vt_x = (s_s * q * c[0] + s_t * c[1]) / sig
        share = np.where(sig > 0, s_t**2 * vt_x**2 / sig**2, 0.0)
    return sig, share


def transfer_theory(
    snr_source: float,
    snr_target: float,
    alignment: float,
    *,
    n_in: int = 100,
    n_out_source: int = 50,
    n_out_target: int = 50,
    times: Any | None = None,
    a0: float = 1e-5,
    lr: float = 1e-2,
    n_nodes: int = 256,
) -> TransferTheory:
    """Theory curves of the target's test error trained jointly (shared first layer) vs alone.

    Two-layer networks (depth 2) from decoupled small init (a₀ per empirical mode). Formulas in the
    module docstring. ``times`` defaults to twice the half-time of a mode at the joint bulk edge.
    """
    q = checks.unit_interval(alignment, "alignment")
    s_s = checks.positive(snr_source, "snr_source")
    s_t = checks.positive(snr_target, "snr_target")
    n_in = checks.count(n_in, "n_in")
    n_os = checks.count(n_out_source, "n_out_source")
    n_ot = checks.count(n_out_target, "n_out_target")
    n_tot = n_os + n_ot
    if n_tot > n_in:
        raise QKDissectError(
            f"transfer: the joint aspect ratio (N_oS + N_oT)/N_i must be <= 1, got "
            f"({n_os} + {n_ot})/{n_in}. Use more inputs or fewer outputs."
        )
    a_joint = n_tot / n_in
    a0 = checks.positive(a0, "a0")
    tau = 1.0 / checks.positive(lr, "lr")
    if times is None:
        edge = 1.0 + np.sqrt(a_joint)
        times = np.linspace(0.0, 2.0 * time_to_fraction([edge], a0, 0.5, tau=tau)[0], 400)
    t = checks.times(times)

    sig, share = _stacked_modes(s_s, s_t, q)
    det = sig > a_joint**0.25
    sk, pk = sig[det], share[det]
    sh = np.atleast_1d(rmt.spike_singular_value(sk, a_joint)) if sk.size else sk
    ou, ov = (np.atleast_1d(x) for x in rmt.spike_overlaps(sk, a_joint)) if sk.size else (sk, sk)
    nodes, w = rmt.marchenko_pastur_nodes(a_joint, n_nodes)
    f_t = n_ot / n_tot
    n_bulk = n_tot - int(det.sum())
    all_s = np.concatenate([sh, nodes])
    strength = mode_strength_function(all_s, np.full(all_s.shape, a0), 2, tau, float(t.max()))

    def joint(tt: np.ndarray) -> np.ndarray:
        a = strength(tt)
        a_out, a_bulk = a[:, : sh.size], a[:, sh.size :]
        err = (
            s_t**2
            - 2.0 * (a_out * ou * ov * sk * pk).sum(1)
            + (a_out**2 * (ou**2 * pk + (1.0 - ou**2) * f_t)).sum(1)
            + f_t * n_bulk * (a_bulk**2 @ w)
        )
        return err / s_t**2

    e_joint = joint(t)
    t_j, e_j = curve_minimum(t, e_joint, refine=lambda x: float(joint(np.array([x]))[0]))
    alone = generalization_theory([s_t], n_in, n_ot, t, a0=a0, depth=2, lr=lr, n_nodes=n_nodes)
    return TransferTheory(
        times=t,
        test_error_joint=e_joint,
        test_error_alone=alone.test_error,
        t_opt_joint=t_j,
        t_opt_alone=alone.t_opt,
        error_opt_joint=e_j,
        error_opt_alone=alone.test_error_opt,
        benefit=alone.test_error_opt - e_j,
        stacked_strengths=sig,
        target_share=share,
    )


@dataclass(frozen=True)
class TransferSimulation:
    """Simulated target test error (/ s̄_T²) trained jointly vs alone on the *same* noise draws.

    Attributes:
        steps: ``(T,)`` epochs.
        test_error_joint, test_error_alone: ``(T, n_seeds)``.
        error_opt_joint, error_opt_alone: minima of the seed-mean curves; t_opt_*: their times.
        benefit: error_opt_alone − error_opt_joint.
    """

    steps: np.ndarray
    test_error_joint: np.ndarray
    test_error_alone: np.ndarray
    t_opt_joint: float
    t_opt_alone: float
    error_opt_joint: float
    error_opt_alone: float
    benefit: float
    n_seeds: int
    seed: int
    init: str


def simulate_transfer(
    snr_source: float,
    snr_target: float,
    alignment: float,
    *,
    n_in: int = 100,
    n_out_source: int = 50,
    n_out_target: int = 50,
    n_seeds: int = 5,
    a0: float = 1e-5,
    lr: float = 1e-2,
    n_steps: int | None = None,
    init: str = "decoupled",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> TransferSimulation:
    """Train two-layer students jointly (stacked outputs, shared first layer) and on the target alone.

    ``init='decoupled'`` aligns each student to the SVD of its own training matrix with product
    strength a₀ per empirical mode; ``init='random'`` uses small random weights.
    """
    if init not in ("decoupled", "random"):
        raise QKDissectError(f"init: expected 'decoupled' or 'random', got {init!r}.")
    g = make_generator(seed)
    pair = make_transfer_pair(
        n_in, n_out_source, n_out_target, snr_source, snr_target, alignment, n_seeds=n_seeds, seed=g
    )
    n_tot = n_out_source + n_out_target
    if n_tot > n_in:
        raise QKDissectError(
            f"transfer: the joint aspect ratio (N_oS + N_oT)/N_i must be <= 1, got ({n_out_source} + "
            f"{n_out_target})/{n_in}. Use more inputs or fewer outputs."
        )
    if n_steps is None:
        edge = 1.0 + np.sqrt(n_tot / n_in)
        n_steps = int(np.ceil(2.0 * time_to_fraction([edge], a0, 0.5, tau=1.0 / lr)[0]))
    w_t = pair.target.teacher.matrix
    norm = float(snr_target) ** 2

    def run(sig: torch.Tensor, rows: slice, stage: str) -> tuple[np.ndarray, np.ndarray]:
        u, _, vh = torch.linalg.svd(sig, full_matrices=False)
        n_o = sig.shape[-2]
        ws = init_weights(
            init, [n_in, n_o, n_o], n_batch=n_seeds, a0=a0, modes=(u, vh.transpose(-1, -2)), seed=g
        )

        def observe(w: torch.Tensor) -> torch.Tensor:
            return ((w[..., rows, :] - w_t) ** 2).sum((-1, -2)) / norm

        tr = gradient_descent(ws, sig, lr, n_steps, observe=observe, progress=progress, stage=stage)
        return tr.steps, tr.observations.numpy()

    steps, e_joint = run(pair.stacked_sigma_hat, slice(n_out_source, n_tot), "joint training")
    _, e_alone = run(pair.target.sigma_hat, slice(0, n_out_target), "target alone")
    st = steps.astype(np.float64)
    t_j, m_j = curve_minimum(st, e_joint.mean(1))
    t_a, m_a = curve_minimum(st, e_alone.mean(1))
    return TransferSimulation(
        steps=steps,
        test_error_joint=e_joint,
        test_error_alone=e_alone,
        t_opt_joint=t_j,
        t_opt_alone=t_a,
        error_opt_joint=m_j,
        error_opt_alone=m_a,
        benefit=m_a - m_j,
        n_seeds=int(n_seeds),
        seed=int(seed),
        init=init,
    )
