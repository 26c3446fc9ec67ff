"""Figures of attention-preference results (see :mod:`qkdissect.preference`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qkdissect.preference.result import CATEGORIES, QUERIES, PreferenceResult

__all__ = ["plot_preference", "plot_preference_modes"]

COLOURS = {"same": "tab:red", "other": "tab:blue", "background": "0.45"}
LABELS = {"target": {"same": "same object (target)", "other": "other objects (distractors)",
                     "background": "background"},
          "distractor": {"same": "same object (that distractor)", "other": "other objects (target + distractors)",
                         "background": "background"}}


def _title(result: PreferenceResult) -> str:
    data = result.meta.get("data", {})
    return (f"{result.meta.get('model', '?')} on {Path(str(data.get('root', '?'))).name} "
            f"({result.meta.get('n_images', {}).get('used', len(result.names))} images, "
            f"{int(100 * result.meta.get('bootstrap', {}).get('confidence', 0.95))}% bootstrap intervals)")


def plot_preference(result: PreferenceResult, path: str | os.PathLike) -> Path:
    """2×2 panels: raw and area-normalised shares (rows) for target and distractor queries
    (columns); one curve per category over depth, shaded bootstrap intervals."""
    from qkdissect.plots import new_figure, save_figure

    fig, axes = new_figure(11.0, 7.0)
    fig.clf()
    axes = fig.subplots(2, 2, sharex=True)
    depth = np.asarray(result.layers)
    for column, query in enumerate(QUERIES):
        for row, variant in enumerate(("raw", "area")):
            ax = axes[row, column]
            for category in CATEGORIES:
                curve = result.curve(query, "measured", variant, category)
                ax.fill_between(depth, curve.lo, curve.hi, color=COLOURS[category], alpha=0.2, lw=0)
                ax.plot(depth, curve.mean, "-o", ms=3.5, color=COLOURS[category], label=LABELS[query][category])
            if variant == "area":
                ax.axhline(1.0, color="k", lw=0.6, ls=":")
                ax.set_ylabel("attention per unit area\n(1 = uniform)")
            else:
                ax.set_ylim(-0.02, 1.02)
                ax.set_ylabel("share of attention")
            ax.set_title(f"{query} query (n = {result.n_images(query)}): "
                         f"{'raw shares' if variant == 'raw' else 'area-normalised'}", fontsize=9)
            ax.set_xticks(depth)
            ax.grid(alpha=0.25)
            if row == 1:
                ax.set_xlabel("layer")
            if variant == "raw":
                ax.legend(fontsize=7.5, loc="best")
    fig.suptitle(_title(result), fontsize=9.5)
    return save_figure(fig, path)


def plot_preference_modes(result: PreferenceResult, path: str | os.PathLike) -> Path:
    """2×3 panels (queries × categories): measured area-normalised share with interval, the
    prediction from all modes (markers), and from the top-m modes (dashed)."""
    from qkdissect.plots import new_figure, save_figure

    fig, _ = new_figure(13.0, 6.5)
    fig.clf()
    axes = fig.subplots(2, 3, sharex=True)
    depth = np.asarray(result.layers)
    tops = [s for s in result.sources if s.startswith("top")]
    shades = [f"C{i + 1}" for i in range(len(tops))]
    for row, query in enumerate(QUERIES):
        for column, category in enumerate(CATEGORIES):
            ax = axes[row, column]
            ax.axhline(1.0, color="k", lw=0.6, ls=":")
            measured = result.curve(query, "measured", "area", category)
            ax.fill_between(depth, measured.lo, measured.hi, color="k", alpha=0.15, lw=0)
            ax.plot(depth, measured.mean, "-", color="k", lw=1.6, label="measured")
            ax.plot(depth, result.curve(query, "modes", "area", category).mean, "o", mfc="none", color="C0",
                    ms=6, label="all modes")
            for source, colour in zip(tops, shades):
                m = int(source[3:])
                ax.plot(depth, result.curve(query, source, "area", category).mean, "--", color=colour, lw=1.1,
                        label="key bias only" if m == 0 else f"top {m} mode{'s' if m != 1 else ''}")
            ax.set_title(f"{query} query → {LABELS[query][category]}", fontsize=8.5)
            ax.set_xticks(depth)
            ax.grid(alpha=0.25)
            if row == 1:
                ax.set_xlabel("layer")
            if column == 0:
                ax.set_ylabel("attention per unit area\n(1 = uniform)")
    axes[0, 0].legend(fontsize=7.5, loc="best")
    fig.suptitle("measured vs. predicted from QK modes — " + _title(result), fontsize=9.5)
    return save_figure(fig, path)
