"""Building a report folder: read and check every input, write the pages into the staging folder of ``--out``, move
them into place (see :mod:`qkdissect.report` for the files, :mod:`qkdissect.outputs` for the ownership rules)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from markupsafe import Markup

from qkdissect.decomposition import ModeAtlas
from qkdissect.files import library_versions, timestamp
from qkdissect.outputs import JOURNAL, OutputFolder
from qkdissect.progress import ProgressFn, report
from qkdissect.report.assets import environment, png_size
from qkdissect.report.sources import CompareSource, read_compare_sources
from qkdissect.report.tables import AtlasTables, head_context, heat_rows, legend, model_card

__all__ = ["FORMAT_VERSION", "MANIFEST", "ReportResult", "build_report", "load_report"]

FORMAT_VERSION = 1
MANIFEST = "report.json"
REPORT_FORMAT = "qkdissect-report"


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote: the folder, its index page, counts and the build time."""

    out: Path
    index: Path
    n_pages: int
    n_head_pages: int
    n_images: int
    n_bytes: int
    seconds: float
    sections: tuple[str, ...]
    warnings: tuple[str, ...] = ()



def _load_atlas(atlas: ModeAtlas | str | os.PathLike, atlas_dir: str | None) -> tuple[ModeAtlas, str | None]:
    if isinstance(atlas, ModeAtlas):
        return atlas, atlas_dir
    return ModeAtlas.load(atlas), str(atlas)


