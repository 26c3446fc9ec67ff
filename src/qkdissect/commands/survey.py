"""``qkdissect survey``: the cross-model comparison in one command (many models dissected and compared)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from qkdissect.commands.common import console, guarded, progress_reporter
from qkdissect.commands.dissect import trend_rows, trend_table


def default_list_table() -> Table:
    from qkdissect.model_survey import DEFAULT_MODELS

    table = Table(title="default survey models")
    table.add_column("label")
    table.add_column("spec")
    for model in DEFAULT_MODELS:
        table.add_row(escape(model.label), escape(model.spec))
    return table


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def survey(
        models: Optional[List[str]] = typer.Argument(
            None, help="Model specs (timm:NAME, hf:ID_OR_FOLDER, builtin:NAME, a saved model folder, or a bare timm "
                       "name). None: resume the survey in --out, or the default list (see --list)."),
        out: Path = typer.Option(Path("survey"), "--out", "-o",
                                 help="Survey folder (created; a previous survey there is resumed and extended, any "
                                      "other non-empty folder is refused)."),
        models_file: Optional[Path] = typer.Option(None, "--models",
                                                   help="Text file with one model spec per line (# comments)."),
        list_models: bool = typer.Option(False, "--list", help="Print the default model list and exit."),
        random_init: bool = typer.Option(False, "--random-init", help="Random weights for every model (a null "
                                                                      "survey)."),
        fold_ln: bool = typer.Option(False, "--fold-ln", help="Fold the LayerNorm affine into W_q, W_k."),
        dtype: str = typer.Option("float32", help="SVD precision: float32 or float64."),
        device: str = typer.Option("cpu", help="Device for the decomposition, e.g. cpu or cuda."),
        null_samples: int = typer.Option(1000, help="Gaussian heads sampled for each model's null."),
        null_percentile: float = typer.Option(99.0, help="Central percentile band of the null."),
        seed: int = typer.Option(0, help="Seed of the null sampling and of the bootstrap."),
        trend_samples: int = typer.Option(2000, help="Bootstrap resamplings of the heads for the trend interval."),
    ) -> None:
        """Dissect several models and compare them over relative depth (the paper's cross-model figure).

        One atlas per model in OUT/atlases/; a model that cannot be loaded or dissected is recorded with its
        reason in OUT/survey.json and the others go on; re-running resumes (done models are skipped, failed ones
        tried again). Then OUT/compare/ (compare.json, compare.png: mean weighted cosine against relative depth)
        and a table of each model's early-vs-late trend (OUT/trends.csv): mean C of the first and last third of
        the layers and the slope of the layer-mean C over relative depth with a bootstrap interval over heads.
        `qkdissect report ATLAS --compare OUT` puts the survey on the report's comparison page. Exit 0 when at
        least one model succeeded.
        """
        from qkdissect.model_survey import read_model_list
        from qkdissect.model_survey import survey as run_survey

        if list_models:
            console.print(default_list_table())
            return
        specs = list(models or [])
        if models_file is not None:
            specs += read_model_list(models_file)
        with progress_reporter({"models": "models"}) as progress:
            result = run_survey(specs or None, out, fold_ln=fold_ln, dtype=dtype, device=device,
                                null_samples=null_samples, null_percentile=null_percentile, seed=seed,
                                random_init=random_init, trend_samples=trend_samples, progress=progress)
        rows = []
        for entry in result.done:
            note = "resumed" if entry.spec in result.skipped else f"{entry.seconds:.1f} s"
            rows.append([*trend_rows(entry.label, entry.n_layers, entry.n_heads, result.trends[entry.label]), note])
        console.print(trend_table(rows, f"survey: {len(result.done)} of {len(result.entries)} models done",
                                  extra=("time",)))
        for entry in result.failed:
            console.print(f"[red]failed[/] {escape(entry.label)}: {escape(entry.reason)}", soft_wrap=True)
        console.print(escape(f"wrote {out / 'survey.json'}, {out / 'trends.csv'}, {out / 'compare'}/ (compare.json, "
                             f"compare.png) and {len(result.done)} atlases in {out / 'atlases'}/"))
