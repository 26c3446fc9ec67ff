"""``qkdissect dissect`` and ``qkdissect compare``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from qkdissect.commands.common import console, err_console, guarded, write_json


def summary_table(atlas, title: str) -> Table:
    """Rich table: layer × mean / min / max weighted cosine, share of heads above/below the null."""
    lo, hi = atlas.null.weighted_band
    table = Table(title=title, caption=f"null: Gaussian heads, central {atlas.null.percentile:g}% band "
                                       f"[{lo:+.3f}, {hi:+.3f}] of the weighted cosine")
    for column in ("layer", "mean C", "min C", "max C", "heads > null", "heads < null", "modes > null"):
        table.add_column(column, justify="right")
    for row in atlas.layer_summary():
        table.add_row(str(row["layer"]), f"{row['mean_weighted_cosine']:+.3f}", f"{row['min_weighted_cosine']:+.3f}",
                      f"{row['max_weighted_cosine']:+.3f}", f"{row['share_heads_above_null']:.0%}",
                      f"{row['share_heads_below_null']:.0%}", f"{row['share_modes_above_null']:.0%}")
    return table


def write_figures(atlas, out: Path) -> list[Path]:
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
        from qkdissect import dissect as run_dissect, load_model

        with err_console.status(f"loading {model}"):
            loaded = load_model(model, checkpoint, random_init=random_init)
        with err_console.status("decomposing"):
            atlas = run_dissect(loaded, fold_ln=fold_ln, dtype=dtype, device=device, null_samples=null_samples,
                                null_percentile=null_percentile, seed=seed)
        atlas.save(out)
        figures = write_figures(atlas, out)
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
        from qkdissect.decomposition import ModeAtlas
        from qkdissect.errors import QKDissectError
        from qkdissect.plots import plot_compare

        if len(atlases) < 2:
            raise QKDissectError("compare needs at least two atlas folders.")
        loaded = [ModeAtlas.load(path) for path in atlases]
        names = labels.split(",") if labels else [str(a.meta.get("model", p)) for a, p in zip(loaded, atlases)]
        if len(names) != len(loaded):
            raise QKDissectError(f"got {len(names)} labels for {len(loaded)} atlases.")
        figure = plot_compare(loaded, names, out / "compare.png")
        write_json(out / "compare.json", {"models": [
            {"label": name, "atlas": str(path), "model": atlas.meta.get("model"), "n_layers": atlas.n_layers,
             "null_band": list(atlas.null.weighted_band), "layers": atlas.layer_summary()}
            for name, path, atlas in zip(names, atlases, loaded)]})
        for name, atlas in zip(names, loaded):
            console.print(summary_table(atlas, name))
        console.print(f"wrote {figure} and {out / 'compare.json'}")
