"""Figures of the learner / meta-learner / in-context transformer experiments (``metalearn``, ``icl``).

Each function takes the runner's JSON-ready dictionaries, writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from qkdissect.dynamics.plots.common import mode_colors, plt, save_figure

__all__ = [
    "plot_metalearn",
    "plot_meta_training",
    "plot_icl_outer_loop",
    "plot_icl_in_context",
    "plot_icl_cosines",
]


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
    colors = mode_colors(strengths.size)
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)


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
    colors = mode_colors(strengths.size)
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
    return save_figure(fig, path)


def plot_icl_in_context(path: str | Path, strengths: np.ndarray, variants: Sequence[dict], *, ridge: float) -> Path:
    """One panel per variant: the trained model's m_α(k) per mode vs min-norm, ridge (mode mean) and Bayes."""
    n = len(variants)
    fig, axes = plt.subplots(1, n, figsize=(4.8 * n, 4.6), squeeze=False)
    colors = mode_colors(strengths.size)
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
    return save_figure(fig, path)


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
    return save_figure(fig, path)
