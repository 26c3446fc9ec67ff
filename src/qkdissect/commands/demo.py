"""``qkdissect demo``: every analysis on the embedded model, offline, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.markup import escape

from qkdissect.commands.common import console, err_console, guarded, progress_reporter
from qkdissect.formats import validated
from qkdissect.formats.demo import DEMO_FORMAT, DEMO_INDEX, DemoDocument


def _step(number: int, total: int, title: str) -> None:
    console.rule(f"[bold]{number}/{total}  {escape(title)}")


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def demo(
        out: Path = typer.Option(Path("demo"), "--out", "-o", help="Output folder (created). Running the demo again "
                                                                  "on it resumes: see below."),
        model: str = typer.Option("builtin:oddvit", help="Model spec to demonstrate on (any image model spec)."),
        quick: bool = typer.Option(False, "--quick", help="Small settings (about a minute): fewer images, "
                                                          "fewer bootstrap samples."),
        images: int = typer.Option(0, help="World images to mine (0: 1000, or 48 with --quick)."),
        odd_images: int = typer.Option(0, help="Odd-one-out images for the preference (0: 300, or 24 with --quick)."),
        seed: int = typer.Option(0, help="Seed of the generated images."),
    ) -> None:
        """Run every qkdissect analysis on the embedded model (builtin:oddvit) and write an HTML report.

        Steps: dissect the model (atlas + figures); generate an image set from its procedural world; per-image
        query/key maps of a head; mine the top images of every mode over the set; generate odd-one-out images
        and measure the attention preference between objects; build the HTML report. Works offline; prints
        where to look at the end.

        Running it again on the same --out (after it finished, or after it was interrupted) resumes: the mining
        step continues from its checkpoint (or keeps its finished result when the settings are the same), every
        other step rebuilds its own files, and the result is the same file for file. Only the demo's own files
        are replaced; a non-empty folder that is not a demo folder is refused. With other settings the finished
        mining run cannot be continued: use another --out.
        """
        from qkdissect import dissect, load_model
        from qkdissect.commands.dissect import summary_table, write_figures
        from qkdissect.errors import QKDissectError
        from qkdissect.mining import mine
        from qkdissect.outputs import OutputFolder
        from qkdissect.preference import run_preference, save_preference
        from qkdissect.report import build_report
        from qkdissect.synthetic.oddoneout import generate_oddoneout
        from qkdissect.synthetic.world import write_world_images
        from qkdissect.views import prepare_view, run_maps

        n_world = images or (48 if quick else 1000)
        n_odd = odd_images or (24 if quick else 300)
        started = time.perf_counter()
        steps = 6
        demo_folder = OutputFolder(out, DEMO_FORMAT, DEMO_INDEX, noun="demo folder").claim(replace=True)

        _step(1, steps, f"dissect {model}")
        with err_console.status(f"loading {model}"):
            loaded = load_model(model)
        if loaded.adapter.modality != "image":
            raise QKDissectError(f"the demo needs an image model; {model} reads {loaded.adapter.modality}.")
        atlas = dissect(loaded, null_samples=200 if quick else 1000, seed=seed)
        atlas.save(out / "atlas", extra=lambda folder: write_figures(atlas, folder))
        console.print(summary_table(atlas, f"{loaded.spec}: weighted cosine Σσcos/Σσ per layer"))

        _step(2, steps, f"generate {n_world} images of the procedural world")
        height, width = loaded.preprocessing.image_size
        with progress_reporter({"world": "world images"}) as progress:
            world = write_world_images(out / "world", n_world, seed=seed, size=min(height, width),
                                       progress=progress)

        _step(3, steps, "query/key maps of the most grouping head of layer 0")
        head = int(atlas.weighted_cosines[0].nan_to_num(float("-inf")).argmax())
        picked = sorted(world.glob("*.png"))[:3]
        context = prepare_view(loaded, atlas)
        with progress_reporter({"maps": f"maps (layer 0, head {head})"}) as progress:
            run_maps(context, out / "maps", layer=0, head=head, modes=[0, 1, 2, 3], images=picked,
                     progress=progress)

        _step(4, steps, f"mine the top images of every mode over {n_world} images")
        # contact sheets of the head of step 3 only: the report draws the top images of every head on its head
        # pages from the stored maps (the other sheets: `qkdissect sheets DEMO/mined`)
        with progress_reporter({"mining": "mining images", "sheets": "contact sheets"}) as progress:
            try:
                mine(loaded, world, out / "mined", top_k=6 if quick else 9, batch_size=32, atlas=atlas,
                     sheet_modes=(0, 1) if quick else (0, 1, 2, 3), resume=True, sheets=[(0, head)],
                     progress=progress)
            except QKDissectError as error:
                raise QKDissectError(f"{error} ({out} holds a demo run with other settings: use another --out.)") \
                    from None

        _step(5, steps, f"attention preference on {n_odd} odd-one-out images")
        with progress_reporter({"oddoneout": "odd-one-out images", "preference": "preference"}) as progress:
            generate_oddoneout(out / "oddoneout", n_odd, (height, width), seed=seed, objects=(3, 5),
                               overwrite=True, progress=progress)
            preference = run_preference(loaded, out / "oddoneout", atlas=atlas, n_boot=200 if quick else 1000,
                                        seed=seed, progress=progress)
        save_preference(preference, out / "preference")
        same, other = (preference.curve("target", "measured", "raw", c).mean for c in ("same", "other"))
        console.print("attention of target queries, per layer:\n"
                      "  to the same object:   " + " ".join(f"{v:.3f}" for v in same) + "\n"
                      "  to the other objects: " + " ".join(f"{v:.3f}" for v in other))

        _step(6, steps, "HTML report")
        with progress_reporter({"pages": "head pages"}, transient=True) as progress:
            result = build_report(atlas, out / "report", atlas_dir=str(out / "atlas"), preference=out / "preference",
                                  mined=out / "mined", maps=[out / "maps"], progress=progress)
        for warning in result.warnings:
            console.print(f"[yellow]{escape(warning)}[/]")
        demo_document = {"format": DEMO_FORMAT, "format_version": 1, "model": model, "quick": quick, "images": n_world,
                            "odd_images": n_odd, "seed": seed,
                            "parts": {"atlas": "atlas/atlas.json", "world": "world/world.json",
                                      "maps": "maps/maps.json", "mined": "mined/mined.json",
                                      "oddoneout": "oddoneout/manifest.json",
                                      "preference": "preference/preference.json", "report": "report/report.json"}}
        validated(DemoDocument, demo_document, out / DEMO_INDEX, "this is a bug in qkdissect: please report it")
        demo_folder.finish(demo_document)

        console.rule("[bold green]done")
        console.print(f"finished in {time.perf_counter() - started:.0f} s. Look at:\n"
                      f"  {result.index}   the HTML report (open it in a browser; works offline)\n"
                      f"  {out / 'atlas' / 'layer_similarity.png'}   similarity of query and key modes by layer\n"
                      f"  {out / 'mined'}   top images of every mode (on the report's head pages; contact sheets "
                      f"of layer 0, head {head}; the others: qkdissect sheets {out / 'mined'})\n"
                      f"  {out / 'maps'}   query (red) / key (cyan) maps of layer 0, head {head}\n"
                      f"  {out / 'preference' / 'preference.png'}   same object / other objects / background by layer",
                      highlight=False)
