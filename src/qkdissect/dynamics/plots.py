"""Matplotlib figures for the learning-dynamics experiments (Agg backend, PNG files).

Each function takes plain arrays or result dataclasses, writes one PNG and returns its path.
Theory is always drawn as solid lines, simulation as markers / dashed lines / shaded bands.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_mode_strengths",
    "plot_error_curves",
    "plot_spectrum",
    "plot_shrinkage",
    "plot_shrinkage_sweep",
    "plot_depth_sweep",
    "plot_transfer",
    "plot_metalearn",
    "plot_meta_training",
    "plot_icl_outer_loop",
    "plot_icl_in_context",
    "plot_icl_cosines",
]

_DPI = 130


def _nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    """Median ignoring NaN; all-NaN slices (after an early stop) give NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def _save(fig: plt.Figure, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=_DPI)
    plt.close(fig)
    return p


def _thin(n: int, k: int = 60) -> slice:
    return slice(None, None, max(1, n // k))


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
    sl = _thin(steps.size)
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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
    return _save(fig, path)


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
        ax2.plot(sweep.loss_steps, _nanmedian(sweep.loss[i, 0], 1), color=c, ls=":",
                 label=f"{kind}, N={depths[0]}")
        ax2.plot(sweep.loss_steps, _nanmedian(sweep.loss[i, j], 1), color=c,
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
    return _save(fig, path)


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
    return _save(fig, path)


# ----------------------------------------------------------------------------- learners vs meta-learners


def _mode_colors(n: int) -> np.ndarray:
    return plt.cm.viridis(np.linspace(0.0, 0.88, n))


def _conc_label(c: dict) -> str:
    idx = c["index"]
    ok = idx is not None and bool(np.isfinite(idx))
    return f"concurrency index {f'{idx:.2f}' if ok else 'n/a'}{' (censored)' if c['censored'] and ok else ''}"


def plot_metalearn(
    path: str | Path,
    strengths: np.ndarray,
    systems: dict,
    *,
    n_x: int,
    ridge: float,
    bayes_is_min_norm: bool,
) -> Path:
    """Four panels: (a) SGD learner m_α over samples seen (Saxe theory dashed), (b) ideal estimators
    m_α(k) (min-norm closed form, Monte Carlo markers, ridge dashed, Bayes dotted), (c) the LSTM
    meta-learner m_α(k), (d) concurrency index per system.

    ``systems[name]`` holds ``x`` ``(T,)``, ``mean`` ``(T, r)``, ``sem`` and ``concurrency`` (a dict).
    """
    fig, axes = plt.subplots(1, 4, figsize=(19, 5.0), gridspec_kw={"width_ratios": [1.15, 1.15, 1.15, 0.8]})
    colors = _mode_colors(strengths.size)
    lrn = systems["learner"]
    ax = axes[0]
    for m, (s, c) in enumerate(zip(strengths, colors)):
        ax.plot(lrn["x"], lrn["mean"][:, m], color=c, lw=1.8, label=f"s={s:g}")
        ax.plot(lrn["x"], lrn["theory_mean"][:, m], color=c, lw=1, ls="--")
    ax.plot([], [], "k--", lw=1, label="Saxe theory (a_eff)")
    ax.set_xlabel("samples seen (SGD steps × batch)")
    ax.set_ylabel(r"mode recovery $m_\alpha = u_\alpha^\top \hat W v_\alpha / s_\alpha$")
    ax.set_title(f"(a) fresh SGD learner per task\n{_conc_label(lrn['concurrency'])}", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax = axes[1]
    mn, rg, by = systems["min_norm"], systems["ridge"], systems["bayes"]
    ax.plot(mn["x"], mn["closed_form"], "k-", lw=2.2, label=r"min-norm closed form $\min(k, N_x)/N_x$")
    for m, c in enumerate(colors):
        ax.errorbar(mn["x"], mn["mean"][:, m], yerr=mn["sem"][:, m], fmt="o", ms=3, color=c, mfc="none",
                    capsize=1.5, lw=0.8, label="min-norm Monte Carlo (±1 s.e.)" if m == 0 else None)
        ax.plot(rg["x"], rg["mean"][:, m], color=c, lw=1, ls="--", label=f"ridge λ={ridge:g}" if m == 0 else None)
        if not bayes_is_min_norm:
            ax.plot(by["x"], by["mean"][:, m], color=c, lw=1.2, ls=":", label="Bayes (Gaussian prior)" if m == 0 else None)
    ax.set_xlabel("k (context samples)")
    ax.set_ylabel(r"$m_\alpha(k)$")
    bayes_note = "Bayes = min-norm (exact, noise-free)" if bayes_is_min_norm else "Bayes dotted"
    ax.set_title(f"(b) ideal in-context estimators ({bayes_note})\nmin-norm {_conc_label(mn['concurrency'])}, "
                 f"ridge {_conc_label(rg['concurrency']).split('index ')[1]}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    ls = systems["lstm"]
    ax.plot(mn["x"], mn["closed_form"], "k-", lw=1.2, alpha=0.5, label="min-norm (ideal)")
    for m, (s, c) in enumerate(zip(strengths, colors)):
        ax.fill_between(ls["x"], ls["mean"][:, m] - ls["sem"][:, m], ls["mean"][:, m] + ls["sem"][:, m],
                        color=c, alpha=0.2, lw=0)
        ax.plot(ls["x"], ls["mean"][:, m], color=c, lw=1.8, label=f"s={s:g}")
    ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("k (context samples)")
    ax.set_ylabel(r"$m_\alpha(k)$ (probed)")
    ax.set_title(f"(c) meta-trained LSTM (held-out tasks)\n{_conc_label(ls['concurrency'])}", fontsize=10)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    for a in axes[:3]:
        a.axhline(0.5, color="0.6", lw=0.8, ls=":")
        a.set_ylim(-0.05, 1.1)
    ax = axes[3]
    names = [n for n in ("learner", "min_norm", "ridge", "bayes", "lstm") if n in systems]
    vals = [systems[n]["concurrency"]["index"] for n in names]
    vals = [np.nan if v is None else v for v in vals]
    bars = ax.bar(range(len(names)), np.nan_to_num(vals), color=["tab:orange", "0.3", "0.5", "0.7", "tab:blue"][: len(names)])
    for i, (b, n) in enumerate(zip(bars, names)):
        c = systems[n]["concurrency"]
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                "n/a" if not np.isfinite(vals[i]) else f"{vals[i]:.2f}" + ("*" if c["censored"] else ""),
                ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_", "-") for n in names], fontsize=8, rotation=20)
    ax.set_ylabel("std / mean of half-recovery points")
    ax.set_title("(d) concurrency index\n(0 = all modes at once)", fontsize=10)
    if any(systems[n]["concurrency"]["censored"] for n in names):
        ax.text(0.02, -0.2, "* censored: some mode never reached 0.5\n  (counted at the last record)", fontsize=7,
                transform=ax.transAxes, va="top")
    return _save(fig, path)


def plot_meta_training(path: str | Path, log: dict) -> Path:
    """Meta-training (running mean) and held-out relative error over meta-steps, and the held-out
    error per position of the episode at a few points of training."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    ax.plot(log["steps"], log["train_loss"], color="tab:blue", label="training tasks (running mean)")
    ax.plot(log["steps"], log["test_loss"], color="tab:orange", label="held-out tasks")
    ax.set_xlabel("meta-step")
    ax.set_ylabel("relative error ‖ŷ − y‖² / Σs²")
    ax.set_title("LSTM meta-training")
    ax.legend(fontsize=8)
    per = np.asarray(log["test_loss_per_position"])
    picks = np.unique(np.linspace(0, per.shape[0] - 1, 5).astype(int))
    cols = plt.cm.plasma(np.linspace(0, 0.85, picks.size))
    for i, c in zip(picks, cols):
        ax2.plot(np.arange(per.shape[1]), per[i], color=c, marker=".", label=f"meta-step {int(log['steps'][i])}")
    ax2.set_xlabel("k (samples seen before the prediction)")
    ax2.set_ylabel("held-out relative error")
    ax2.set_title("Error per position in the episode")
    ax2.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- in-context transformer


def _head_lines(ax, steps: np.ndarray, values: np.ndarray, title: str) -> None:
    """values ``(C, L, H, r)``: one colour per head, solid for layer 0, dashed for layer 1, …"""
    n_layers, n_heads = values.shape[1], values.shape[2]
    cols = plt.cm.tab10(np.arange(n_heads) % 10)
    styles = ["-", "--", ":", "-."]
    for l in range(n_layers):
        for h in range(n_heads):
            for i in range(values.shape[3]):
                ax.plot(steps, values[:, l, h, i], color=cols[h], ls=styles[l % 4], lw=1.0,
                        label=(f"head {h}" + (f", layer {l}" if n_layers > 1 else "")) if i == 0 else None)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("singular value")


def _symlog_steps(ax, steps: np.ndarray) -> None:
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(0, float(steps[-1]))
    ax.set_xlabel("training step (symlog)")


def plot_icl_outer_loop(path: str | Path, strengths: np.ndarray, variants: Sequence[dict]) -> Path:
    """Rows = variants; columns: training loss, KQ x–x singular values per head, OV y←y singular
    values per head, in-context recovery with the full context m_α(N) per mode, over training."""
    n = len(variants)
    fig, axes = plt.subplots(n, 4, figsize=(19, 3.6 * n), squeeze=False)
    colors = _mode_colors(strengths.size)
    for row, v in zip(axes, variants):
        tr, ol = v["training"], v["outer_loop"]
        st = np.asarray(ol["steps"], dtype=float)
        ax = row[0]
        ax.plot(tr["steps"], tr["test_loss"], color="tab:orange", label="held-out tasks")
        ax.plot(tr["steps"], tr["train_loss"], color="tab:blue", lw=0.8, label="training (running mean)")
        ax.set_ylabel("relative error")
        ax.set_title(f"{v['name']}: loss", fontsize=9)
        ax.legend(fontsize=7)
        _head_lines(row[1], st, np.asarray(ol["singular_values"]["kq_xx"]),
                    r"singular values of $W_Q^\top W_K$, x–x block (per head)")
        _head_lines(row[2], st, np.asarray(ol["singular_values"]["ov_yy"]),
                    r"singular values of $W_O W_V$, y←y block (per head)")
        row[1].legend(fontsize=7, loc="upper left")
        m = np.asarray(ol["m_full_context"])
        conc = ol["m_full_context_concurrency"]
        for a, (s, c) in enumerate(zip(strengths, colors)):
            row[3].plot(st, m[:, a], color=c, lw=1.6, label=f"s={s:g}")
            hp = conc.get("half_points")
            if hp is not None and np.isfinite(hp[a]):
                row[3].axvline(hp[a], color=c, lw=0.7, ls=":")
        idx = conc.get("index")
        row[3].set_title(f"in-context recovery with N samples, m_α(N)\nhalf-steps (dotted) spread index "
                         f"{'n/a' if idx is None else f'{idx:.2f}'}", fontsize=9)
        row[3].set_ylabel(r"$m_\alpha(N)$")
        row[3].legend(fontsize=7, ncol=2)
        for ax in row:
            _symlog_steps(ax, st)
    return _save(fig, path)


def plot_icl_in_context(path: str | Path, strengths: np.ndarray, variants: Sequence[dict], *, ridge: float) -> Path:
    """One panel per variant: the trained model's m_α(k) per mode vs min-norm, ridge (mode mean) and Bayes."""
    n = len(variants)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 4.6), squeeze=False)
    colors = _mode_colors(strengths.size)
    for ax, v in zip(axes[0], variants):
        ic = v["in_context"]
        ks = np.asarray(ic["x"])
        est = ic["estimators"]
        ax.plot(ks, ic["min_norm_closed_form"], "k-", lw=1.5, label="min-norm = Bayes (rotation prior)"
                if v["prior"] == "rotation" else "min-norm")
        ax.plot(ks, np.asarray(est["ridge"]["mean"]).mean(1), color="0.5", ls="--", lw=1.5,
                label=f"ridge λ={ridge:g} (mode mean)")
        for a, (s, c) in enumerate(zip(strengths, colors)):
            mean, sem = np.asarray(ic["mean"])[:, a], np.asarray(ic["sem"])[:, a]
            ax.fill_between(ks, mean - sem, mean + sem, color=c, alpha=0.2, lw=0)
            ax.plot(ks, mean, color=c, lw=1.8, label=f"model, s={s:g}")
            if v["prior"] != "rotation":
                ax.plot(ks, np.asarray(est["bayes"]["mean"])[:, a], color=c, lw=1, ls=":",
                        label="Bayes (Gaussian prior)" if a == 0 else None)
        ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
        c = ic["concurrency"]
        ax.set_title(f"{v['name']}: in-context recovery\nmodel {_conc_label(c)}", fontsize=9)
        ax.set_xlabel("k (context samples)")
        ax.set_ylabel(r"$m_\alpha(k)$")
        ax.legend(fontsize=6.5, loc="lower right")
    return _save(fig, path)


def plot_icl_cosines(path: str | Path, variants: Sequence[dict]) -> Path:
    """Per variant: weighted cosine of each head's full W_QᵀW_K and of its x–x block, with the null
    bands (shaded), and ω = tr(M_xx)/N_x printed above each head."""
    n = len(variants)
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
    for ax, v in zip(axes[0], variants):
        cos = v["cosines"]
        heads = cos["heads"]
        x = np.arange(len(heads))
        full = [h["full_weighted_cosine"] for h in heads]
        xx = [h["xx_weighted_cosine"] for h in heads]
        ax.bar(x - 0.2, full, 0.4, color="tab:blue", label="full W_QᵀW_K", zorder=2)
        ax.bar(x + 0.2, xx, 0.4, color="tab:red", label="x–x block", zorder=2)
        lo, hi = cos["null_full"]["weighted_band"]
        ax.axhspan(lo, hi, color="tab:blue", alpha=0.12, zorder=0,
                   label=f"null {cos['null_full']['percentile']:g}% band (full)")
        lo, hi = cos["null_xx"]["weighted_band"]
        ax.axhspan(lo, hi, color="tab:red", alpha=0.12, zorder=0, label="null band (x–x block)")
        for i, h in enumerate(heads):
            ax.text(i, 1.08, f"ω={h['omega']:.2f}", ha="center", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels([f"L{h['layer']}H{h['head']}" for h in heads], fontsize=8)
        ax.set_ylim(-1.15, 1.2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("weighted cosine Σσcos/Σσ")
        ax.set_title(f"{v['name']}: QK similarity", fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
