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
    for row in rows:
        table.add_row(str(row["layer"]), f"{row['mean_weighted_cosine']:+.3f}", f"{row['min_weighted_cosine']:+.3f}",
                      f"{row['max_weighted_cosine']:+.3f}", f"{row['share_heads_above_null']:.0%}",
                      f"{row['share_heads_below_null']:.0%}", f"{row['share_modes_above_null']:.0%}")
    return table


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
    from qkdissect.plots import plot_layer_similarity, plot_mode_cosines

    return [plot_layer_similarity(atlas, out / "layer_similarity.png"),
            plot_mode_cosines(atlas, out / "mode_cosines.png")]


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
    ) -> None:
        """Decompose every head's W_qᵀW_k into singular modes; write atlas.safetensors, atlas.json and figures.

        Prints per layer the mean/min/max weighted cosine Σσcos/Σσ (+1: heads attend to similar tokens,
        −1: to dissimilar ones) and the share of heads outside the Gaussian null band.
        """
        from qkdissect import dissect as run_dissect
        from qkdissect import load_model
        from qkdissect.decomposition import ATLAS_FORMAT
        from qkdissect.outputs import check_out

        check_out(out, ATLAS_FORMAT, "atlas.json")
        with err_console.status(f"loading {model}"):
            loaded = load_model(model, checkpoint, random_init=random_init)
        with err_console.status("decomposing"):
            atlas = run_dissect(loaded, fold_ln=fold_ln, dtype=dtype, device=device, null_samples=null_samples,
                                null_percentile=null_percentile, seed=seed)
        atlas.save(out, extra=lambda folder: write_figures(atlas, folder))
        figures = [out / "layer_similarity.png", out / "mode_cosines.png"]
        console.print(summary_table(atlas, f"{loaded.spec} — {loaded.family}, {atlas.n_layers} layers × "
                                           f"{atlas.n_heads} heads, d_model {atlas.d_model}, d_head {atlas.rank}"))
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
