"""Self-contained static HTML report of a dissected model (``qkdissect report``).

Output folder (everything local; open ``index.html`` from disk, no server, no network request)::

    index.html                        overview: model card, provenance, layer × head heat map of the
                                      weighted cosine C_h (click a cell: its head page), layer figures,
                                      layer summary table
    heads/layer{L}_head{H}.html       one page per head: statistics, inline SVG charts of the spectrum and
                                      of the per-mode cosines against the null, table of modes; top images
                                      of the leading modes (--mined) and per-image maps (--maps) as <img
                                      loading="lazy"> files under img/
    compare.html                      with --compare: several models by relative depth
    preference.html                   with --preference: same / different / background attention by depth
    img/*.png                         figures (matplotlib): layer_similarity, mode_cosines, compare*, preference*
    img/mined/L<ll>/H<hh>/m<kkk>_<pos|neg>_<rank>.jpg   top-image tiles with query/key overlays (--mined)
    img/maps/<nn>/<item>_<mode|strip>.png              figures copied from maps folders (--maps)
    report.json                       manifest: {"format": "qkdissect-report", "format_version", "model",
                                      "n_layers", "n_heads", "sections", "inputs", "pages", "n_files",
                                      "bytes", "warnings", "build_seconds", "created", "versions"}; read with
                                      :func:`load_report`

Each page inlines its CSS and JS (one small hand-written stylesheet and script from ``static/``) and
carries a Content-Security-Policy that blocks network access and any script but the report's own
(by hash). All text from user data (model ids, file names, labels) passes through Jinja2's autoescape.
The report is written into a temporary sibling folder and moved into place at the end, so a failure
never leaves half a report, and an existing folder is replaced only if it is a previous report.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

from markupsafe import Markup

from qkdissect.decomposition import ModeAtlas
from qkdissect.files import library_versions
from qkdissect.errors import QKDissectError
from qkdissect.files import read_json_document
from qkdissect.report.charts import cosine_svg, diverging_color, spectrum_svg, text_color
from qkdissect.report.sources import CompareSource, read_compare_sources

__all__ = ["FORMAT_VERSION", "ReportResult", "build_report", "head_page_name", "load_report"]

FORMAT_VERSION = 1
MANIFEST = "report.json"


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


def head_page_name(layer: int, head: int, n_layers: int, n_heads: int) -> str:
    """'layer03_head11.html' — indices zero-padded to the width of the largest one (at least 2)."""
    lw, hw = max(2, len(str(n_layers - 1))), max(2, len(str(n_heads - 1)))
    return f"layer{layer:0{lw}d}_head{head:0{hw}d}.html"


# ----- Jinja environment and static assets ---------------------------------------------------------
@lru_cache(maxsize=1)
def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("qkdissect.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    css = resources.files("qkdissect.report").joinpath("static/report.css").read_text(encoding="utf-8")
    js = resources.files("qkdissect.report").joinpath("static/report.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(js.encode("utf-8")).digest()).decode("ascii")
    env.globals.update(
        css=Markup(css), js=Markup(js),
        csp=(f"default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; "
             "base-uri 'none'; form-action 'none'"),
    )
    return env


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


# ----- atlas pages -------------------------------------------------------------------------------------
class _AtlasTables:
    """The per-head numbers of an atlas as plain Python lists (fast to template): S, cos (L, H, r),
    C, symmetric fraction (L, H), near-degenerate mask (L, H, r−1)."""

    def __init__(self, atlas: ModeAtlas):
        self.atlas = atlas
        self.L, self.H, self.r = atlas.n_layers, atlas.n_heads, atlas.rank
        self.S = atlas.singular_values.double().tolist()
        self.cos = atlas.cosines.double().tolist()
        self.C = atlas.weighted_cosines.double().tolist()
        self.sym = atlas.symmetric_fractions.double().tolist()
        self.degenerate = atlas.degenerate.tolist()
        self.band = tuple(atlas.null.weighted_band)
        self.cos_band = tuple(atlas.null.cosine_band)
        extreme = max(abs(v) for row in self.C for v in row)
        self.vmax = _round_up(max(extreme, abs(self.band[0]), abs(self.band[1]), 1e-3))

    def page(self, layer: int, head: int, prefix: str = "") -> str:
        return prefix + head_page_name(layer, head, self.L, self.H)

    def color(self, value: float) -> tuple[str, str]:
        return diverging_color(value, self.vmax), text_color(value, self.vmax)

    def in_null(self, value: float) -> bool:
        return self.band[0] <= value <= self.band[1]


def _round_up(value: float) -> float:
    """Round up to 1, 2 or 5 × 10^k (a readable colour-scale end)."""
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= value - 1e-12)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "none"
    return "—" if value is None or value == "" else str(value)


def _model_card(atlas: ModeAtlas, atlas_dir: str | None) -> tuple[list, list]:
    meta = atlas.meta
    scale = meta.get("scale")
    scale_text = _fmt(scale) + (" = 1/√d_head" if meta.get("scale_is_inverse_sqrt_d_head") else "")
    prefix = meta.get("prefix_tokens") or []
    card = [
        ("spec", meta.get("model")), ("checkpoint", meta.get("checkpoint")), ("family", meta.get("family")),
        ("modality", meta.get("modality")),
        ("shape", f"{atlas.n_layers} layers × {atlas.n_heads} heads"
                  + (f" ({meta['n_kv_heads']} key heads)" if meta.get("n_kv_heads", atlas.n_heads) != atlas.n_heads
                     else "")),
        ("d_model · d_head", f"{atlas.d_model} · {atlas.rank}"), ("attention scale", scale_text),
        ("prefix tokens", f"{len(prefix)}: {', '.join(map(str, prefix))}" if prefix else "none"),
        ("x̃ (what the modes act on)", meta.get("x_tilde")), ("LayerNorm folded", meta.get("ln_folded")),
    ]
    pre = meta.get("preprocessing")
    if pre:
        size = pre.get("image_size")
        card += [("preprocessing", f"{_fmt(size[0])}×{_fmt(size[1])} px, {pre.get('interpolation')}, crop_pct "
                                   f"{_fmt(pre.get('crop_pct'))} ({pre.get('source')})" if size else str(pre)),
                 ("normalisation", f"mean {_fmt(pre.get('mean'))}; std {_fmt(pre.get('std'))}")]
    null = atlas.null
    provenance = [
        ("null", f"{null.n_samples} Gaussian heads ({null.method} sampler, seed {null.seed}), "
                 f"central {null.percentile:g}% band"),
        ("null band of C_h", f"[{null.weighted_band[0]:+.4f}, {null.weighted_band[1]:+.4f}]"),
        ("null band per mode", f"[{null.cosine_band[0]:+.4f}, {null.cosine_band[1]:+.4f}]"),
        ("SVD precision", meta.get("dtype")), ("decomposition time", f"{_fmt(meta.get('decomposition_seconds'))} s"),
        ("created", meta.get("created")), ("atlas folder", atlas_dir),
        ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())),
    ]
    return ([(k, _fmt(v)) for k, v in card], [(k, _fmt(v)) for k, v in provenance])


def _legend(tables: _AtlasTables) -> dict[str, Any]:
    vmax = tables.vmax
    stops = [diverging_color(vmax * (2 * i / 10 - 1), vmax) + f" {10 * i}%" for i in range(11)]
    left = 50 * (1 + max(-1.0, tables.band[0] / vmax))
    right = 50 * (1 + min(1.0, tables.band[1] / vmax))
    ticks = [(50 * (1 + t), f"{t * vmax:+g}") for t in (-1, -0.5, 0, 0.5, 1)]
    return {"gradient": ", ".join(stops), "band_left": f"{left:.2f}", "band_width": f"{right - left:.2f}",
            "ticks": [(f"{p:.1f}", text) for p, text in ticks]}


def _heat_rows(tables: _AtlasTables) -> list[dict[str, Any]]:
    rows = []
    for layer in range(tables.L):
        cells = []
        for head in range(tables.H):
            value = tables.C[layer][head]
            bg, fg = tables.color(value)
            cells.append({"head": head, "value": value, "bg": bg, "fg": fg, "in_null": tables.in_null(value),
                          "href": tables.page(layer, head, "heads/")})
        mean = sum(tables.C[layer]) / tables.H
        mean_bg, mean_fg = tables.color(mean)
        rows.append({"layer": layer, "cells": cells, "mean": mean, "mean_bg": mean_bg, "mean_fg": mean_fg})
    return rows


def _head_context(tables: _AtlasTables, layer: int, head: int) -> dict[str, Any]:
    """Everything a head page shows, from the atlas tables (no tensors)."""
    S, cos, degenerate = tables.S[layer][head], tables.cos[layer][head], tables.degenerate[layer][head]
    total = sum(S) or 1.0
    lo, hi = tables.cos_band
    flagged = {k for k, d in enumerate(degenerate) if d}
    modes, cumulative = [], 0.0
    for k, (sigma, c) in enumerate(zip(S, cos)):
        cumulative += sigma / total
        modes.append({"k": k, "sigma": sigma, "share": sigma / total, "cumulative": cumulative, "cos": c,
                      "where": "above" if c > hi else "below" if c < lo else "inside",
                      "degenerate": k in flagged or (k - 1) in flagged,
                      "gap": (sigma - S[k + 1]) / (S[0] or 1.0) if k + 1 < len(S) else None})
    weighted = tables.C[layer][head]
    w_lo, w_hi = tables.band
    verdict, verdict_class = (("above the null: attends to similar tokens", "above") if weighted > w_hi else
                              ("below the null: attends to dissimilar tokens", "below") if weighted < w_lo else
                              ("inside the null band", ""))
    L, H = tables.L, tables.H
    index = layer * H + head
    prev_url = tables.page(*divmod(index - 1, H)) if index > 0 else None
    next_url = tables.page(*divmod(index + 1, H)) if index + 1 < L * H else None
    up_url = tables.page(layer - 1, head) if layer > 0 else None
    down_url = tables.page(layer + 1, head) if layer + 1 < L else None
    strip = []
    for other in range(H):
        value = tables.C[layer][other]
        bg, fg = tables.color(value)
        strip.append({"head": other, "value": value, "bg": bg, "fg": fg, "here": other == head,
                      "href": tables.page(layer, other)})
    return {
        "page": "head", "root": "../", "layer": layer, "head": head, "rank": tables.r,
        "nav": {"prev": prev_url, "next": next_url, "up": up_url, "down": down_url, "home": "../index.html"},
        "links": [("prev", "← previous head", prev_url), ("next", "next head →", next_url),
                  ("up", "↑ previous layer", up_url), ("down", "↓ next layer", down_url),
                  ("home", "overview (Esc)", "../index.html")],
        "strip": strip, "weighted": weighted, "verdict": verdict, "verdict_class": verdict_class,
        "symmetric": tables.sym[layer][head], "sigma0": S[0], "stable_rank": sum(s * s for s in S) / (S[0] ** 2 or 1.0),
        "modes90": next((m["k"] + 1 for m in modes if m["cumulative"] >= 0.9 - 1e-12), len(modes)),
        "n_above": sum(m["where"] == "above" for m in modes), "n_below": sum(m["where"] == "below" for m in modes),
        "degenerate": [f"{k}–{k + 1}" for k in sorted(flagged)], "modes": modes,
        "spectrum_svg": spectrum_svg(S, sorted(flagged)), "cosine_svg": cosine_svg(cos, S, tables.cos_band),
        "mined": None, "mined_modes": (), "maps": None, "preference": None,
    }


# ----- building ----------------------------------------------------------------------------------------
def _load_atlas(atlas: ModeAtlas | str | os.PathLike, atlas_dir: str | None) -> tuple[ModeAtlas, str | None]:
    if isinstance(atlas, ModeAtlas):
        return atlas, atlas_dir
    return ModeAtlas.load(atlas), str(atlas)


def _prepare_out(out: Path) -> Path:
    """Check that ``out`` may be (re)placed and return the temporary folder to build in."""
    if out.exists():
        if not out.is_dir():
            raise QKDissectError(f"--out {out} is a file; give a folder for the report.")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise QKDissectError(f"--out {out} is not empty and holds no {MANIFEST}: it is not a previous qkdissect "
                                 "report, so nothing in it was touched. Give a new or empty folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def build_report(
    atlas: ModeAtlas | str | os.PathLike,
    out: str | os.PathLike,
    *,
    atlas_dir: str | None = None,
    compare: Sequence[str | os.PathLike] = (),
    preference: str | os.PathLike | None = None,
    mined: str | os.PathLike | None = None,
    maps: Sequence[str | os.PathLike] = (),
    progress: Callable[[int, int], None] | None = None,
) -> ReportResult:
    """Write the HTML report of ``atlas`` (a ModeAtlas or an atlas folder) into the folder ``out``.

    ``atlas_dir``: the folder a ModeAtlas object was read from (shown on the model card).
    ``compare``: atlas folders (``qkdissect dissect`` output) and/or comparison folders
    (``qkdissect compare`` output) to put beside this model on the comparison page.
    ``preference``: a ``qkdissect preference`` folder (preference page, and per-head tables).
    ``mined``: a ``qkdissect mine`` folder (top images of the leading modes on the head pages).
    ``maps``: ``qkdissect maps`` folders (per-image maps on the page of their head).
    ``progress(done, total)`` is called after each head page. All inputs are read and checked
    before anything is written.
    """
    started = time.perf_counter()
    out = Path(os.path.abspath(out))  # "." and "dir/" have a usable name for the sibling build folder
    atlas, atlas_dir = _load_atlas(atlas, atlas_dir)
    sources = read_compare_sources(compare)
    inputs = _Inputs(sources=sources, preference=_load_preference(preference), **_load_views(atlas, mined, maps))
    sections = {"compare": bool(sources), "preference": inputs.preference is not None}
    tmp = _prepare_out(out)
    try:
        pages = _write_pages(tmp, atlas, atlas_dir, inputs, sections, progress)
        files = [p for p in tmp.rglob("*") if p.is_file()]
        manifest = {
            "format": "qkdissect-report", "format_version": FORMAT_VERSION, "model": atlas.meta.get("model"),
            "n_layers": atlas.n_layers, "n_heads": atlas.n_heads,
            "sections": ["overview", "heads", *[name for name, on in sections.items() if on]],
            "inputs": {"atlas": atlas_dir, "compare": [str(p) for p in compare],
                       "preference": None if preference is None else str(preference),
                       "mined": None if mined is None else str(mined), "maps": [str(p) for p in maps]},
            "pages": sorted(str(p.relative_to(tmp)) for p in pages),
            "n_files": len(files) + 1, "bytes": sum(p.stat().st_size for p in files),
            "warnings": _warnings(inputs, atlas),
            "build_seconds": round(time.perf_counter() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": library_versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
                 sections: dict[str, bool], progress: Callable[[int, int], None] | None) -> list[Path]:
    from qkdissect.plots import plot_layer_similarity, plot_mode_cosines

    env = _environment()
    tables = _AtlasTables(atlas)
    common = {"model_id": str(atlas.meta.get("model", "?")), "version": library_versions()["qkdissect"],
              "created": time.strftime("%Y-%m-%d %H:%M"), "sections": sections, "null": atlas.null,
              "shape": {"n_layers": atlas.n_layers, "n_heads": atlas.n_heads, "d_head": atlas.rank}}
    images = tmp / "img"
    figures = []
    for path, alt, caption in (
        (plot_layer_similarity(atlas, images / "layer_similarity.png"), "weighted cosine per layer with the null band",
         Markup("Weighted cosine C<sub>h</sub> of every head (dots), mean ± std per layer, null band shaded.")),
        (plot_mode_cosines(atlas, images / "mode_cosines.png"), "per-mode cosines per layer with the null band",
         Markup("Distribution of the per-mode cosines u<sub>k</sub>·v<sub>k</sub> by layer, null band shaded.")),
    ):
        width, height = _png_size(path)
        figures.append({"src": f"img/{path.name}", "alt": alt, "caption": caption, "width": width, "height": height})
    card, provenance = _model_card(atlas, atlas_dir)
    views = _views_summary(inputs, tables)
    extras = [(f"{name}.html", text) for name, text in (("preference", "Attention preference between objects"),
                                                         ("compare", "Comparison with other models"))
              if sections[name]]
    pages = [tmp / "index.html"]
    pages[0].write_text(env.get_template("index.html.j2").render(
        **common, page="overview", root="", nav={}, card=card, provenance=provenance, legend=_legend(tables),
        heat=_heat_rows(tables), figures=figures, layers=atlas.layer_summary(), extras=extras, views=views),
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
    total = atlas.n_layers * atlas.n_heads
    for index in range(total):
        layer, head = divmod(index, atlas.n_heads)
        path = heads / tables.page(layer, head)
        context = _head_context(tables, layer, head)
        context.update({name: make(layer, head) for name, make in per_head.items()})
        if context["mined"]:
            context["mined_modes"] = {m["mode"] for m in context["mined"]["modes"]}
        path.write_text(template.render(**common, **context), encoding="utf-8")
        pages.append(path)
        if progress is not None:
            progress(index + 1, total)
    return pages


def _views_summary(inputs: _Inputs, tables: _AtlasTables) -> dict[str, Any] | None:
    """What the overview says about the image views: the mining run and the heads with maps."""
    if inputs.mined is None and inputs.maps is None:
        return None
    mined = inputs.mined.summary() if inputs.mined is not None else None
    heads = [] if inputs.maps is None else [
        {"layer": l, "head": h, "href": tables.page(l, h, "heads/") + "#maps"} for l, h in inputs.maps.heads()]
    return {"mined": mined, "map_heads": heads}


def load_report(directory: str | os.PathLike) -> dict[str, Any]:
    """Read the manifest (report.json) of a report folder; QKDissectError if it is not one."""
    return read_json_document(Path(directory) / MANIFEST, missing=f"{directory} is not a qkdissect report folder",
                              remedy="regenerate the report with `qkdissect report`", kind="qkdissect-report")
