"""Matplotlib figures of query-key mode statistics (Agg backend; PNG files)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from qkdissect.decomposition import ModeAtlas

__all__ = ["new_figure", "plot_compare", "plot_layer_similarity", "plot_mode_cosines", "save_figure"]

NULL_COLOR = "#bbbbbb"


def new_figure(width: float = 7.0, height: float = 4.0):
    """A (figure, axes) pair on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=110)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG (tight layout) and close it; written to a temporary name and renamed, so a reader
    never sees half a file."""
    import matplotlib.pyplot as plt

    from qkdissect.files import atomic_write

    path = Path(path)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path


def _layer_ticks(ax, n_layers: int) -> None:
    """Every layer up to 16 layers, then every k-th so that labels do not collide."""
    step = max(1, -(-n_layers // 16))
    ax.set_xticks(np.arange(0, n_layers, step))


def _title(atlas: ModeAtlas) -> str:
    return f"{atlas.meta.get('model', '?')}  ({atlas.n_layers} layers × {atlas.n_heads} heads)"


def _null_band(ax, atlas: ModeAtlas, which: str) -> None:
    """The null band: one span, or one per layer when layers differ in shape (per-layer nulls)."""
    label = f"null ({atlas.null.percentile:g}% band)"
    if atlas.layer_nulls is None:
        lo, hi = getattr(atlas.null, which)
        ax.axhspan(lo, hi, color=NULL_COLOR, alpha=0.5, lw=0, label=label)
        return
    for layer, null in enumerate(atlas.layer_nulls):
        lo, hi = getattr(null, which)
        ax.fill_between([layer - 0.45, layer + 0.45], lo, hi, color=NULL_COLOR, alpha=0.5, lw=0,
                        label=label if layer == 0 else None)


def plot_distance_curves(atlas: ModeAtlas, path: str | os.PathLike) -> Path:
    """Rotary models: head-mean weighted cosine C(|Δ|) of the offset-averaged form against the distance
    between query and key, one line per layer (colour = depth)."""
    import matplotlib

    fig, ax = new_figure()
    cmap = matplotlib.colormaps["viridis"]
    rotary = [(i, layer.positional) for i, layer in enumerate(atlas.layers)
              if layer.positional is not None and layer.positional.distance_cosine is not None]
    for i, stats in rotary:
        curve = stats.distance_cosine.double().mean(dim=0).numpy()
        ax.plot(stats.distances.double().numpy(), curve, "-o", ms=2.5, lw=1.2,
                color=cmap(i / max(1, atlas.n_layers - 1)), label=f"layer {i}" if len(rotary) <= 12 else None)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("query–key distance |Δ| (patches or tokens)")
    ax.set_ylabel("mean over heads of C_h(|Δ|)")
    ax.set_title(_title(atlas) + " — similarity against distance", fontsize=9)
    if len(rotary) <= 12:
        ax.legend(fontsize=7, ncol=2, loc="best")
    return save_figure(fig, path)


def plot_layer_similarity(atlas: ModeAtlas, path: str | os.PathLike) -> Path:
    """Weighted cosine C_h per layer: each head a dot, mean ± std, the Gaussian null band shaded."""
    fig, ax = new_figure()
    weighted = atlas.weighted_cosines.double().numpy()  # NaN where a layer has fewer heads (Swin stages)
    layers = np.arange(atlas.n_layers)
    _null_band(ax, atlas, "weighted_band")
    ax.axhline(0, color="k", lw=0.6)
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.15, 0.15, size=weighted.shape)
    ax.scatter(layers[:, None] + jitter, weighted, s=12, alpha=0.6, color="tab:blue", label="heads")
    with np.errstate(invalid="ignore"), warnings.catch_warnings():  # heads of rank 0 (NaN) are left out
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(weighted, axis=1), np.nanstd(weighted, axis=1)
    ax.fill_between(layers, mean - std, mean + std, color="tab:orange", alpha=0.25, lw=0)
    ax.plot(layers, mean, "-o", color="tab:orange", ms=4, label="mean ± std")
    ax.set_xlabel("layer")
    ax.set_ylabel("weighted cosine  Σσcos / Σσ")
    _layer_ticks(ax, atlas.n_layers)
    ax.set_title(_title(atlas), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_mode_cosines(atlas: ModeAtlas, path: str | os.PathLike) -> Path:
    """Distribution of per-mode cosines u_k·v_k by layer (violins), null band shaded."""
    fig, ax = new_figure()
    cosines = atlas.cosines.double().numpy().reshape(atlas.n_layers, -1)
    per_layer = [(layer, values[np.isfinite(values)]) for layer, values in enumerate(cosines)]
    per_layer = [(layer, values) for layer, values in per_layer if values.size]  # undefined modes (NaN) left out
    _null_band(ax, atlas, "cosine_band")
    ax.axhline(0, color="k", lw=0.6)
    if per_layer:
        parts = ax.violinplot([values for _, values in per_layer], positions=[layer for layer, _ in per_layer],
                              showmedians=True, widths=0.8)
        for body in parts["bodies"]:
            body.set_alpha(0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("per-mode cosine  u_k · v_k")
    _layer_ticks(ax, atlas.n_layers)
    ax.set_title(_title(atlas), fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


class DepthProfile(Protocol):
    """What :func:`plot_compare` reads of a model (e.g. :class:`qkdissect.comparison.ComparedModel`)."""

    @property
    def relative_depth(self) -> Sequence[float]: ...
    @property
    def means(self) -> Sequence[float]: ...
    @property
    def stds(self) -> Sequence[float]: ...
    @property
    def band(self) -> tuple[float, float]: ...


def plot_compare(models: Sequence[DepthProfile], labels: Sequence[str], path: str | os.PathLike) -> Path:
    """Mean weighted cosine (± std over heads) against relative depth for several models
    (:class:`qkdissect.comparison.ComparedModel`), each with its own null band (dotted)."""
    fig, ax = new_figure()
    ax.axhline(0, color="k", lw=0.6)
    for model, label in zip(models, labels):
        depth, mean, std = (np.asarray(v, dtype=float) for v in (model.relative_depth, model.means, model.stds))
        (line,) = ax.plot(depth, mean, "-o", ms=4, label=label)
        ax.fill_between(depth, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
        for bound in model.band:
            ax.axhline(bound, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("relative depth (layer / (n_layers − 1))")
    ax.set_ylabel("mean weighted cosine")
    ax.set_title("query-key similarity by depth (dotted: null bands)", fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
