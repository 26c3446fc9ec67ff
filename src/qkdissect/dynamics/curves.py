"""Statistics of sampled curves shared by the dynamics modules: crossings, minima, robust summaries.

Every function is pure numpy. A *curve* is a ``(T, ...)`` array of values recorded at increasing
times ``steps`` ``(T,)`` (epochs, SGD steps, context sizes k or checkpoints).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
from scipy import optimize

__all__ = ["coefficient_of_variation", "curve_minimum", "first_crossing", "nanmedian", "nanquantile", "staggering"]


def first_crossing(curves: np.ndarray, levels: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """First time each curve reaches its level (linear interpolation between records).

    Args:
        curves: ``(T, ...)`` values over time.
        levels: broadcastable to ``curves.shape[1:]``.
        steps: ``(T,)`` times of the records.
    Returns:
        ``curves.shape[1:]`` array of times; NaN where the level is never reached. A curve that
        starts at or above its level gives ``steps[0]``.
    """
    c = np.asarray(curves, dtype=np.float64)
    lv = np.broadcast_to(levels, c.shape[1:])
    above = c >= lv
    idx = np.argmax(above, axis=0)
    reached = np.any(above, axis=0)
    out = np.full(c.shape[1:], np.nan)
    for pos in zip(*np.nonzero(reached)):
        i = idx[pos]
        if i == 0:
            out[pos] = steps[0]
            continue
        y0, y1 = c[(i - 1, *pos)], c[(i, *pos)]
        frac = (lv[pos] - y0) / (y1 - y0) if y1 != y0 else 1.0
        out[pos] = steps[i - 1] + frac * (steps[i] - steps[i - 1])
    return out


def curve_minimum(
    times: np.ndarray, values: np.ndarray, refine: Callable[[float], float] | None = None
) -> tuple[float, float]:
    """Location and value of the minimum of a sampled curve ``values`` ``(T,)`` at ``times`` ``(T,)``.

    With ``refine`` (the continuous function), Brent's method on the bracket around the grid
    minimum; otherwise a parabola through the grid minimum and its two neighbours.
    """
    i = int(np.nanargmin(values))
    lo, hi = max(i - 1, 0), min(i + 1, len(times) - 1)
    if refine is not None and lo < i < hi:
        res = optimize.minimize_scalar(
            refine, bounds=(float(times[lo]), float(times[hi])), method="bounded",
            options={"xatol": 1e-6 * max(1.0, float(times[hi]))},
        )
        return float(res.x), float(res.fun)
    if lo < i < hi:
        x = times[lo : hi + 1].astype(np.float64)
        y = values[lo : hi + 1].astype(np.float64)
        denom = (y[0] - 2 * y[1] + y[2])
        if denom > 0:
            h = x[1] - x[0]
            shift = 0.5 * h * (y[0] - y[2]) / denom
            return float(x[1] + shift), float(y[1] - 0.25 * (y[0] - y[2]) * shift / h)
    return float(times[i]), float(values[i])


def nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    """Median ignoring NaN; all-NaN slices (e.g. after an early stop) give NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)


def nanquantile(x: np.ndarray, q: float | np.ndarray, axis: int) -> np.ndarray:
    """``np.nanquantile`` without the all-NaN warning (those slices give NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(np.asarray(x, dtype=np.float64), q, axis=axis)


def coefficient_of_variation(points: np.ndarray) -> float:
    """std / mean of ``points`` ``(n,)`` (population std); NaN when the mean is not positive."""
    pts = np.asarray(points, dtype=np.float64)
    mean = float(np.mean(pts))
    return float(np.std(pts) / mean) if mean > 0 else float("nan")


def staggering(steps: np.ndarray, values: np.ndarray, *, min_share: float = 0.1) -> dict[str, Any]:
    """Half-times of growing quantities and how staggered they are.

    Args:
        steps: ``(C,)`` checkpoint steps; values: ``(C, ..., r)`` (e.g. singular values per head).
        min_share: quantities whose final value is below this share of the largest final value in
            their group (the last axis) are left out (they are not learned, their half-time is noise).
    Returns:
        ``half_times`` ``(..., r)`` (first step at half the final value; NaN if left out or never),
        ``index`` ``(...)`` = std/mean of the kept half-times (0 = simultaneous), and
        ``largest_first`` ``(...)``: True when the kept half-times increase as the final value decreases.
    """
    v = np.abs(np.asarray(values, dtype=np.float64))
    final = v[-1]
    ht = first_crossing(v, 0.5 * final, np.asarray(steps, dtype=np.float64))
    keep = final >= min_share * final.max(-1, keepdims=True)
    ht = np.where(keep, ht, np.nan)
    flat_ht = ht.reshape(-1, ht.shape[-1])
    flat_final = final.reshape(-1, final.shape[-1])
    index, order = [], []
    for h, f in zip(flat_ht, flat_final):
        ok = np.isfinite(h)
        pts = h[ok]
        index.append(coefficient_of_variation(pts) if pts.size > 1 else float("nan"))
        by_size = pts[np.argsort(-f[ok], kind="stable")]
        order.append(bool(np.all(np.diff(by_size) >= 0)) if pts.size > 1 else None)
    shape = ht.shape[:-1]
    return {"half_times": ht, "index": np.asarray(index).reshape(shape),
            "largest_first": np.asarray(order, dtype=object).reshape(shape).tolist()}
