"""``qkdissect dissect`` and ``qkdissect compare``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import typer
from rich.markup import escape
from rich.table import Table

from qkdissect.commands.common import console, err_console, guarded

if TYPE_CHECKING:
    from qkdissect.comparison import DepthTrend
    from qkdissect.decomposition import ModeAtlas


def summary_table(atlas: ModeAtlas, title: str) -> Table:
    """Rich table: layer × mean / min / max weighted cosine, share of heads above/below the null."""
    return layer_table(atlas.layer_summary(), atlas.null.weighted_band, title,
                       f"central {atlas.null.percentile:g}% band")


def layer_table(rows: Sequence[dict[str, Any]], band: tuple[float, float], title: str, what: str = "band") -> Table:
    """Rich table of ``ModeAtlas.layer_summary()`` rows with the null ``band`` of the weighted cosine."""
    lo, hi = band
    table = Table(title=title, caption=f"null: Gaussian heads, {what} [{lo:+.3f}, {hi:+.3f}] of the weighted cosine")
    for column in ("layer", "mean C", "min C", "max C", "heads > null", "heads < null", "modes > null"):
        table.add_column(column, justify="right")
    def cell(value: Any, spec: str) -> str:
        return "—" if value is None or value != value else format(value, spec)  # NaN: nothing defined

    for row in rows:
        table.add_row(str(row["layer"]), cell(row["mean_weighted_cosine"], "+.3f"),
                      cell(row["min_weighted_cosine"], "+.3f"), cell(row["max_weighted_cosine"], "+.3f"),
                      cell(row["share_heads_above_null"], ".0%"), cell(row["share_heads_below_null"], ".0%"),
                      cell(row["share_modes_above_null"], ".0%"))
    return table


def undefined_note(atlas: ModeAtlas) -> str | None:
    """The rank-0 heads and undefined modes of ``atlas`` in one sentence, or None when every mode is defined."""
    rank0 = atlas.rank0_heads()
    undefined = int((~atlas.defined).sum())
    if not undefined:
        return None
    text = (f"{undefined} undefined mode(s) (σ_k ≤ {atlas.undefined_tolerance:.2g}·σ_1: no cosine, no map, left out "
            "of the statistics)")
    if rank0:
        heads = ", ".join(f"layer {layer} head {head}" for layer, head in rank0[:12])
        text += f"; {len(rank0)} head(s) of rank 0 (W_qᵀW_k = 0): {heads}" + (" …" if len(rank0) > 12 else "")
    return text + "."


def trend_rows(label: str, n_layers: int, n_heads: int, trend: DepthTrend) -> list[str]:
    """The cells of one model in :func:`trend_table`."""
    def signed(value: float) -> str:
        return "—" if value != value else f"{value:+.3f}"  # NaN: undefined (one layer)

    return [escape(label), f"{n_layers} × {n_heads}", signed(trend.early), signed(trend.late), signed(trend.slope),
            "—" if trend.low != trend.low else f"[{trend.low:+.3f}, {trend.high:+.3f}]", trend.direction]


def trend_table(rows: Sequence[list[str]], title: str = "early-vs-late trend", level: float = 0.95,
                extra: Sequence[str] = ()) -> Table:
    """Rich table of :func:`trend_rows` (plus ``extra`` columns): mean C over the first and last third of the
    layers, the slope of the layer-mean C over relative depth and its bootstrap interval over heads."""
    table = Table(title=title, caption=f"slope: least-squares slope of the layer-mean weighted cosine against "
                                       f"relative depth; interval: central {level:.0%} of a bootstrap over heads; "
                                       "rises / falls when the interval excludes 0")
    for column in ("model", "layers × heads", "early C", "late C", "slope", f"{level:.0%} CI", "trend", *extra):
        table.add_column(column, justify="left" if column in ("model", "trend", *extra) else "right",
                         no_wrap=column not in ("model", "layers × heads", *extra))
    for row in rows:
        table.add_row(*row)
    return table


def write_figures(atlas: ModeAtlas, out: Path) -> list[Path]:
    from qkdissect.plots import plot_distance_curves, plot_layer_similarity, plot_mode_cosines

    figures = [plot_layer_similarity(atlas, out / "layer_similarity.png"),
               plot_mode_cosines(atlas, out / "mode_cosines.png")]
    if any(layer.positional is not None and layer.positional.distance_cosine is not None for layer in atlas.layers):
        figures.append(plot_distance_curves(atlas, out / "distance_similarity.png"))
    return figures


def write_offsets(document: dict, tensors: dict, out: Path) -> list[Path]:
    """offsets.json / offsets.safetensors (see qkdissect.positional.offset_document)."""
    from safetensors.torch import save_file

    from qkdissect.files import atomic_write, write_json

    atomic_write(out / "offsets.safetensors", lambda p: save_file(tensors, str(p)))
    write_json(out / "offsets.json", document)
    return [out / "offsets.json", out / "offsets.safetensors"]


def print_offsets(atlas: ModeAtlas, document: dict) -> None:
    """One table per offset: per rotary layer the head-mean weighted cosine at the offset and at Δ = 0."""
    for entry in document["offsets"]:
        table = Table(title=f"modes at offset {tuple(entry['offset'])} (key − query)")
        for column in ("layer", "pairs", "mean C(Δ)", "mean C(0)"):
            table.add_column(column, justify="right")
        for row in entry["layers"]:
            values = [h["weighted_cosine"] for h in row["heads"]]
            content = atlas.weighted_cosines[row["layer"], :len(values)].double().mean()
            table.add_row(str(row["layer"]), str(row["pairs"]), f"{sum(values) / len(values):+.3f}", f"{float(content):+.3f}")
        console.print(table)


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def dissect(
        model: str = typer.Argument(..., help="Model spec: timm:NAME, hf:ID_OR_FOLDER, builtin:NAME, a saved "
                                              "model folder, or a bare timm name."),
        out: Path = typer.Option(Path("atlas"), "--out", "-o", help="Output folder for atlas files and figures."),
        checkpoint: Optional[Path] = typer.Option(None, help="Weights (safetensors / torch state dict) for the "
                                                             "architecture named by MODEL."),
        random_init: bool = typer.Option(False, "--random-init", help="Random weights instead of pretrained ones."),
        fold_ln: bool = typer.Option(False, "--fold-ln", help="Fold the LayerNorm affine (γ, β) into W_q, W_k and "
                                                              "the biases (modes then act on the normalised input)."),
        dtype: str = typer.Option("float32", help="SVD precision: float32 or float64."),
        device: str = typer.Option("cpu", help="Device for the decomposition, e.g. cpu or cuda."),
        null_samples: int = typer.Option(1000, help="Gaussian heads sampled for the null."),
        null_percentile: float = typer.Option(99.0, help="Central percentile band of the null."),
        seed: int = typer.Option(0, help="Seed of the null sampling."),
        offset: Optional[list[str]] = typer.Option(
            None, "--offset", help="Rotary models: also write the modes of M(Δ) = W_qᵀR(Δ)W_k at this offset of the key "
                                   "from the query, DY,DX in patches (D in tokens for text; negative: key before "
                                   "the query), to offsets.json / offsets.safetensors. Repeatable."),
    ) -> None:
        """Decompose every head's W_qᵀW_k into singular modes; write atlas.safetensors, atlas.json and figures.

        Prints per layer the mean/min/max weighted cosine Σσcos/Σσ (+1: heads attend to similar tokens,
        −1: to dissimilar ones) and the share of heads outside the Gaussian null band.
        """
        from qkdissect import dissect as run_dissect
        from qkdissect import load_model
        from qkdissect.decomposition import ATLAS_FORMAT
        from qkdissect.outputs import check_out
        from qkdissect.positional import parse_offset

        check_out(out, ATLAS_FORMAT, "atlas.json")
        offsets = [parse_offset(text) for text in offset or []]
        with err_console.status(f"loading {model}"):
            loaded = load_model(model, checkpoint, random_init=random_init)
        with err_console.status("decomposing"):
            atlas = run_dissect(loaded, fold_ln=fold_ln, dtype=dtype, device=device, null_samples=null_samples,
                                null_percentile=null_percentile, seed=seed)
        offset_files = None
        if offsets:
            from qkdissect.positional import offset_document

            offset_files = offset_document(atlas, offsets)  # refuses bad offsets before anything is written
        written: list[Path] = []

        def extra(folder: Path) -> None:
            written.extend(out / p.name for p in write_figures(atlas, folder))
            if offset_files is not None:
                written.extend(out / p.name for p in write_offsets(*offset_files, folder))

        atlas.save(out, extra=extra)
        figures = written
        if offset_files is not None:
            print_offsets(atlas, offset_files[0])
        console.print(summary_table(atlas, f"{loaded.spec} — {loaded.family}, {atlas.n_layers} layers × "
                                           f"{atlas.n_heads} heads, d_model {atlas.d_model}, d_head {atlas.rank}"))
        note = undefined_note(atlas)
        if note:
            console.print(f"[yellow]{escape(note)}[/]")
        degenerate = int(atlas.degenerate.sum())
        if degenerate:
            console.print(f"[yellow]{degenerate} pairs of near-degenerate singular values (relative gap < "
                          f"{atlas.gap_tol:g}): their singular vectors are not individually defined (listed per "
                          "head in atlas.json).[/]")
        console.print(f"wrote {out / 'atlas.safetensors'}, {out / 'atlas.json'}, "
                      + ", ".join(str(f) for f in figures))

    @app.command()
    @guarded
    def compare(
        atlases: list[Path] = typer.Argument(..., help="Two or more atlas folders written by `qkdissect dissect`."),
        out: Path = typer.Option(Path("compare"), "--out", "-o", help="Output folder."),
        labels: Optional[str] = typer.Option(None, help="Comma-separated labels (default: the model specs)."),
    ) -> None:
        """Layer-wise similarity curves of several models side by side (relative depth on the x axis)."""
        from qkdissect.comparison import FORMAT
        from qkdissect.comparison import compare as run_compare
        from qkdissect.outputs import check_out

        check_out(out, FORMAT, "compare.json")
        comparison = run_compare(atlases, labels.split(",") if labels else None)
        figure, index = comparison.save(out)
        for model in comparison.models:
            console.print(layer_table(model.layers, model.band, model.label))
        console.print(trend_table([trend_rows(m.label, m.n_layers, m.n_heads, m.trend()) for m in comparison.models]))
        console.print(f"wrote {figure} and {index}")
