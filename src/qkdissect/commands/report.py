"""``qkdissect report``: a self-contained static HTML report of a dissected model."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from qkdissect.commands.common import console, err_console, guarded, progress_reporter


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def report(
        atlas: Path = typer.Argument(..., help="Atlas folder written by `qkdissect dissect`."),
        out: Path = typer.Option(Path("report"), "--out", "-o",
                                 help="Report folder (created; the files of a previous report there are replaced, "
                                      "nothing else is touched; any other non-empty folder is refused)."),
        compare: Optional[List[Path]] = typer.Option(
            None, "--compare", help="Another atlas folder, or a `qkdissect compare` folder, for the comparison page. "
                                    "Repeat for several: --compare a/ --compare b/."),
        preference: Optional[Path] = typer.Option(None, "--preference",
                                                  help="Folder from `qkdissect preference` (odd-one-out attention "
                                                       "preference): adds the preference page and per-head tables."),
        mined: Optional[Path] = typer.Option(None, "--mined", help="Folder from `qkdissect mine`: the top images of "
                                                                     "the leading modes, with query/key overlays, on "
                                                                     "the head pages."),
        maps: Optional[List[Path]] = typer.Option(None, "--maps", help="Folder from `qkdissect maps` (one head's "
                                                                       "per-image maps); repeat for several."),
    ) -> None:
        """Write a static HTML report that opens from disk with no server and no network access.

        index.html: model card, layer-similarity figure, a layer × head heat map of the weighted cosine
        (click a cell for the head). One page per head with its spectrum, per-mode cosines against the
        null and a table of modes, plus the top images of its leading modes (--mined), its per-image
        maps (--maps) and its attention preference (--preference). preference.html and compare.html
        when those inputs are given. Keys on head pages: ←/→ head, ↑/↓ layer, Esc or h: overview.
        """
        from qkdissect.decomposition import ModeAtlas
        from qkdissect.outputs import check_out
        from qkdissect.report import build_report
        from qkdissect.report.build import MANIFEST, REPORT_FORMAT

        check_out(out, REPORT_FORMAT, MANIFEST)
        with err_console.status(f"reading {atlas}"):
            loaded = ModeAtlas.load(atlas)
        with progress_reporter({"pages": "head pages"}, transient=True, unit="pages/s") as progress:
            result = build_report(loaded, out, atlas_dir=str(atlas), compare=compare or (),
                                  preference=preference, mined=mined, maps=maps or (), progress=progress)
        table = Table(title=escape(f"report of {loaded.meta.get('model', atlas)}"), show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("pages", f"{result.n_pages} ({result.n_head_pages} head pages)")
        table.add_row("sections", ", ".join(result.sections))
        table.add_row("image files", str(result.n_images))
        table.add_row("size", f"{result.n_bytes / 1e6:.2f} MB")
        table.add_row("time", f"{result.seconds:.2f} s")
        console.print(table)
        for warning in result.warnings:
            console.print(f"[yellow]{escape(warning)}[/]")
        console.print(escape(f"open {result.index} in a browser (works offline, from disk)"))
