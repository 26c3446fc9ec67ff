"""Writing and reading an attention-preference folder (``qkdissect-preference``): JSON index, safetensors, CSV
(and Parquet) tables, figures."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.preference.result import (
    CATEGORIES,
    FORMAT,
    FORMAT_VERSION,
    QUERIES,
    VARIANTS,
    Interval,
    PreferenceResult,
    json_number,
)
from qkdissect.synthetic.oddoneout import Problem

__all__ = ["load_preference", "save_preference"]


def _layer_document(result: PreferenceResult) -> list[dict[str, Any]]:
    rows = []
    for li, layer in enumerate(result.layers):
        entry: dict[str, Any] = {"layer": layer}
        for qi, query in enumerate(QUERIES):
            block: dict[str, Any] = {}
            for si, source in enumerate(result.sources):
                block[source] = {variant: {category: {k: json_number(getattr(result.layer, k)[li, qi, si, vi, ci])
                                                      for k in ("mean", "lo", "hi")}
                                           for ci, category in enumerate(CATEGORIES)}
                                 for vi, variant in enumerate(VARIANTS)}
            block["prefix"] = {source: {k: json_number(getattr(result.prefix_layer, k)[li, qi, si]) for k in ("mean", "lo", "hi")}
                               for si, source in enumerate(result.sources)}
            entry[query] = block
        rows.append(entry)
    return rows


def _table_rows(result: PreferenceResult, per_head: bool) -> list[list[Any]]:
    stats, prefix = (result.head, result.prefix_head) if per_head else (result.layer, result.prefix_layer)
    counts = [result.n_images(q) for q in QUERIES]
    rows = []
    for index in np.ndindex(stats.mean.shape):
        li, rest = index[0], index[1:]
        head = [rest[0]] if per_head else []
        qi, si, vi, ci = rest[-4:]
        rows.append([result.layers[li], *head, QUERIES[qi], result.sources[si], VARIANTS[vi], CATEGORIES[ci],
                     *(json_number(getattr(stats, k)[index]) for k in ("mean", "lo", "hi")), counts[qi]])
    for index in np.ndindex(prefix.mean.shape):
        li, rest = index[0], index[1:]
        head = [rest[0]] if per_head else []
        qi, si = rest[-2:]
        rows.append([result.layers[li], *head, QUERIES[qi], result.sources[si], "prefix", "prefix",
                     *(json_number(getattr(prefix, k)[index]) for k in ("mean", "lo", "hi")), counts[qi]])
    return rows


def _write_table(path: Path, header: list[str], rows: list[list[Any]]) -> list[Path]:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(["" if v is None else v for v in row] for row in rows)

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(header)})
    return [atomic_write(path, write), atomic_write(path.with_suffix(".parquet"), lambda p: pq.write_table(table, p))]


def save_preference(result: PreferenceResult, out: str | os.PathLike, figures: bool = True) -> list[Path]:
    """Write the output folder described in the module docstring; returns the files written."""
    from safetensors.numpy import save_file

    from qkdissect.outputs import OutputFolder

    out = Path(out)
    with OutputFolder(out, FORMAT, "preference.json").claim(replace=True) as folder:
        staging = folder.staging
        arrays = {"shares": result.shares, "prefix": result.prefix}
        for name, interval in (("layer", result.layer), ("head", result.head), ("prefix_layer", result.prefix_layer),
                               ("prefix_head", result.prefix_head)):
            for key in ("mean", "lo", "hi"):
                arrays[f"{name}_{key}"] = getattr(interval, key)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
        written = [atomic_write(staging / "preference.safetensors",
                                lambda p: save_file(arrays, str(p), metadata={"format": FORMAT}))]
        columns = ["layer", "query", "source", "variant", "category", "mean", "lo", "hi", "n_images"]
        written += _write_table(staging / "preference_layers.csv", columns, _table_rows(result, per_head=False))
        written += _write_table(staging / "preference_heads.csv", columns[:1] + ["head"] + columns[1:],
                                _table_rows(result, per_head=True))
        written += _write_table(staging / "problems.csv", ["name", "kind", "detail"],
                                [[p.name, p.kind, p.detail] for p in result.problems])
        if figures and len(result.names):
            from qkdissect.preference.plots import plot_preference, plot_preference_modes

            written.append(plot_preference(result, staging / "preference.png"))
            written.append(plot_preference_modes(result, staging / "preference_modes.png"))
        document = {**result.meta, "names": list(result.names),
                    "problems": [p.to_dict() for p in result.problems], "layers": _layer_document(result)}
        from qkdissect.formats import validated
        from qkdissect.formats.preference import PreferenceDocument

        validated(PreferenceDocument, document, out / "preference.json", "this result cannot be saved")
        index = folder.finish(document)
    return [index] + [out / path.relative_to(staging) for path in written]


def load_preference(directory: str | os.PathLike) -> PreferenceResult:
    """Read a folder written by :func:`save_preference`; one QKDissectError naming the file and the field (or the
    array) when it is missing, corrupt or inconsistent (schema: :mod:`qkdissect.formats.preference`)."""
    from safetensors.numpy import load_file

    from qkdissect.formats import check_shapes, read_document
    from qkdissect.formats.preference import PreferenceDocument, preference_shapes

    directory = Path(directory)
    json_path, array_path = directory / "preference.json", directory / "preference.safetensors"
    remedy = "re-run `qkdissect preference`"
    for path in (json_path, array_path):
        if not path.is_file():
            raise QKDissectError(f"{path} not found: {directory} is not a preference folder. Create one with "
                                 "`qkdissect preference MODEL --data DIR --out OUT`.")
    try:
        arrays = load_file(str(array_path))
    except Exception as error:  # noqa: BLE001 — any reader failure means a corrupt file
        raise QKDissectError(f"{directory} holds a corrupt preference result ({type(error).__name__}: {error}); "
                             f"{remedy}.") from None
    try:
        document, checked = read_document(json_path, PreferenceDocument, missing=f"{directory} is not a preference "
                                          "folder", remedy=remedy, kind=FORMAT, max_version=FORMAT_VERSION)
    except QKDissectError as error:
        if "is not a qkdissect-preference file" in str(error):
            raise QKDissectError(f"{json_path} is not a qkdissect preference file.") from None
        if "corrupt" in str(error):
            raise QKDissectError(f"{directory} holds a corrupt preference result ({error}); {remedy}.") from None
        raise
    check_shapes(array_path, {k: v.shape for k, v in arrays.items()}, preference_shapes(checked), remedy=remedy)

    def interval(name: str) -> Interval:
        return Interval(*(arrays[f"{name}_{k}"].astype(np.float64) for k in ("mean", "lo", "hi")))

    problems = tuple(Problem(p.name, p.kind, p.detail) for p in checked.problems)
    meta = {k: v for k, v in document.items() if k not in ("layers", "problems", "names", "files")}
    return PreferenceResult(meta=meta, layers=tuple(checked.layers_analysed), sources=tuple(checked.sources),
                            names=tuple(checked.names), shares=arrays["shares"], prefix=arrays["prefix"],
                            layer=interval("layer"), head=interval("head"), prefix_layer=interval("prefix_layer"),
                            prefix_head=interval("prefix_head"), skipped=dict(checked.skipped), problems=problems)
