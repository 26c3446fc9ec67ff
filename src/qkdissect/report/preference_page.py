"""The report's preference page and per-head preference tables, from ``qkdissect preference`` output
(read with :func:`qkdissect.preference.load_preference`; folder format in that module's docstring).

Page: provenance, the two figures of :mod:`qkdissect.preference` regenerated into the report's img/,
per layer the same / other / background shares (raw with bootstrap interval, area-normalised, query
token excluded, prefix), measured vs. predicted from the modes, and a layer × head grid of the
area-normalised attention of target queries to their own object (coloured on log₂ around 1 =
uniform; cells open the head pages). Head pages: the same numbers for that head.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qkdissect.preference import CATEGORIES, QUERIES, VARIANTS
from qkdissect.report.charts import diverging_color, text_color

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["head_preference", "preference_context", "preference_mismatch"]

CATEGORY_LABELS = {"target": ("same object (target)", "other objects", "background"),
                   "distractor": ("same object (that distractor)", "other objects", "background")}


def preference_mismatch(result, atlas: ModeAtlas) -> str | None:
    """A sentence when the preference result cannot belong to this atlas's model (other shape), else None."""
    meta = result.meta
    shape = (meta.get("n_layers"), meta.get("n_heads"))
    if shape != (atlas.n_layers, atlas.n_heads):
        return (f"the preference result is for a model with {shape[0]} layers × {shape[1]} heads, this atlas has "
                f"{atlas.n_layers} × {atlas.n_heads}: per-head preference is not shown on the head pages.")
    return None


