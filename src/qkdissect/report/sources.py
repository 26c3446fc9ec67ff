"""Other models for the report's comparison page: atlas folders and ``qkdissect compare`` folders.

``--compare PATH`` accepts either
* an atlas folder (``atlas.json`` + ``atlas.safetensors``, read with ``ModeAtlas.load``), drawn with this
  report's model in one ``plots.plot_compare`` figure, or
* a comparison folder (``compare.json`` [+ ``compare.png``] written by ``qkdissect compare``, read with
  :func:`qkdissect.comparison.load_compare`): every model in it joins the tables, and its figure is copied into
  the report, or
* a survey folder (``survey.json``, written by ``qkdissect survey``): its comparison folder ``compare/``.

Every model's early-vs-late trend (:meth:`qkdissect.comparison.ComparedModel.trend`) is in the models table.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from qkdissect.comparison import ComparedModel, load_compare
from qkdissect.decomposition import ModeAtlas
from qkdissect.errors import QKDissectError
from qkdissect.report.assets import png_size, round_up
from qkdissect.report.charts import diverging_color, text_color

__all__ = ["CompareSource", "compare_context", "read_compare_sources"]


@dataclass(frozen=True)
class CompareSource:
    """One model on the comparison page: its statistics (``model``), where it came from (``source``), and the
    figure of the comparison folder it came from (``figure``), if any."""

    model: ComparedModel
    source: str
    figure: Path | None = None


def _from_compare_folder(folder: Path) -> list[CompareSource]:
    figure = folder / "compare.png"
    return [CompareSource(model, str(folder), figure if figure.is_file() else None)
            for model in load_compare(folder).models]


def read_compare_sources(paths: Sequence[str | os.PathLike]) -> list[CompareSource]:
    """Read every ``--compare`` path (atlas folder or comparison folder); QKDissectError for anything else."""
    sources: list[CompareSource] = []
    for raw in paths:
        path = Path(raw)
        if (path / "atlas.json").is_file():
            sources.append(CompareSource(ComparedModel.from_atlas(ModeAtlas.load(path), source=str(path)), str(path)))
        elif (path / "compare.json").is_file():
            sources.extend(_from_compare_folder(path))
        elif (path / "survey.json").is_file():
            if not (path / "compare" / "compare.json").is_file():
                raise QKDissectError(f"--compare {path}: the survey has no comparison yet ({path / 'compare'} is "
                                     "missing); re-run `qkdissect survey` on it until a model is done.")
            sources.extend(_from_compare_folder(path / "compare"))
        else:
            raise QKDissectError(f"--compare {path}: expected an atlas folder (with atlas.json, from `qkdissect "
                                 "dissect`) or a comparison folder (with compare.json, from `qkdissect compare`; "
                                 "or a survey folder with survey.json, from `qkdissect survey`).")
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

    here = atlas_dir or "this report"
    entries = [CompareSource(ComparedModel.from_atlas(atlas, source=here), here), *sources]
    models = [entry.model for entry in entries]
    labels = _unique_labels([m.label for m in models], [entry.source for entry in entries])
    labels[0] = f"{labels[0]} (this report)"
    figures = []
    with_atlas = [(entry.model, label) for entry, label in zip(entries, labels) if entry.figure is None]
    if len(with_atlas) > 1:
        path = plot_compare([m for m, _ in with_atlas], [label for _, label in with_atlas], images / "compare.png")
        figures.append((path, "mean weighted cosine against relative depth", "This model and the compared atlases."))
    copied: dict[Path, Path] = {}
    for entry in sources:
        if entry.figure is not None and entry.figure not in copied:
            target = images / f"compare_{len(copied)}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            copied[entry.figure] = Path(shutil.copyfile(entry.figure, target))
            figures.append((target, "comparison figure", f"From {entry.source} (qkdissect compare)."))
    figures = [{"src": f"img/{path.name}", "alt": alt, "caption": caption, "width": png_size(path)[0],
                "height": png_size(path)[1]} for path, alt, caption in figures]
    vmax = round_up(max([abs(v) for m in models for v in (*m.means, *m.band) if math.isfinite(v)] + [1e-3]))

    def cell(value: float) -> dict[str, Any]:
        return {"value": value, "bg": diverging_color(value, vmax), "fg": text_color(value, vmax)}

    rows = [{"layer": layer, "cells": [cell(m.means[layer]) if layer < len(m.means) else None for m in models]}
            for layer in range(max(m.n_layers for m in models))]
    table = [{"label": label, "model": m.model, "family": m.family, "n_layers": m.n_layers,
              "n_heads": m.n_heads, "d_model": m.d_model, "d_head": m.d_head,
              "band": m.band, "means": m.means, "overall": sum(m.means) / len(m.means), "above": m.above,
              "trend": m.trend(), "source": entry.source} for m, entry, label in zip(models, entries, labels)]
    return {"models": table, "layer_rows": rows, "figures": figures}
