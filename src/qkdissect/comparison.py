"""Several models side by side over relative depth: :func:`compare`, and its folder format ``qkdissect-compare``.

For model m with L_m layers, layer l sits at relative depth l / (L_m − 1); per layer the mean and standard
deviation over heads of the weighted cosine C_h = Σσcos/Σσ = tr(M)/‖M‖_* are kept, with the model's own null band
(models of different shapes have different nulls).

Folder written by :meth:`Comparison.save` (read with :func:`load_compare`)::

    compare.json   {"format": "qkdissect-compare", "format_version": 1, "created", "versions",
                    "models": [{label, model, family, atlas, n_layers, n_heads, d_model, d_head, null_band,
                                weighted_cosines (L, H), layers: atlas.layer_summary() rows}]}
    compare.png    mean C_h (± std over heads) against relative depth, dotted null bands

:func:`depth_trend` summarises a model's early-vs-late trend: the least-squares slope of the layer-mean C_h against
relative depth, with a bootstrap confidence interval over heads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qkdissect.decomposition import ModeAtlas
from qkdissect.errors import QKDissectError
from qkdissect.files import library_versions, read_json_document, timestamp
from qkdissect.formats import finite_or_none

__all__ = ["FORMAT", "FORMAT_VERSION", "ComparedModel", "Comparison", "DepthTrend", "compare", "depth_trend", "depth_trend_per_layer",
           "load_compare"]

FORMAT, FORMAT_VERSION = "qkdissect-compare", 1


@dataclass(frozen=True)
class DepthTrend:
    """Early-vs-late trend of one model's weighted cosine C_h over relative depth.

    ``slope``: least-squares slope of the layer mean m_l = mean_h C_{l,h} against x_l = l / (L − 1)
    (C per unit of relative depth: slope × 1 = the change from first to last layer along the fitted line);
    ``low``/``high``: the central ``level`` percentile interval of the slope over ``samples`` bootstrap
    resamplings of the heads (each layer's H heads drawn with replacement, independently per layer);
    ``early``/``late``: mean C_h over the layers with x ≤ 1/3 and x ≥ 2/3. NaN where undefined (one layer).
    """

    slope: float
    low: float
    high: float
    early: float
    late: float
    level: float
    samples: int

    @property
    def direction(self) -> str:
        """"rises" / "falls" when the interval excludes 0, else "flat" ("?" when undefined)."""
        if not np.isfinite(self.slope):
            return "?"
        return "rises" if self.low > 0 else "falls" if self.high < 0 else "flat"

    def to_json(self) -> dict[str, Any]:
        return {name: (None if isinstance(value, float) and not np.isfinite(value) else value)
                for name, value in vars(self).items()}


def depth_trend_per_layer(rows: Sequence[Sequence[float]], *, samples: int = 2000, level: float = 0.95,
                          seed: int = 0) -> "DepthTrend":
    """:func:`depth_trend` for layers with different numbers of heads (Swin's stages): ``rows[l]`` the weighted
    cosines of layer l's own heads; each layer's mean, and the bootstrap resamples each layer's own heads."""
    rows = [np.asarray(row, dtype=float) for row in rows]
    if not rows or any(row.ndim != 1 or row.size == 0 or not np.isfinite(row).all() for row in rows):
        raise QKDissectError("depth_trend needs finite weighted cosines of at least one head per layer; "
                             "re-run `qkdissect dissect`.")
    if samples < 1 or not 0 < level < 1:
        raise QKDissectError(f"depth_trend needs samples ≥ 1 and 0 < level < 1, got {samples} and {level}.")
    n_layers = len(rows)
    depth = np.arange(n_layers) / max(n_layers - 1, 1)
    means = np.array([row.mean() for row in rows])
    early, late = (float(means[part].mean()) if part.any() else float("nan")
                   for part in (depth <= 1 / 3, (depth >= 2 / 3) & (n_layers > 1)))
    if n_layers < 2:
        nan = float("nan")
        return DepthTrend(nan, nan, nan, early, late, level, samples)
    centred = depth - depth.mean()
    weights = centred / (centred @ centred)
    rng = np.random.default_rng(seed)
    resampled = np.stack([row[rng.integers(0, len(row), size=(samples, len(row)))].mean(axis=1) for row in rows], 1)
    slopes = resampled @ weights
    low, high = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return DepthTrend(float(means @ weights), float(low), float(high), early, late, level, samples)


def depth_trend(weighted: Sequence[Sequence[float]] | np.ndarray, *, samples: int = 2000, level: float = 0.95,
                seed: int = 0) -> DepthTrend:
    """Early-vs-late trend (see :class:`DepthTrend`) of weighted cosines ``weighted`` of shape (L, H).

    slope = Σ_l (x_l − x̄)(m_l − m̄) / Σ_l (x_l − x̄)², x_l = l / (L − 1); the bootstrap is seeded (``seed``),
    so the interval is reproducible.
    """
    values = np.asarray(weighted, dtype=float)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise QKDissectError(f"depth_trend needs weighted cosines of shape (layers, heads), got {values.shape}.")
    if not np.isfinite(values).all():
        raise QKDissectError("depth_trend: the weighted cosines hold NaN or Inf; re-run `qkdissect dissect`.")
    if samples < 1 or not 0 < level < 1:
        raise QKDissectError(f"depth_trend needs samples ≥ 1 and 0 < level < 1, got {samples} and {level}.")
    n_layers, n_heads = values.shape
    depth = np.arange(n_layers) / max(n_layers - 1, 1)
    means = values.mean(axis=1)
    early, late = (float(means[part].mean()) if part.any() else float("nan")
                   for part in (depth <= 1 / 3, (depth >= 2 / 3) & (n_layers > 1)))
    if n_layers < 2:
        nan = float("nan")
        return DepthTrend(nan, nan, nan, early, late, level, samples)
    centred = depth - depth.mean()
    weights = centred / (centred @ centred)
    picks = np.random.default_rng(seed).integers(0, n_heads, size=(samples, n_layers, n_heads))
    resampled = np.take_along_axis(values[None], picks, axis=2).mean(axis=2)  # (samples, L)
    slopes = resampled @ weights
    low, high = np.quantile(slopes, [(1 - level) / 2, (1 + level) / 2])
    return DepthTrend(float(means @ weights), float(low), float(high), early, late, level, samples)


@dataclass(frozen=True)
class ComparedModel:
    """One model of a comparison. ``means``/``stds``: per-layer mean/std of C_h over heads; ``weighted``: C_h per
    (layer, head); ``layers``: the atlas's per-layer summary rows; ``atlas``: the source atlas folder (or "")."""

    label: str
    model: str
    family: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    band: tuple[float, float]
    weighted: tuple[tuple[float, ...], ...]
    layers: tuple[dict[str, Any], ...]
    atlas: str = ""
    heads_per_layer: tuple[int, ...] | None = None  # layers of different widths (Swin): the heads each layer has

    @property
    def means(self) -> tuple[float, ...]:
        return tuple(float(row["mean_weighted_cosine"]) for row in self.layers)

    @property
    def stds(self) -> tuple[float, ...]:
        return tuple(float(row["std_weighted_cosine"]) for row in self.layers)

    @property
    def above(self) -> float:
        """Share of all heads above the null band."""
        return sum(float(row["share_heads_above_null"]) for row in self.layers) / max(len(self.layers), 1)

    @property
    def relative_depth(self) -> tuple[float, ...]:
        return tuple(layer / max(self.n_layers - 1, 1) for layer in range(self.n_layers))

    def trend(self, *, samples: int = 2000, level: float = 0.95, seed: int = 0) -> DepthTrend:
        """This model's early-vs-late trend (:func:`depth_trend` of its per-head weighted cosines)."""
        if self.heads_per_layer is not None:
            return depth_trend_per_layer([row[:n] for row, n in zip(self.weighted, self.heads_per_layer)],
                                         samples=samples, level=level, seed=seed)
        return depth_trend(self.weighted, samples=samples, level=level, seed=seed)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "family": self.family, "atlas": self.atlas,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "d_model": self.d_model, "d_head": self.d_head,
                "null_band": list(self.band),
                "weighted_cosines": [[finite_or_none(v) for v in row] for row in self.weighted],
                "layers": [{k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
                           for row in self.layers],
                **({} if self.heads_per_layer is None else {"heads_per_layer": list(self.heads_per_layer)})}

    @classmethod
    def from_atlas(cls, atlas: ModeAtlas, label: str | None = None, source: str = "") -> "ComparedModel":
        return cls(label=label or str(atlas.meta.get("model", source or "?")), model=str(atlas.meta.get("model", "?")),
                   family=str(atlas.meta.get("family", "?")), n_layers=atlas.n_layers, n_heads=atlas.n_heads,
                   d_model=atlas.d_model, d_head=atlas.rank, band=tuple(atlas.null.weighted_band),
                   weighted=tuple(tuple(row) for row in atlas.weighted_cosines.double().tolist()),
                   layers=tuple(atlas.layer_summary()), atlas=source,
                   heads_per_layer=tuple(atlas.heads_in(i) for i in range(atlas.n_layers)) if atlas.ragged else None)


@dataclass(frozen=True)
class Comparison:
    """The models of a comparison, in order, with provenance (``meta``: created, versions)."""

    models: tuple[ComparedModel, ...]
    meta: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **self.meta,
                "models": [model.to_json() for model in self.models]}

    def save(self, out: str | os.PathLike, figure: bool = True) -> list[Path]:
        """Write ``compare.json`` (and ``compare.png``) into ``out`` (a previous comparison there is replaced, any
        other non-empty folder refused: :mod:`qkdissect.outputs`); returns the files written."""
        from qkdissect.outputs import write_output

        out = Path(out)

        from qkdissect.formats import validated
        from qkdissect.formats.compare import CompareDocument

        document = self.to_json()
        validated(CompareDocument, document, out / "compare.json", "this comparison cannot be saved")

        def write(folder: Path) -> dict[str, Any]:
            if figure:
                from qkdissect.plots import plot_compare

                plot_compare(self.models, [m.label for m in self.models], folder / "compare.png")
            return document

        write_output(out, FORMAT, "compare.json", write)
        return [out / "compare.png", out / "compare.json"] if figure else [out / "compare.json"]


def compare(atlases: Sequence[ModeAtlas | str | os.PathLike], labels: Sequence[str] | None = None) -> Comparison:
    """Compare two or more models (ModeAtlas objects or atlas folders) over relative depth.

    ``labels``: one per atlas (default: each atlas's model spec).
    """
    if len(atlases) < 2:
        raise QKDissectError(f"a comparison needs at least two atlases, got {len(atlases)}.")
    if labels is not None and len(labels) != len(atlases):
        raise QKDissectError(f"got {len(labels)} labels for {len(atlases)} atlases; give one label per atlas.")
    models = []
    for index, item in enumerate(atlases):
        atlas, source = (item, "") if isinstance(item, ModeAtlas) else (ModeAtlas.load(item), str(item))
        models.append(ComparedModel.from_atlas(atlas, None if labels is None else labels[index], source))
    return Comparison(models=tuple(models), meta={"created": timestamp(),
                                                  "versions": library_versions()})


def load_compare(folder: str | os.PathLike) -> Comparison:
    """Read a folder written by :meth:`Comparison.save` (``qkdissect compare``); one QKDissectError naming the file
    and the field for anything else (schema: :mod:`qkdissect.formats.compare`)."""
    from qkdissect.formats import read_document
    from qkdissect.formats.compare import CompareDocument

    path = Path(folder) / "compare.json"
    remedy = "re-run `qkdissect compare`"
    document = read_json_document(path, missing=f"{folder} is not a `qkdissect compare` folder", remedy=remedy)
    if document.get("format") != FORMAT:
        raise QKDissectError(f"{path} is not a readable `qkdissect compare` result (format "
                             f"{document.get('format')!r}, expected {FORMAT!r}); {remedy}.")
    document, checked = read_document(path, CompareDocument, missing=f"{folder} is not a `qkdissect compare` folder",
                                      remedy=remedy, max_version=FORMAT_VERSION)
    nan = float("nan")
    models = tuple(ComparedModel(
        label=entry.label, model=entry.model, family=entry.family, n_layers=entry.n_layers, n_heads=entry.n_heads,
        d_model=entry.d_model, d_head=entry.d_head, band=tuple(entry.null_band),
        weighted=tuple(tuple(nan if v is None else v for v in row) for row in entry.weighted_cosines),
        layers=tuple({k: nan if v is None else v for k, v in row.model_dump().items()} for row in entry.layers),
        atlas=entry.atlas, heads_per_layer=None if getattr(entry, "heads_per_layer", None) is None
        else tuple(int(n) for n in entry.heads_per_layer)) for entry in checked.models)
    meta = {k: v for k, v in document.items() if k not in ("format", "format_version", "models", "files")}
    return Comparison(models=models, meta=meta)
