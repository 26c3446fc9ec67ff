"""Shared pieces of the dynamics figures: the Agg backend, saving, thinning markers, mode colours."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["DPI", "mode_colors", "plt", "save_figure", "thin"]

DPI = 130


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out ``fig``, write it as a PNG to ``path`` (folders created), close it and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=DPI)
    plt.close(fig)
    return p


def thin(n: int, k: int = 60) -> slice:
    """A slice that keeps about ``k`` of ``n`` points (markers on long curves)."""
    return slice(None, None, max(1, n // k))


def mode_colors(n: int) -> np.ndarray:
    """``(n, 4)`` RGBA colours for n modes, strongest (first) darkest (viridis)."""
    return plt.cm.viridis(np.linspace(0.0, 0.88, n))
