"""Other models for the report's comparison page: atlas folders and ``qkdissect compare`` folders.

``--compare PATH`` accepts either
* an atlas folder (``atlas.json`` + ``atlas.safetensors``, read with ``ModeAtlas.load``), drawn with this
  report's model in one ``plots.plot_compare`` figure, or
* a comparison folder (``compare.json`` [+ ``compare.png``] written by ``qkdissect compare``): every model in
  it joins the tables, and its figure is copied into the report.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from qkdissect.decomposition import ModeAtlas
from qkdissect.errors import QKDissectError
from qkdissect.report.charts import diverging_color, text_color

__all__ = ["CompareSource", "compare_context", "read_compare_sources"]


@dataclass(frozen=True)
class CompareSource:
    """One model on the comparison page. ``means``/``stds``: per-layer mean/std of C_h over heads;
    ``above``: share of all heads above the null; ``atlas``: the full atlas when read from an atlas
    folder; ``figure``: compare.png of a comparison folder."""

    label: str
    model: str
    family: str
    n_layers: int
    n_heads: int | None
    d_model: int | None
    d_head: int | None
    band: tuple[float, float]
    means: tuple[float, ...]
    stds: tuple[float, ...]
    above: float
    source: str
    atlas: ModeAtlas | None = None
    figure: Path | None = None


def _from_atlas(atlas: ModeAtlas, source: str, label: str | None = None) -> CompareSource:
    rows = atlas.layer_summary()
    return CompareSource(
        label=label or str(atlas.meta.get("model", source)), model=str(atlas.meta.get("model", "?")),
        family=str(atlas.meta.get("family", "?")), n_layers=atlas.n_layers, n_heads=atlas.n_heads,
        d_model=atlas.d_model, d_head=atlas.rank, band=tuple(atlas.null.weighted_band),
        means=tuple(r["mean_weighted_cosine"] for r in rows), stds=tuple(r["std_weighted_cosine"] for r in rows),
        above=sum(r["share_heads_above_null"] for r in rows) / len(rows), source=source, atlas=atlas)


def _from_compare_folder(folder: Path) -> list[CompareSource]:
    path = folder / "compare.json"
    try:
        document = json.loads(path.read_text())
        models = document["models"]
        sources = []
        for index, entry in enumerate(models):
            rows = entry["layers"]
            shape = _atlas_shape(entry.get("atlas"))
            sources.append(CompareSource(
                label=str(entry.get("label") or entry.get("model") or f"model {index}"),
                model=str(entry.get("model") or "?"), family=str(shape.get("family", "?")),
                n_layers=int(entry.get("n_layers", len(rows))), n_heads=shape.get("n_heads"),
                d_model=shape.get("d_model"), d_head=shape.get("d_head"),
                band=(float(entry["null_band"][0]), float(entry["null_band"][1])),
                means=tuple(float(r["mean_weighted_cosine"]) for r in rows),
                stds=tuple(float(r["std_weighted_cosine"]) for r in rows),
                above=sum(float(r["share_heads_above_null"]) for r in rows) / max(len(rows), 1),
                source=str(folder), figure=(folder / "compare.png") if (folder / "compare.png").is_file() else None))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise QKDissectError(f"{path} is not a readable `qkdissect compare` result ({type(error).__name__}: "
                             f"{error}); re-run `qkdissect compare`.") from None
    if not sources or any(not s.means for s in sources):
        raise QKDissectError(f"{path} lists no models with layers; re-run `qkdissect compare`.")
    return sources


def _atlas_shape(atlas_dir: Any) -> dict[str, Any]:
    """family / n_heads / d_model / d_head from an atlas.json if the compared atlas is still there."""
    try:
        document = json.loads((Path(str(atlas_dir)) / "atlas.json").read_text())
        return {k: document[k] for k in ("family", "n_heads", "d_model", "d_head") if k in document}
    except (OSError, ValueError, TypeError):
        return {}


def read_compare_sources(paths: Sequence[str | os.PathLike]) -> list[CompareSource]:
    """Read every ``--compare`` path (atlas folder or comparison folder); QKDissectError for anything else."""
    sources: list[CompareSource] = []
    for raw in paths:
        path = Path(raw)
        if (path / "atlas.json").is_file():
            sources.append(_from_atlas(ModeAtlas.load(path), str(path)))
        elif (path / "compare.json").is_file():
            sources.extend(_from_compare_folder(path))
        else:
            raise QKDissectError(f"--compare {path}: expected an atlas folder (with atlas.json, from `qkdissect "
                                 "dissect`) or a comparison folder (with compare.json, from `qkdissect compare`).")
    return sources


def _unique_labels(labels: list[str], sources: list[str]) -> list[str]:
    """Append the source folder's name to labels that occur more than once (then a counter if still equal)."""
    result = [f"{label} ({Path(src).name})" if labels.count(label) > 1 else label
              for label, src in zip(labels, sources)]
    counts = {label: result.count(label) for label in result}
    seen: dict[str, int] = {}
    for index, label in enumerate(result):
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            result[index] = f"{label} #{seen[label]}"
    return result


def compare_context(atlas: ModeAtlas, atlas_dir: str | None, sources: list[CompareSource], images: Path,
                    color: Callable[[float], tuple[str, str]] | None = None) -> dict[str, Any]:
    """Template context of compare.html; draws/copies its figures into ``images``."""
    from qkdissect.plots import plot_compare
    from qkdissect.report import _png_size

    models = [_from_atlas(atlas, atlas_dir or "this report"), *sources]
    labels = _unique_labels([m.label for m in models], [m.source for m in models])
    labels[0] = f"{labels[0]} (this report)"
    figures = []
    with_atlas = [(m.atlas, label) for m, label in zip(models, labels) if m.atlas is not None]
    if len(with_atlas) > 1:
        path = plot_compare([a for a, _ in with_atlas], [label for _, label in with_atlas], images / "compare.png")
        figures.append((path, "mean weighted cosine against relative depth", "This model and the compared atlases."))
    copied: dict[Path, Path] = {}
    for model in sources:
        if model.figure is not None and model.figure not in copied:
            target = images / f"compare_{len(copied)}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            copied[model.figure] = Path(shutil.copyfile(model.figure, target))
            figures.append((target, "comparison figure", f"From {model.source} (qkdissect compare)."))
    figures = [{"src": f"img/{path.name}", "alt": alt, "caption": caption, "width": _png_size(path)[0],
                "height": _png_size(path)[1]} for path, alt, caption in figures]
    from qkdissect.report import _round_up

    vmax = _round_up(max([abs(v) for m in models for v in (*m.means, *m.band)] + [1e-3]))

    def cell(value: float) -> dict[str, Any]:
        return {"value": value, "bg": diverging_color(value, vmax), "fg": text_color(value, vmax)}

    rows = [{"layer": layer, "cells": [cell(m.means[layer]) if layer < len(m.means) else None for m in models]}
            for layer in range(max(m.n_layers for m in models))]
    table = [{"label": label, "model": m.model, "family": m.family, "n_layers": m.n_layers,
              "n_heads": m.n_heads if m.n_heads is not None else "?",
              "d_model": m.d_model if m.d_model is not None else "?",
              "d_head": m.d_head if m.d_head is not None else "?",
              "band": m.band, "means": m.means, "overall": sum(m.means) / len(m.means), "above": m.above,
              "source": m.source} for m, label in zip(models, labels)]
    return {"models": table, "layer_rows": rows, "figures": figures}
