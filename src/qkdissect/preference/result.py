"""The attention-preference result (``qkdissect-preference``): axes, bootstrap intervals, :class:`PreferenceResult`."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from qkdissect.errors import QKDissectError
from qkdissect.synthetic.oddoneout import Problem

__all__ = ["AXES", "CATEGORIES", "FORMAT", "FORMAT_VERSION", "QUERIES", "VARIANTS", "Interval", "PreferenceResult",
           "axis_index", "bootstrap_mean", "json_number", "quiet_nan_means", "summarise"]

QUERIES = ("target", "distractor")
VARIANTS = ("raw", "area", "noself")
CATEGORIES = ("same", "other", "background")
FORMAT, FORMAT_VERSION = "qkdissect-preference", 1
AXES = ("image", "layer", "head", "query", "source", "variant", "category")


@contextlib.contextmanager
def quiet_nan_means():
    """Means of empty or all-NaN slices are NaN by design here: silence numpy's warnings."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield



@dataclass(frozen=True)
class Interval:
    """Mean over images and its percentile-bootstrap interval [lo, hi]; arrays of equal shape."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def __getitem__(self, index) -> "Interval":
        return Interval(self.mean[index], self.lo[index], self.hi[index])


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                   chunk: int = 4096) -> Interval:
    """Mean over axis 0 (images, NaN ignored) with a percentile bootstrap interval.

    values (n, ...) -> Interval of arrays (...). Each of ``n_boot`` resamples draws n images with
    replacement (multinomial counts c), its mean is Σ c_i v_i / Σ c_i [v_i finite]. The same
    resamples (same ``seed``) are used for every entry, so intervals of linear combinations
    of entries are consistent.
    """
    if not 0 < confidence < 1:
        raise QKDissectError(f"confidence must be in (0, 1), got {confidence}.")
    values = np.asarray(values, dtype=np.float64)
    n, shape = values.shape[0], values.shape[1:]
    flat = values.reshape(n, int(np.prod(shape, dtype=np.int64)))
    finite = np.isfinite(flat)
    with quiet_nan_means():
        mean = np.where(finite, flat, 0.0).sum(axis=0) / finite.sum(axis=0)
    if n == 0 or n_boot < 1:
        return Interval(mean.reshape(shape), np.full(shape, np.nan), np.full(shape, np.nan))
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    tails = [50 * (1 - confidence), 100 - 50 * (1 - confidence)]
    lo, hi = np.empty(flat.shape[1]), np.empty(flat.shape[1])
    for start in range(0, flat.shape[1], chunk):
        part = slice(start, start + chunk)
        with quiet_nan_means():
            boot = (counts @ np.where(finite[:, part], flat[:, part], 0.0)) / (counts @ finite[:, part])
            percentile = np.nanpercentile if np.isnan(boot).any() else np.percentile
            lo[part], hi[part] = percentile(boot, tails, axis=0)
    return Interval(mean.reshape(shape), lo.reshape(shape), hi.reshape(shape))


@dataclass(frozen=True)
class PreferenceResult:
    """Attention preference of one model on one data set.

    ``shares`` (n_images, L, H, Q, S, V, C) and ``prefix`` (n_images, L, H, Q, S) per image (NaN:
    query unavailable); ``layer``/``head`` intervals (L, Q, S, V, C) / (L, H, Q, S, V, C);
    ``prefix_layer``/``prefix_head`` (L, Q, S) / (L, H, Q, S). Axis labels: ``layers`` (the
    model's layer indices), ``sources`` ("measured", "modes", "top1", ...), :data:`QUERIES`,
    :data:`VARIANTS`, :data:`CATEGORIES`. ``meta`` is preference.json without the big tables.
    """

    meta: dict[str, Any]
    layers: tuple[int, ...]
    sources: tuple[str, ...]
    names: tuple[str, ...]
    shares: np.ndarray
    prefix: np.ndarray
    layer: Interval
    head: Interval
    prefix_layer: Interval
    prefix_head: Interval
    skipped: dict[str, int] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()

    def curve(self, query: str = "target", source: str = "measured", variant: str = "raw",
              category: str = "same", head: int | None = None) -> Interval:
        """One curve over depth: arrays (L,), for the head mean or one ``head``."""
        index = (axis_index(QUERIES, query, "query"), axis_index(self.sources, source, "source"),
                 axis_index(VARIANTS, variant, "variant"), axis_index(CATEGORIES, category, "category"))
        if head is None:
            return self.layer[(slice(None), *index)]
        return self.head[(slice(None), head, *index)]

    def n_images(self, query: str = "target") -> int:
        """Images with an available query of this kind."""
        column = self.shares[:, 0, 0, axis_index(QUERIES, query, "query"), 0, 0, 0]
        return int(np.isfinite(column).sum())


def axis_index(names: Sequence[str], name: str, what: str) -> int:
    if name not in names:
        raise QKDissectError(f"unknown {what} {name!r}; expected one of {', '.join(names)}.")
    return list(names).index(name)


def summarise(shares: np.ndarray, prefix: np.ndarray, n_boot: int, confidence: float,
              seed: int) -> tuple[Interval, Interval, Interval, Interval]:
    """(layer, head, prefix_layer, prefix_head) intervals; layer values are head means per image."""
    def stats(values):
        return bootstrap_mean(values, n_boot, confidence, seed)

    with quiet_nan_means():
        layer_shares, layer_prefix = np.nanmean(shares, axis=2), np.nanmean(prefix, axis=2)
    return stats(layer_shares), stats(shares), stats(layer_prefix), stats(prefix)




def json_number(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)