def build_report(
    atlas: ModeAtlas | str | os.PathLike,
    out: str | os.PathLike,
    *,
    atlas_dir: str | None = None,
    compare: Sequence[str | os.PathLike] = (),
    preference: str | os.PathLike | None = None,
    mined: str | os.PathLike | None = None,
    maps: Sequence[str | os.PathLike] = (),
    progress: ProgressFn | None = None,
) -> ReportResult:
    """Write the HTML report of ``atlas`` (a ModeAtlas or an atlas folder) into the folder ``out``.

    ``atlas_dir``: the folder a ModeAtlas object was read from (shown on the model card).
    ``compare``: atlas folders (``qkdissect dissect`` output) and/or comparison folders
    (``qkdissect compare`` output) to put beside this model on the comparison page.
    ``preference``: a ``qkdissect preference`` folder (preference page, and per-head tables).
    ``mined``: a ``qkdissect mine`` folder (top images of the leading modes on the head pages).
    ``maps``: ``qkdissect maps`` folders (per-image maps on the page of their head).
    ``progress("pages", done, total)`` is called after each head page. All inputs are read and checked
    before anything is written.
    """
    started = time.perf_counter()
    out = Path(os.path.abspath(out))  # "." and "dir/" have a usable name for the sibling build folder
    atlas, atlas_dir = _load_atlas(atlas, atlas_dir)
    sources = read_compare_sources(compare)
    inputs = _Inputs(sources=sources, preference=_load_preference(preference), **_load_views(atlas, mined, maps))
    sections = {"compare": bool(sources), "preference": inputs.preference is not None}
    with OutputFolder(out, REPORT_FORMAT, MANIFEST).claim(replace=True) as folder:
        tmp = folder.staging
        pages = _write_pages(tmp, atlas, atlas_dir, inputs, sections, progress)
        files = [p for p in tmp.rglob("*") if p.is_file() and p.name != JOURNAL]
        manifest = {
            "format": REPORT_FORMAT, "format_version": FORMAT_VERSION, "model": atlas.meta.get("model"),
            "n_layers": atlas.n_layers, "n_heads": atlas.n_heads,
            "sections": ["overview", "heads", *[name for name, on in sections.items() if on]],
            "inputs": {"atlas": atlas_dir, "compare": [str(p) for p in compare],
                       "preference": None if preference is None else str(preference),
                       "mined": None if mined is None else str(mined), "maps": [str(p) for p in maps]},
            "pages": sorted(p.relative_to(tmp).as_posix() for p in pages),
            "n_files": len(files) + 1, "bytes": sum(p.stat().st_size for p in files),
            "warnings": _warnings(inputs, atlas),
            "build_seconds": round(time.perf_counter() - started, 3),
            "created": timestamp(), "versions": library_versions(),
        }
        from qkdissect.formats import validated
        from qkdissect.formats.report import ReportDocument

        validated(ReportDocument, manifest, out / MANIFEST, "this report cannot be written")
        folder.finish(manifest)
    return ReportResult(out=out, index=out / "index.html", n_pages=len(pages),
                        n_head_pages=atlas.n_layers * atlas.n_heads,
                        n_images=sum(p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") for p in files),
                        n_bytes=manifest["bytes"], seconds=time.perf_counter() - started,
                        sections=tuple(manifest["sections"]), warnings=tuple(manifest["warnings"]))


def _warnings(inputs: "_Inputs", atlas: ModeAtlas) -> list[str]:
    """Things the user should know about the report just written."""
    notes = []
    if inputs.mined is not None and inputs.mined.missing:
        missing = sorted(inputs.mined.missing)
        notes.append(f"{len(missing)} mined image(s) could not be read now (moved or deleted?), shown as grey tiles: "
                     + ", ".join(missing[:5]) + (" …" if len(missing) > 5 else ""))
    if inputs.preference is not None:
        from qkdissect.report.preference_page import preference_mismatch

        mismatch = preference_mismatch(inputs.preference, atlas)
        if mismatch:
            notes.append(mismatch)
    return notes


@dataclass(frozen=True)
class _Inputs:
    """The optional results beside the atlas, read and checked before anything is written."""

    sources: list[CompareSource]
    preference: Any = None
    mined: Any = None  # views_pages.MinedViews
    maps: Any = None  # views_pages.MapsViews


def _load_preference(folder: str | os.PathLike | None):
    if folder is None:
        return None
    from qkdissect.preference import load_preference

    return load_preference(folder)


def _load_views(atlas: ModeAtlas, mined: str | os.PathLike | None, maps: Sequence[str | os.PathLike]) -> dict:
    views: dict[str, Any] = {}
    if mined is not None:
        from qkdissect.mining import load_mined
        from qkdissect.report.views_pages import MinedViews

        views["mined"] = MinedViews(load_mined(mined), atlas)
    if maps:
        from qkdissect.report.views_pages import MapsViews
        from qkdissect.views import load_maps

        views["maps"] = MapsViews([load_maps(folder) for folder in maps], atlas)
    return views


def _write_pages(tmp: Path, atlas: ModeAtlas, atlas_dir: str | None, inputs: _Inputs,
                 sections: dict[str, bool], progress: ProgressFn | None) -> list[Path]:
    from qkdissect.plots import plot_layer_similarity, plot_mode_cosines

    env = environment()
    tables = AtlasTables(atlas)
    common = {"model_id": str(atlas.meta.get("model", "?")), "version": library_versions()["qkdissect"],
              "created": timestamp("%Y-%m-%d %H:%M"), "sections": sections, "null": atlas.null,
              "shape": {"n_layers": atlas.n_layers, "n_heads": atlas.n_heads, "d_head": atlas.rank}}
    images = tmp / "img"
    figures = []
    for path, alt, caption in (
        (plot_layer_similarity(atlas, images / "layer_similarity.png"), "weighted cosine per layer with the null band",
         Markup("Weighted cosine C<sub>h</sub> of every head (dots), mean ± std per layer, null band shaded.")),
        (plot_mode_cosines(atlas, images / "mode_cosines.png"), "per-mode cosines per layer with the null band",
         Markup("Distribution of the per-mode cosines u<sub>k</sub>·v<sub>k</sub> by layer, null band shaded.")),
    ):
        width, height = png_size(path)
        figures.append({"src": f"img/{path.name}", "alt": alt, "caption": caption, "width": width, "height": height})
    card, provenance = model_card(atlas, atlas_dir)
    views = _views_summary(inputs, tables)
    extras = [(f"{name}.html", text) for name, text in (("preference", "Attention preference between objects"),
                                                         ("compare", "Comparison with other models"))
              if sections[name]]
    pages = [tmp / "index.html"]
    pages[0].write_text(env.get_template("index.html.j2").render(
        **common, page="overview", root="", nav={}, card=card, provenance=provenance, legend=legend(tables),
        heat=heat_rows(tables), figures=figures, layers=atlas.layer_summary(), extras=extras, views=views),
        encoding="utf-8")
    if inputs.sources:
        from qkdissect.report.sources import compare_context

        pages.append(tmp / "compare.html")
        pages[-1].write_text(env.get_template("compare.html.j2").render(
            **common, page="compare", root="", nav={"home": "index.html"},
            **compare_context(atlas, atlas_dir, inputs.sources, images, tables.color)), encoding="utf-8")
    per_head: dict[str, Callable[[int, int], Any]] = {}
    if inputs.preference is not None:
        from qkdissect.report.preference_page import head_preference, preference_context, preference_mismatch

        pages.append(tmp / "preference.html")
        pages[-1].write_text(env.get_template("preference.html.j2").render(
            **common, page="preference", root="", nav={"home": "index.html"},
            **preference_context(inputs.preference, atlas, images, lambda l, h: tables.page(l, h, "heads/"))),
            encoding="utf-8")
        if preference_mismatch(inputs.preference, atlas) is None:
            per_head["preference"] = lambda l, h: head_preference(inputs.preference, l, h)
    if inputs.mined is not None:
        per_head["mined"] = lambda l, h: inputs.mined.head(l, h, images, "../img/")
    if inputs.maps is not None:
        per_head["maps"] = lambda l, h: inputs.maps.head(l, h, images, "../img/")
    heads = tmp / "heads"
    heads.mkdir()
    template = env.get_template("head.html.j2")
    total = len(tables.order)
    for index, (layer, head) in enumerate(tables.order):
        path = heads / tables.page(layer, head)
        context = head_context(tables, layer, head)
        context.update({name: make(layer, head) for name, make in per_head.items()})
        if context["mined"]:
            context["mined_modes"] = {m["mode"] for m in context["mined"]["modes"]}
        path.write_text(template.render(**common, **context), encoding="utf-8")
        pages.append(path)
        report(progress, "pages", index + 1, total)
    return pages


def _views_summary(inputs: _Inputs, tables: AtlasTables) -> dict[str, Any] | None:
    """What the overview says about the image views: the mining run and the heads with maps."""
    if inputs.mined is None and inputs.maps is None:
        return None
    mined = inputs.mined.summary() if inputs.mined is not None else None
    heads = [] if inputs.maps is None else [
        {"layer": l, "head": h, "href": tables.page(l, h, "heads/") + "#maps"} for l, h in inputs.maps.heads()]
    return {"mined": mined, "map_heads": heads}


def load_report(directory: str | os.PathLike) -> dict[str, Any]:
    """Read the manifest (report.json) of a report folder; one QKDissectError naming the file and the field if it
    is not one (schema: :mod:`qkdissect.formats.report`)."""
    from qkdissect.formats import read_document
    from qkdissect.formats.report import ReportDocument

    document, _ = read_document(Path(directory) / MANIFEST, ReportDocument,
                                missing=f"{directory} is not a qkdissect report folder",
                                remedy="regenerate the report with `qkdissect report`", kind=REPORT_FORMAT,
                                max_version=FORMAT_VERSION)
    return document
