"""``qkdissect oddoneout`` (generate odd-one-out images with exact masks) and ``qkdissect preference``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from qkdissect.commands.common import console, err_console, guarded, parse_int_list, progress_reporter
from qkdissect.errors import QKDissectError


def parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); '160x224' -> (160, 224) as (height, width)."""
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise QKDissectError(f"could not read size {text!r}; give one number (square) or HEIGHTxWIDTH, e.g. 160x224.")
    return (values[0], values[-1])


def parse_objects(text: str) -> int | tuple[int, int]:
    """'5' -> 5; '3-6' -> (3, 6) (drawn per image)."""
    values = parse_int_list(text, "--objects")
    if len(values) == 1:
        return values[0]
    if values != list(range(values[0], values[-1] + 1)):
        raise QKDissectError(f"--objects takes a count (5) or a range (3-6), got {text!r}.")
    return values[0], values[-1]


def preference_table(result, title: str, query: str = "target") -> Table:
    """Rich table: per layer, the measured shares with intervals and the top-m predictions."""
    tops = [s for s in result.sources if s.startswith("top")]
    table = Table(title=title, caption="mean \\[bootstrap interval] over images of the head mean; area: per unit "
                                       "area (1 = uniform); no self: query token left out; prefix: attention to "
                                       "prefix tokens before renormalising")
    for column in ("layer", "same", "other", "background", "same/area", "other/area", "same, no self",
                   "same from " + "/".join(f"top{s[3:]}" for s in tops) if tops else "", "prefix"):
        table.add_column(column, justify="right")

    def cell(source: str, variant: str, category: str, index: int, interval: bool = False) -> str:
        curve = result.curve(query, source, variant, category)
        text = f"{curve.mean[index]:.3f}"
        return text + (f" [{curve.lo[index]:.3f}–{curve.hi[index]:.3f}]" if interval else "")

    q = ("target", "distractor").index(query)
    for index, layer in enumerate(result.layers):
        table.add_row(str(layer), *(cell("measured", "raw", c, index, True) for c in ("same", "other", "background")),
                      cell("measured", "area", "same", index), cell("measured", "area", "other", index),
                      cell("measured", "noself", "same", index),
                      "/".join(cell(s, "raw", "same", index) for s in tops),
                      f"{result.prefix_layer.mean[index, q, 0]:.3f}")
    return table


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def oddoneout(
        out: Path = typer.Option(Path("oddoneout"), "--out", "-o", help="Output folder (O3 layout: images/, "
                                                                        "targ_images/, dist_images/, manifest.json)."),
        n: int = typer.Option(500, "--n", help="Number of images."),
        size: str = typer.Option("224", help="Image size: one number (square) or HEIGHTxWIDTH."),
        seed: int = typer.Option(0, help="Seed: image i is drawn from the generator seeded with (seed, i)."),
        feature: str = typer.Option("mix", help="How the target differs from the distractors: colour, shape, size, "
                                                "orientation, or mix (one of the four drawn per image)."),
        objects: str = typer.Option("5", help="Objects per image (target included): a count, or a range like 3-6."),
        radius: Optional[float] = typer.Option(None, help="Object radius in px (default: min(size)/14)."),
        noise: float = typer.Option(12.0, help="Std of the Gaussian background pixel noise (0–255 scale)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a data set generated earlier in --out "
                                                                  "(only the files its manifest.json lists)."),
    ) -> None:
        """Generate odd-one-out images (one target differing from identical distractors) with exact masks.

        Writes images/NAME.png, targ_images/NAME.png (target mask), dist_images/NAME.png (union of distractor
        masks) and manifest.json (seed, feature, per image the objects and their boxes). Same options, same
        seed: byte-identical files. Read it back with `qkdissect preference MODEL --data OUT`.
        """
        from qkdissect.outputs import check_out
        from qkdissect.synthetic.oddoneout import FORMAT, MANIFEST, generate_oddoneout

        check_out(out, FORMAT, MANIFEST, replace=overwrite, flag="--overwrite")
        hw = parse_size(size)
        started = time.perf_counter()
        with progress_reporter({"oddoneout": "drawing"}, unit="img/s") as progress:
            manifest = generate_oddoneout(out, n, hw, seed=seed, feature=feature, objects=parse_objects(objects),
                                          noise=noise, radius=radius, overwrite=overwrite, progress=progress)
        table = Table(title=f"odd-one-out data set in {out}")
        table.add_column("feature")
        table.add_column("images", justify="right")
        for name, count in manifest["features"].items():
            table.add_row(name, str(count))
        console.print(table)
        console.print(f"{n} images of {hw[0]}×{hw[1]} px, seed {seed}, {objects} objects, "
                      f"{time.perf_counter() - started:.1f} s; manifest: {out / 'manifest.json'}")

    @app.command()
    @guarded
    def preference(
        model: str = typer.Argument(..., help="Model spec: timm:NAME, hf:ID_OR_FOLDER, builtin:NAME, a saved "
                                              "model folder, or a bare timm name (an image model)."),
        data: Path = typer.Option(..., "--data", "-d", help="Folder in the O3 layout (images/, targ_images/, "
                                                            "dist_images/), e.g. from `qkdissect oddoneout`."),
        out: Path = typer.Option(Path("preference"), "--out", "-o", help="Output folder."),
        checkpoint: Optional[Path] = typer.Option(None, help="Weights (safetensors / torch state dict) for the "
                                                             "architecture named by MODEL."),
        random_init: bool = typer.Option(False, "--random-init", help="Random weights instead of pretrained ones."),
        atlas: Optional[Path] = typer.Option(None, help="Atlas folder of this model (`qkdissect dissect`); "
                                                        "default: decompose now."),
        top_modes: str = typer.Option("1,2,4", help="Predict attention also from only the m leading modes per head, "
                                                    "for each m given (0 = key bias only)."),
        threshold: float = typer.Option(0.25, help="Skip an image when no patch is at least this fraction target "
                                                   "(the target vanishes at the patch resolution); the same for "
                                                   "distractor queries."),
        layers: Optional[str] = typer.Option(None, help="Layers to analyse, e.g. 0,3,5 or 0-5 (default: all)."),
        batch_size: int = typer.Option(16, help="Images per forward pass."),
        limit: Optional[int] = typer.Option(None, help="Analyse only the first N images (sorted by name)."),
        bootstrap: int = typer.Option(1000, help="Bootstrap resamples of the images."),
        confidence: float = typer.Option(0.95, help="Confidence of the bootstrap intervals."),
        seed: int = typer.Option(0, help="Seed of the bootstrap."),
        device: str = typer.Option("cpu", help="Device for the model, e.g. cpu or cuda."),
    ) -> None:
        """Attention from target (and distractor) query tokens to the same object, other objects and background.

        Per layer and head: attention recomputed from the captured attention inputs, prefix tokens dropped and
        the row renormalised; raw, area-normalised and query-token-excluded shares; mean and bootstrap
        intervals over images; the same predicted from all QK modes and from the top-m modes. Writes
        preference.json, preference.safetensors, CSV tables, problems.csv and two PNG figures.
        """
        from qkdissect import load_model
        from qkdissect.decomposition import ModeAtlas
        from qkdissect.outputs import check_out
        from qkdissect.preference import run_preference, save_preference
        from qkdissect.preference.result import FORMAT
        from qkdissect.synthetic.oddoneout import read_o3_folder

        check_out(out, FORMAT, "preference.json")
        folder = read_o3_folder(data)
        with err_console.status(f"loading {model}"):
            loaded = load_model(model, checkpoint, random_init=random_init)
            loaded.model.to(device)
        mode_atlas = ModeAtlas.load(atlas) if atlas is not None else None
        with progress_reporter({"preference": "attention"}, unit="img/s") as progress:
            result = run_preference(loaded, folder, atlas=mode_atlas, top_modes=parse_int_list(top_modes, "--top-modes"),
                                    threshold=threshold, batch_size=batch_size,
                                    layers=None if layers is None else parse_int_list(layers, "--layers"),
                                    n_boot=bootstrap, confidence=confidence, seed=seed, limit=limit,
                                    progress=progress)
        written = save_preference(result, out)
        meta = result.meta
        if not result.names:
            raise QKDissectError(f"no usable image in {data} ({len(result.problems)} problems, listed in "
                                 f"{out / 'problems.csv'}); nothing to measure.")
        for query in ("target", "distractor"):
            console.print(preference_table(result, f"{loaded.spec}: {query} queries (n = {result.n_images(query)}), "
                                                   f"grid {meta['patch_grid'][0]}×{meta['patch_grid'][1]}", query))
        agreement = max(meta["agreement"]["max_abs_diff_modes_vs_measured"])
        console.print(f"attention from all modes vs. measured: max |difference| {agreement:.2e}")
        if result.problems:
            counts = ", ".join(f"{kind}: {count}" for kind, count in sorted(result.skipped.items()))
            skipped = sum(result.skipped.values())
            console.print(f"[yellow]skipped {skipped} image{'s' if skipped != 1 else ''} ({counts}); "
                          f"{len(result.problems)} problem{'s' if len(result.problems) != 1 else ''} listed in "
                          f"{out / 'problems.csv'}[/]")
        unavailable = meta["distractor_query_unavailable"]
        if unavailable:
            console.print(f"[yellow]distractor query unavailable in {sum(unavailable.values())} of the used images "
                          f"({', '.join(f'{k}: {v}' for k, v in unavailable.items())})[/]")
        console.print("wrote " + ", ".join(str(p) for p in written))
