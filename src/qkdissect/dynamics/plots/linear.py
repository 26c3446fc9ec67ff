"""Figures of the deep-linear-network experiments (``saxe``, ``depth-sweep``, ``generalization``, ``transfer``).

Each function takes plain arrays or result dataclasses, writes one PNG and returns its path.
Theory is always drawn as solid lines, simulation as markers / dashed lines / shaded bands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from qkdissect.dynamics.curves import nanmedian
from qkdissect.dynamics.plots.common import plt, save_figure, thin

__all__ = [
    "plot_mode_strengths",
    "plot_error_curves",
    "plot_spectrum",
    "plot_shrinkage",
    "plot_shrinkage_sweep",
    "plot_depth_sweep",
    "plot_transfer",
]


def plot_mode_strengths(
    path: str | Path,
    steps: np.ndarray,
    simulated: np.ndarray,
    theory: np.ndarray,
    target: np.ndarray,
    *,
    analytic_half_times: np.ndarray | None = None,
    title: str = "",
) -> Path:
    """Mode strengths a_α(t): theory (solid) vs simulation (markers; thin lines per seed).

    Args:
        steps: ``(T,)``; simulated: ``(T, n_seeds, M)``; theory: ``(T, M)``; target: ``(M,)``.
    """
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5.4), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, target.size))
    sl = thin(steps.size)
    for m, (s, c) in enumerate(zip(target, colors)):
        ax.plot(steps, theory[:, m], color=c, lw=2, label=f"theory, s={s:g}")
        for b in range(simulated.shape[1]):
            ax.plot(steps, simulated[:, b, m], color=c, lw=0.6, alpha=0.5)
        ax.plot(steps[sl], simulated[sl, :, m].mean(1), "o", ms=3.5, mfc="none", color=c,
                label="simulation (seed mean; thin lines: seeds)" if m == 0 else None)
        if analytic_half_times is not None and np.isfinite(analytic_half_times[m]):
            ax.axvline(analytic_half_times[m], color=c, ls=":", lw=0.8,
                       label="analytic half-time" if m == 0 else None)
        dev = np.abs(simulated[:, :, m] - theory[:, m : m + 1]).max(1) / s
        ax2.plot(steps, dev, color=c, label=f"s={s:g}")
    ax.set_xlabel("t (epochs = gradient steps)")
    ax.set_ylabel(r"mode strength $a_\alpha(t) = u_\alpha^\top W v_\alpha$")
    ax.set_title(title or "Modes are learned one by one")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax2.set_xlabel("t (epochs)")
    ax2.set_ylabel(r"max over seeds $|a_{sim} - a_{theory}| / s$")
    ax2.set_title("Simulation vs theory (theory: decoupled init)")
    ax2.axhline(0.01, color="red", ls="--", lw=1, label="1% bound")
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def plot_error_curves(
    path: str | Path,
    theory_times: np.ndarray,
    theory_train: np.ndarray,
    theory_test: np.ndarray,
    sim_steps: np.ndarray,
    sim_train: np.ndarray,
    sim_test: np.ndarray,
    *,
    t_opt_theory: float,
    t_opt_sim: float,
    shrinkage_theory: float,
    shrinkage_sim: float,
    title: str = "",
) -> Path:
    """Train/test error vs time: theory (solid), simulation mean ± sd (dashed, band), t* marked."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for lab, th, sim, c in (
        ("train", theory_train, sim_train, "tab:blue"),
        ("test", theory_test, sim_test, "tab:orange"),
    ):
        ax.plot(theory_times, th, color=c, lw=2, label=f"{lab} error, theory")
        m, sd = sim.mean(1), sim.std(1)
        ax.plot(sim_steps, m, "--", color=c, lw=1.5, label=f"{lab} error, simulation (mean)")
        ax.fill_between(sim_steps, np.clip(m - sd, 1e-6, None), m + sd, color=c, alpha=0.2)
    ax.axvline(t_opt_theory, color="k", lw=1.2, label=f"t* theory = {t_opt_theory:.0f}")
    ax.axvline(t_opt_sim, color="k", ls="--", lw=1.2, label=f"t* simulation = {t_opt_sim:.0f}")
    ax.axhline(shrinkage_theory, color="tab:green", lw=1.2,
               label=f"optimal shrinkage, theory = {shrinkage_theory:.3f}")
    ax.axhline(shrinkage_sim, color="tab:green", ls="--", lw=1.2,
               label=f"optimal shrinkage, simulation = {shrinkage_sim:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("t (epochs)")
    ax.set_ylabel(r"error / $\|\bar W\|_F^2$")
    ax.set_title(title or "Generalisation dynamics")
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_spectrum(
    path: str | Path,
    empirical: np.ndarray,
    grid: np.ndarray,
    density: np.ndarray,
    *,
    predicted_spikes: np.ndarray,
    bulk_edge: float,
    n_bulk_fraction: float,
    title: str = "",
) -> Path:
    """Histogram of Σ̂'s singular values (all seeds) vs the Marchenko–Pastur density and the spikes."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    ax.hist(empirical.ravel(), bins=80, density=True, color="0.7", label="empirical singular values")
    ax.plot(grid, n_bulk_fraction * density, "tab:blue", lw=2, label="Marchenko–Pastur density")
    ax.axvline(bulk_edge, color="tab:blue", ls="--", lw=1, label=f"bulk edge 1+√A = {bulk_edge:.3f}")
    for i, s in enumerate(predicted_spikes):
        ax.axvline(s, color="tab:red", lw=1.5, label="predicted spike ŝ(s̄)" if i == 0 else None)
    ax.set_xlabel("singular value of Σ̂ = W̄ + Z")
    ax.set_ylabel("density")
    ax.set_title(title or "Spectrum of the training correlation")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_shrinkage(
    path: str | Path,
    s_hat_grid: np.ndarray,
    shrinkage: np.ndarray,
    gd_at_t_opt: np.ndarray,
    *,
    empirical_s_hat: np.ndarray,
    empirical_oracle: np.ndarray,
    bulk_edge: float,
    title: str = "",
) -> Path:
    """Singular value kept by each estimator as a function of the empirical singular value ŝ."""
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(s_hat_grid, s_hat_grid, color="0.6", lw=1, ls=":", label="no shrinkage (a = ŝ)")
    ax.plot(s_hat_grid, shrinkage, "tab:green", lw=2, label="optimal shrinkage s̄(ŝ)·O(s̄(ŝ))")
    ax.plot(s_hat_grid, gd_at_t_opt, "tab:orange", lw=2, label="gradient descent at t* (theory)")
    ax.plot(empirical_s_hat.ravel(), empirical_oracle.ravel(), ".", ms=3, color="k", alpha=0.4,
            label=r"oracle $\hat u^\top \bar W \hat v$ (simulation)")
    ax.axvline(bulk_edge, color="tab:blue", ls="--", lw=1, label="bulk edge")
    ax.set_xlabel("empirical singular value ŝ")
    ax.set_ylabel("estimated singular value")
    ax.set_title(title or "Singular-value shrinkage vs early-stopped gradient descent")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_shrinkage_sweep(
    path: str | Path,
    labels: Sequence[str],
    shrinkage_theory: np.ndarray,
    gd_theory: np.ndarray,
    shrinkage_sim: np.ndarray,
    gd_sim: np.ndarray,
) -> Path:
    """Grouped bars: test error of shrinkage vs GD at t*, theory and simulation, per setting."""
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(labels)), 4.8))
    x = np.arange(len(labels))
    wdt = 0.2
    ax.bar(x - 1.5 * wdt, gd_theory, wdt, color="tab:orange", label="GD at t*, theory")
    ax.bar(x - 0.5 * wdt, gd_sim, wdt, color="tab:orange", alpha=0.5, hatch="//",
           label="GD at t*, simulation")
    ax.bar(x + 0.5 * wdt, shrinkage_theory, wdt, color="tab:green", label="shrinkage, theory")
    ax.bar(x + 1.5 * wdt, shrinkage_sim, wdt, color="tab:green", alpha=0.5, hatch="//",
           label="shrinkage, simulation")
    ax.set_xticks(x)
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel(r"test error / $\|\bar W\|_F^2$")
    ax.set_title("Non-gradient shrinkage vs early-stopped gradient descent")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_depth_sweep(path: str | Path, sweep: object) -> Path:
    """Epochs to criterion vs depth per init (median, quartiles; ▲ = not reached, at the cap)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    depths = np.asarray(sweep.depths)
    colors = plt.cm.tab10(np.arange(len(sweep.inits)))
    for i, (kind, c) in enumerate(zip(sweep.inits, colors)):
        t = sweep.times[i]
        capped = np.where(np.isnan(t), sweep.max_steps, t)
        med = np.median(capped, 1)
        lo, hi = np.percentile(capped, 25, 1), np.percentile(capped, 75, 1)
        ax.errorbar(depths, med, yerr=[med - lo, hi - med], color=c, marker="o", capsize=3,
                    label=f"{kind} (simulation, median)")
        cens = np.isnan(t).any(1)
        if cens.any():
            ax.plot(depths[cens], np.full(cens.sum(), sweep.max_steps), "^", color=c, ms=10,
                    label=f"{kind}: some seeds not done by {sweep.max_steps}")
        if np.isfinite(sweep.theory_times[i]).any():
            ax.plot(depths, sweep.theory_times[i], "-", color=c, lw=3, alpha=0.4, label=f"{kind} (theory)")
        j = len(depths) - 1
        ax2.plot(sweep.loss_steps, nanmedian(sweep.loss[i, 0], 1), color=c, ls=":",
                 label=f"{kind}, N={depths[0]}")
        ax2.plot(sweep.loss_steps, nanmedian(sweep.loss[i, j], 1), color=c,
                 label=f"{kind}, N={depths[j]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.set_xlabel("depth N (number of weight matrices)")
    ax.set_ylabel(f"epochs to relative loss < {sweep.criterion:g}")
    ax.set_title(f"Learning time vs depth (lr scaling {sweep.lr_scaling})")
    ax.legend(fontsize=8)
    ax2.axhline(sweep.criterion, color="red", ls="--", lw=1, label="criterion")
    ax2.set_yscale("log")
    ax2.set_xlabel("t (epochs)")
    ax2.set_ylabel(r"relative loss $\|\Sigma_{yx} - W\|^2 / \|\Sigma_{yx}\|^2$ (median)")
    ax2.set_title("Training loss, shallowest vs deepest")
    ax2.legend(fontsize=8)
    return save_figure(fig, path)


def plot_transfer(
    path: str | Path,
    alignments: np.ndarray,
    snr_sources: np.ndarray,
    benefit_theory: np.ndarray,
    benefit_sim: np.ndarray,
    *,
    snr_target: float,
    fine_alignments: np.ndarray | None = None,
    fine_benefit_theory: np.ndarray | None = None,
) -> Path:
    """Transfer matrix: benefit (alone − joint target test error) over alignment × source SNR.

    Args:
        benefit_theory, benefit_sim: ``(n_snr_sources, n_alignments)``.
        fine_alignments, fine_benefit_theory: optional ``(K,)`` and ``(n_snr_sources, K)`` theory
            on a finer alignment grid for the line plot.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    lim = float(np.nanmax(np.abs(np.concatenate([benefit_theory.ravel(), benefit_sim.ravel()])))) or 1.0
    for ax, data, name in ((axes[0], benefit_theory, "theory"), (axes[1], benefit_sim, "simulation")):
        im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, origin="lower", aspect="auto")
        ax.set_xticks(range(alignments.size))
        ax.set_xticklabels([f"{a:g}" for a in alignments])
        ax.set_yticks(range(snr_sources.size))
        ax.set_yticklabels([f"{s:g}" for s in snr_sources])
        ax.set_xlabel(r"input alignment $\bar v_S \cdot \bar v_T$")
        ax.set_ylabel("source SNR s̄_S")
        ax.set_title(f"transfer benefit, {name} (target SNR {snr_target:g})")
        for (r, c), v in np.ndenumerate(data):
            ax.text(c, r, f"{v:+.2f}", ha="center", va="center", fontsize=9,
                    color="white" if abs(v) > 0.6 * lim else "black")
        fig.colorbar(im, ax=ax, label="E_alone(t*) − E_joint(t*)")
    colors = plt.cm.viridis(np.linspace(0, 0.85, snr_sources.size))
    for k, (s, c) in enumerate(zip(snr_sources, colors)):
        if fine_alignments is not None and fine_benefit_theory is not None:
            axes[2].plot(fine_alignments, fine_benefit_theory[k], "-", color=c, lw=2,
                         label=f"s̄_S={s:g} theory")
        else:
            axes[2].plot(alignments, benefit_theory[k], "-", color=c, lw=2, label=f"s̄_S={s:g} theory")
        axes[2].plot(alignments, benefit_sim[k], "o--", color=c, mfc="none", label=f"s̄_S={s:g} simulation")
    axes[2].axhline(0, color="k", lw=0.8)
    axes[2].set_xlabel(r"input alignment $\bar v_S \cdot \bar v_T$")
    axes[2].set_ylabel("transfer benefit (positive = helps the target)")
    axes[2].set_title("Transfer benefit vs alignment")
    axes[2].legend(fontsize=7)
    return save_figure(fig, path)
