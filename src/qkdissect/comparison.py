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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from qkdissect.decomposition import ModeAtlas
from qkdissect.errors import QKDissectError
from qkdissect.files import library_versions, read_json_document

__all__ = ["FORMAT", "FORMAT_VERSION", "ComparedModel", "Comparison", "DepthTrend", "compare", "depth_trend",
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
        return depth_trend(self.weighted, samples=samples, level=level, seed=seed)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "family": self.family, "atlas": self.atlas,
                "n_layers": self.n_layers, "n_heads": self.n_heads, "d_model": self.d_model, "d_head": self.d_head,
                "null_band": list(self.band), "weighted_cosines": [list(row) for row in self.weighted],
                "layers": list(self.layers)}

    @classmethod
    def from_atlas(cls, atlas: ModeAtlas, label: str | None = None, source: str = "") -> "ComparedModel":
        return cls(label=label or str(atlas.meta.get("model", source or "?")), model=str(atlas.meta.get("model", "?")),
                   family=str(atlas.meta.get("family", "?")), n_layers=atlas.n_layers, n_heads=atlas.n_heads,
                   d_model=atlas.d_model, d_head=atlas.rank, band=tuple(atlas.null.weighted_band),
                   weighted=tuple(tuple(row) for row in atlas.weighted_cosines.double().tolist()),
                   layers=tuple(atlas.layer_summary()), atlas=source)


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

        def write(folder: Path) -> dict[str, Any]:
            if figure:
                from qkdissect.plots import plot_compare

                plot_compare(self.models, [m.label for m in self.models], folder / "compare.png")
            return self.to_json()

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
    return Comparison(models=tuple(models), meta={"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                  "versions": library_versions()})


def load_compare(folder: str | os.PathLike) -> Comparison:
    """Read a folder written by :meth:`Comparison.save` (``qkdissect compare``); QKDissectError for anything else."""
    path = Path(folder) / "compare.json"
    remedy = "re-run `qkdissect compare`"
    document = read_json_document(path, missing=f"{folder} is not a `qkdissect compare` folder", remedy=remedy)
    if document.get("format") != FORMAT:
        raise QKDissectError(f"{path} is not a readable `qkdissect compare` result (format "
                             f"{document.get('format')!r}, expected {FORMAT!r}); {remedy}.")
    if int(document.get("format_version", -1)) > FORMAT_VERSION:
        raise QKDissectError(f"{path} has format version {document.get('format_version')}, newer than this "
                             f"qkdissect reads ({FORMAT_VERSION}); upgrade qkdissect.")
    try:
        models = tuple(ComparedModel(
            label=str(entry["label"]), model=str(entry["model"]), family=str(entry["family"]),
            n_layers=int(entry["n_layers"]), n_heads=int(entry["n_heads"]), d_model=int(entry["d_model"]),
            d_head=int(entry["d_head"]), band=(float(entry["null_band"][0]), float(entry["null_band"][1])),
            weighted=tuple(tuple(float(v) for v in row) for row in entry["weighted_cosines"]),
            layers=tuple(dict(row) for row in entry["layers"]), atlas=str(entry.get("atlas", "")))
            for entry in document["models"])
        for model in models:
            if len(model.layers) != model.n_layers or len(model.weighted) != model.n_layers:
                raise ValueError(f"{model.label}: {len(model.layers)} layer rows for n_layers {model.n_layers}")
            model.means, model.stds  # noqa: B018  (every row must carry its statistics)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise QKDissectError(f"{path} is not a readable `qkdissect compare` result ({type(error).__name__}: "
                             f"{error}); {remedy}.") from None
    if not models:
        raise QKDissectError(f"{path} lists no models; {remedy}.")
    meta = {k: v for k, v in document.items() if k not in ("format", "format_version", "models", "files")}
    return Comparison(models=models, meta=meta)