def _f(value: float, digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _interval_text(curve, index) -> dict[str, str]:
    return {"mean": _f(curve.mean[index]), "range": f"[{_f(curve.lo[index])}–{_f(curve.hi[index])}]"}


def _layer_rows(result, query: str) -> list[dict[str, Any]]:
    q = QUERIES.index(query)
    rows = []
    for index, layer in enumerate(result.layers):
        rows.append({
            "layer": layer,
            "raw": [_interval_text(result.curve(query, "measured", "raw", c), index) for c in CATEGORIES],
            "area": [_f(result.curve(query, "measured", "area", c).mean[index]) for c in CATEGORIES],
            "noself": [_f(result.curve(query, "measured", "noself", c).mean[index]) for c in CATEGORIES],
            "prefix": _f(result.prefix_layer.mean[index, q, 0]),
        })
    return rows


def _prediction_rows(result, query: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Area-normalised same-object attention: measured vs. every prediction source."""
    sources = [s for s in result.sources if s != "measured"]
    rows = [{"layer": layer, "measured": _f(result.curve(query, "measured", "area", "same").mean[index]),
             "predicted": [_f(result.curve(query, s, "area", "same").mean[index]) for s in sources]}
            for index, layer in enumerate(result.layers)]
    names = ["all modes" if s == "modes" else "key bias only" if s == "top0" else f"top {s[3:]}" if s.startswith("top")
             else s for s in sources]
    return names, rows


def _head_grid(result, page_of, n_heads: int) -> dict[str, Any]:
    """Layer × head grid of log₂(area-normalised same-object attention of target queries)."""
    index = (QUERIES.index("target"), result.sources.index("measured"), VARIANTS.index("area"),
             CATEGORIES.index("same"))
    curve = result.head[(slice(None), slice(None), *index)].mean  # (L, H)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log2(np.asarray(curve, dtype=np.float64))
    finite = np.abs(logs[np.isfinite(logs)])
    vmax = float(finite.max()) if finite.size else 1.0
    vmax = max(vmax, 1e-3)
    rows = []
    for index, layer in enumerate(result.layers):
        cells = []
        for head in range(min(n_heads, curve.shape[1])):
            value, log = float(curve[index, head]), float(logs[index, head])
            ok = math.isfinite(log)
            cells.append({"head": head, "value": value, "text": _f(value, 2),
                          "bg": diverging_color(log, vmax) if ok else "#ffffff",
                          "fg": text_color(log, vmax) if ok else "#999999", "href": page_of(layer, head)})
        rows.append({"layer": layer, "cells": cells})
    return {"rows": rows, "vmax": 2 ** vmax, "n_heads": min(n_heads, curve.shape[1])}


def preference_context(result, atlas: ModeAtlas, images: Path, page_of) -> dict[str, Any]:
    """Template context of preference.html; regenerates the two figures into ``images``.

    ``page_of(layer, head)`` gives the relative URL of a head page from the report root.
    """
    from qkdissect.preference.plots import plot_preference, plot_preference_modes
    from qkdissect.report.assets import png_size

    figures = []
    for plot, name, alt, caption in (
        (plot_preference, "preference.png", "same, other and background attention over depth",
         "Share of a query's attention on its own object, the other objects and the background (top: raw shares, "
         "bottom: per unit area, 1 = uniform); shaded: bootstrap intervals over images."),
        (plot_preference_modes, "preference_modes.png", "measured vs. predicted from the modes",
         "Area-normalised shares measured and predicted from all QK modes and from the leading modes only."),
    ):
        path = plot(result, images / name)
        width, height = png_size(path)
        figures.append({"src": f"img/{name}", "alt": alt, "caption": caption, "width": width, "height": height})
    meta = result.meta
    data = meta.get("data") or {}
    counts = meta.get("n_images") or {}
    boot = meta.get("bootstrap") or {}
    agreement = (meta.get("agreement") or {}).get("max_abs_diff_modes_vs_measured") or []
    card = [
        ("model", meta.get("model")), ("data", f"{data.get('root', '?')} ({data.get('kind', '?')})"),
        ("images", f"{counts.get('used', len(result.names))} used of {counts.get('listed', '?')} listed; "
                   f"target queries {counts.get('target_query', '?')}, distractor queries "
                   f"{counts.get('distractor_query', '?')}"),
        ("skipped", ", ".join(f"{k}: {v}" for k, v in result.skipped.items()) or "none"),
        ("patch grid", "×".join(str(v) for v in meta.get("patch_grid", [])) or "?"),
        ("query threshold", (meta.get("protocol") or {}).get("threshold")),
        ("bootstrap", f"{boot.get('samples', '?')} resamples of images, {boot.get('confidence', '?')} intervals"),
        ("modes vs. measured", f"max |Δattention| {max(agreement):.2e}" if agreement else "—"),
        ("created", meta.get("created")),
    ]
    mismatch = preference_mismatch(result, atlas)
    if not mismatch and meta.get("model") != atlas.meta.get("model"):
        mismatch = (f"the preference result names the model {meta.get('model')!s}, the atlas "
                    f"{atlas.meta.get('model')!s}; the shapes agree, so per-head preference is shown.")
    queries = []
    for query in QUERIES:
        names, predictions = _prediction_rows(result, query)
        queries.append({"query": query, "n": result.n_images(query), "labels": CATEGORY_LABELS[query],
                        "rows": _layer_rows(result, query), "prediction_names": names, "predictions": predictions})
    grid = None if preference_mismatch(result, atlas) else _head_grid(result, page_of, atlas.n_heads)
    return {"figures": figures, "card": [(k, "—" if v is None else str(v)) for k, v in card], "mismatch": mismatch,
            "queries": queries, "grid": grid,
            "problems": [(p.name, p.kind, p.detail) for p in result.problems[:100]],
            "n_problems": len(result.problems)}


def head_preference(result, layer: int, head: int) -> dict[str, Any] | None:
    """This head's same / other / background shares (raw with interval, area-normalised) per query,
    beside the layer's mean over heads; None when the layer was not analysed."""
    if layer not in result.layers or head >= result.head.mean.shape[1]:
        return None
    index = result.layers.index(layer)
    rows = []
    for query in QUERIES:
        raw = [_interval_text(result.curve(query, "measured", "raw", c, head=head), index) for c in CATEGORIES]
        rows.append({"query": query, "n": result.n_images(query), "raw": raw,
                     "area": [_f(result.curve(query, "measured", "area", c, head=head).mean[index])
                              for c in CATEGORIES],
                     "layer_raw": [_f(result.curve(query, "measured", "raw", c).mean[index]) for c in CATEGORIES]})
    return {"rows": rows}
