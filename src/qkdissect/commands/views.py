"""``qkdissect maps``, ``qkdissect rank``, ``qkdissect mine`` and ``qkdissect sheets``: image-level views of the modes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from qkdissect.commands.common import console, err_console, guarded, parse_int_list, progress_reporter

MODEL_HELP = ("Model spec: timm:NAME, hf:ID_OR_FOLDER, builtin:NAME, a saved model folder, or a bare timm name.")
BAD_IMAGE_POLICY = ("Images are opened with their own format (jpg/jpeg/png/webp/bmp/tif) and read faithfully: "
                    "1-, 8-, 16- and 32-bit integer and float pixels are scaled to 8 bits (never clipped), grey, "
                    "palette, CMYK and alpha images are converted to RGB (alpha on white), EXIF orientation is "
                    "applied. A file is refused with its reason when it is empty (0 bytes), not an "
                    "image, truncated, a decompression bomb, smaller than 2 px on a side (so a 1×1 image is refused) or "
                    "has an aspect ratio beyond 50:1 (so a 1000×5 image is refused).")


def _load(model: str, checkpoint: Optional[Path], random_init: bool, atlas: Optional[Path]):
    from qkdissect import load_model
    from qkdissect.decomposition import ModeAtlas
    from qkdissect.views import prepare_view

    with err_console.status(f"loading {model}"):
        loaded = load_model(model, checkpoint, random_init=random_init)
    with err_console.status("decomposing W_qᵀW_k"):
        return prepare_view(loaded, None if atlas is None else ModeAtlas.load(atlas))


def _fail_after(failed, what: str) -> None:
    from qkdissect.errors import QKDissectError

    if failed:
        listing = "; ".join(f"{f['source']}: {f['reason']}" for f in failed[:10])
        raise QKDissectError(f"{len(failed)} file(s) could not be read ({listing}). The other inputs were "
                             f"processed and written ({what}); fix or remove the listed files.")


def register(app: typer.Typer) -> None:
    @app.command()
    @guarded
    def maps(
        model: str = typer.Argument(..., help=MODEL_HELP),
        images: Optional[list[Path]] = typer.Argument(None, help="Image files (image models)."),
        layer: int = typer.Option(..., "--layer", "-l", help="Layer (0-based)."),
        head: int = typer.Option(..., "--head", help="Head (0-based)."),
        modes: str = typer.Option("0-3", help="Modes, e.g. 0-5 or 0,2,7 (0 = largest singular value)."),
        text: Optional[list[str]] = typer.Option(None, "--text", help="A text to read (text models; repeatable)."),
        signs: str = typer.Option("both", help="'both': overlays for (u, v) and (−u, −v); 'best': only the sign "
                                               "with the larger score, named in the figure."),
        out: Path = typer.Option(Path("maps"), "--out", "-o", help="Output folder."),
        checkpoint: Optional[Path] = typer.Option(None, help="Weights for the architecture named by MODEL."),
        random_init: bool = typer.Option(False, "--random-init", help="Random weights instead of pretrained ones."),
        atlas: Optional[Path] = typer.Option(None, help="Use this atlas folder (from `qkdissect dissect`) instead "
                                                        "of decomposing the model again."),
    ) -> None:
        """Query and key maps of a head's modes for each image (or text).

        Per image and mode: an overlay PNG (query map u·x̃ in red, key map v·x̃ in cyan, on the crop the model
        saw; rings at the maxima; both signs or the stronger one), the raw maps and the mode's contribution
        σ·q_p·k_p'·scale to the head's logits (maps.safetensors) and its share of the head's logit variance.
        Prefix tokens (CLS, distillation, registers) are dropped from the maps and kept apart. For a text model
        (--text) a token strip: per token the query (red) and key (cyan) value of each mode, values printed.
        Bad files are reported after every good file is written.
        """
        from qkdissect.outputs import check_out
        from qkdissect.views import run_maps
        from qkdissect.views.context import MAPS_FORMAT

        check_out(out, MAPS_FORMAT, "maps.json")
        ctx = _load(model, checkpoint, random_init, atlas)
        selected = parse_int_list(modes, "modes")
        sources, texts = list(images or []), list(text or [])
        with progress_reporter() as progress:
            result = run_maps(ctx, out, layer=layer, head=head, modes=selected, images=sources, texts=texts,
                              signs=signs, progress=progress)
        table = Table(title=f"{ctx.loaded.spec}: layer {layer} head {head}, modes {selected}",
                      caption="share: of the head's logit variance; score± = max(0,max ±q)·max(0,max ±k)")
        for column in ("input", "mode", "σ", "cos(u,v)", "share", "score +", "score −"):
            table.add_column(column, justify="right" if column != "input" else "left")
        for item in result.items:
            name = Path(item.source).name if item.kind == "image" else item.source[:40]
            for entry in item.entry["modes"]:
                table.add_row(name, str(entry["mode"]), f"{entry['sigma']:.3g}", f"{entry['cosine']:+.2f}",
                              f"{entry['share']:.1%}", f"{entry['score']['+']:.3g}", f"{entry['score']['-']:.3g}")
                name = ""
        console.print(table)
        console.print(f"wrote {len(result.items)} input(s) to {out}/ (index: {out / 'maps.json'})")
        _fail_after(list(result.failed), f"see {out / 'maps.json'}")

    @app.command()
    @guarded
    def rank(
        model: str = typer.Argument(..., help=MODEL_HELP),
        images: Optional[list[Path]] = typer.Argument(None, help="Image files (image models)."),
        layer: str = typer.Option(..., "--layer", "-l", help="Layer(s), e.g. 3 or 0-11."),
        text: Optional[list[str]] = typer.Option(None, "--text", help="A text to read (text models; repeatable)."),
        top: int = typer.Option(15, help="Rows shown per input (all rows go to rank.csv)."),
        by: str = typer.Option("share", help="'share': of the head's logit variance; 'variance': share × the "
                                             "head's logit variance (compares heads too)."),
        patches_only: bool = typer.Option(False, "--patches-only", help="Leave prefix tokens (CLS, registers) "
                                                                         "out of queries and keys."),
        out: Path = typer.Option(Path("rank"), "--out", "-o", help="Output folder."),
        checkpoint: Optional[Path] = typer.Option(None, help="Weights for the architecture named by MODEL."),
        random_init: bool = typer.Option(False, "--random-init", help="Random weights instead of pretrained ones."),
        atlas: Optional[Path] = typer.Option(None, help="Use this atlas folder instead of decomposing again."),
    ) -> None:
        """Which modes carry each head's attention in this image: (head, mode) ranked by the share of the
        head's logit variance the mode explains.

        The logits of each query row are centred over the keys (constants cancel in the softmax); mode k's
        share is ⟨C̄_k, L̄⟩/⟨L̄, L̄⟩, so the shares of all modes plus the key-bias term sum to 1 (a negative
        share works against the rest). Writes rank.csv (every row), rank.json and a bar chart per input.
        """
        from qkdissect.outputs import check_out
        from qkdissect.views import run_rank
        from qkdissect.views.context import RANK_FORMAT

        check_out(out, RANK_FORMAT, "rank.json")
        ctx = _load(model, checkpoint, random_init, atlas)
        layers = parse_int_list(layer, "layer")
        sources, texts = list(images or []), list(text or [])
        with progress_reporter() as progress:
            result = run_rank(ctx, out, layers=layers, images=sources, texts=texts, top=top, by=by,
                              patches_only=patches_only, progress=progress)
        for item in result.items:
            name = Path(item["source"]).name if item["kind"] == "image" else item["source"][:50]
            table = Table(title=f"{name}: top {len(item['top'])} of {len(layers)} layer(s) × {ctx.atlas.n_heads} "
                                f"heads × {ctx.atlas.rank} modes")
            for column in ("layer", "head", "mode", "σ", "cos(u,v)", "share", "head logit var"):
                table.add_column(column, justify="right")
            for row in item["top"]:
                table.add_row(str(row["layer"]), str(row["head"]), str(row["mode"]), f"{row['sigma']:.3g}",
                              f"{row['cosine']:+.2f}", f"{row['share']:.1%}", f"{row['head_logit_variance']:.3g}")
            console.print(table)
        console.print(f"wrote {out / 'rank.csv'}, {out / 'rank.json'} and {len(result.items)} chart(s)")
        _fail_after(list(result.failed), f"see {out / 'rank.json'}")

    @app.command()
    @guarded
    def mine(
        model: str = typer.Argument(..., help=MODEL_HELP),
        images: str = typer.Option(..., "--images", "-i", help="An image folder (read recursively in sorted order), "
                                   "a file list (.txt/.lst, or .csv/.tsv with a 'path' column), WebDataset .tar "
                                   "shards ('shards/{000000..000099}.tar', one .tar, or a folder of them) or Parquet "
                                   "files (one .parquet or a folder) with an image-bytes column."),
        image_column: Optional[str] = typer.Option(None, help="Parquet: the column with the encoded images (binary, "
                                                   "or a struct with 'bytes'; default: 'image' or the only binary "
                                                   "column). WebDataset: the image member's extension (default: "
                                                   "the first of jpg, jpeg, png, webp, bmp)."),
        out: Path = typer.Option(Path("mined"), "--out", "-o", help="Output folder."),
        top: int = typer.Option(9, "--top", "-k", help="Images kept per (layer, head, mode, sign)."),
        batch_size: int = typer.Option(32, help="Images per forward pass."),
        workers: int = typer.Option(2, help="DataLoader processes decoding images (0: decode in this process)."),
        layers: Optional[str] = typer.Option(None, help="Layers to mine, e.g. 0-5 (default: all)."),
        sheets_modes: str = typer.Option("0-3", help="Modes (of every head) whose maps are kept and whose contact "
                                                     "sheets are drawn: e.g. 0-3, 'all' or 'none'. The others are "
                                                     "in mined.safetensors and can be drawn later "
                                                     "(qkdissect.mining.render_contact_sheet)."),
        draw_sheets: bool = typer.Option(True, "--sheets/--no-sheets", help="Draw the contact sheets at the end "
                                         "(--no-sheets: keep only the maps; `qkdissect sheets OUT` draws them later, "
                                         "and the report draws its tiles from the maps either way)."),
        checkpoint_every: int = typer.Option(25, help="Write a checkpoint every N batches (atomic)."),
        resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (refused if the "
                                                            "model, image list or settings differ)."),
        device: str = typer.Option("cpu", help="cpu, cuda or cuda:N (under torchrun each rank uses cuda:LOCAL_RANK)."),
        amp: str = typer.Option("none", help="Forward pass under autocast: bf16, fp16 or none (float32). The "
                                             "projections onto the modes and the statistics stay float32 / exact."),
        checkpoint: Optional[Path] = typer.Option(None, help="Weights for the architecture named by MODEL."),
        random_init: bool = typer.Option(False, "--random-init", help="Random weights (seeded by --seed)."),
        seed: int = typer.Option(0, help="Seed for --random-init weights (so a resumed run gets the same model)."),
        atlas: Optional[Path] = typer.Option(None, help="Use this atlas folder instead of decomposing again."),
    ) -> None:
        """Top images of every (layer, head, mode, sign) over an image set, in one streaming pass.

        score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p') over the patch tokens (q = u·x̃ query map,
        k = v·x̃ key map; sign − is the mode (−u, −v)); the top-k images, the patches of the maxima and running
        mean / std / extrema of q and k per mode are kept. One forward pass per batch gives all layers (hooks).

        Images: a folder, a file list, WebDataset shards or Parquet files, streamed without unpacking. Every
        image keeps a stable id in images.txt: its relative path, the path as listed, <shard>#<key> or
        <file>#<row>. Bad samples never stop the run: they are skipped, counted and listed with their reason
        in bad_images.log and mined.json. Images are converted to RGB (grayscale, palette, RGBA); a sample is
        skipped when it is empty (0 bytes), not an image, truncated, a decompression bomb, smaller than 2 px on
        a side (a 1×1 image is skipped) or has an aspect ratio beyond 50:1 (a 1000×5 image is skipped); also a
        shard sample without an image member, an empty Parquet cell, and the rest of a truncated shard.

        Checkpoints every N batches; a killed run continues with --resume and ends with exactly the result of an
        uninterrupted run, bit for bit. Sharding: `torchrun --nproc_per_node N -m qkdissect mine ...` — each
        rank mines a block of the shards / row groups / batches (gloo on CPU, nccl on GPU); rank 0 merges the
        exact top-k states and writes the outputs. --resume works with another number of processes than the
        interrupted run. Multi-node: run the same torchrun command on every node with --nnodes, --node-rank and
        --rdzv-endpoint; --out must be on a file system all nodes share.
        """
        import os

        import torch

        from qkdissect import load_model
        from qkdissect.decomposition import ModeAtlas
        from qkdissect.mining import mine as run_mine
        from qkdissect.outputs import check_writable

        check_writable(out, "mining run")
        is_main = int(os.environ.get("RANK", "0")) == 0
        if random_init:
            torch.manual_seed(seed)
        with err_console.status(f"loading {model}"):
            loaded = load_model(model, checkpoint, random_init=random_init)
        chosen_layers = None if layers is None else parse_int_list(layers, "layers")
        if sheets_modes.strip().lower() == "all":
            modes = None
        elif sheets_modes.strip().lower() in ("none", ""):
            modes = []
        else:
            modes = parse_int_list(sheets_modes, "sheets-modes")
        with progress_reporter({"mining": "mining images", "sheets": "contact sheets"}, unit="per s") as progress:
            result = run_mine(loaded, images, out, top_k=top, batch_size=batch_size, workers=workers,
                              layers=chosen_layers, sheet_modes=modes, checkpoint_every=checkpoint_every,
                              resume=resume, device=device, atlas=None if atlas is None else ModeAtlas.load(atlas),
                              image_column=image_column, amp=None if amp.strip().lower() == "none" else amp,
                              sheets=draw_sheets, progress=progress if is_main else None)
        if result is None:
            return
        meta = result.meta
        table = Table(title=f"mined {meta['model']} ({meta['family']}): layers {meta['layers'][0]}–"
                            f"{meta['layers'][-1]}, {meta['n_heads']} heads × {meta['rank']} modes, top {meta['top_k']}")
        for column in ("files", "processed", "skipped", "seconds", "images/s", "processes", "route"):
            table.add_column(column, justify="right")
        table.add_row(str(meta["n_images"]), str(meta["n_processed"]), str(meta["n_bad"]),
                      f"{meta.get('mining_seconds', 0):.1f}", f"{meta.get('images_per_second', 0):.1f}",
                      str(meta["world_size"]), ",".join(sorted(set(meta["routes"]))))
        console.print(table)
        if result.bad:
            bad = Table(title=f"{len(result.bad)} skipped file(s) (all in {out / 'bad_images.log'})")
            bad.add_column("file")
            bad.add_column("reason")
            for path, reason in list(result.bad)[:10]:
                bad.add_row(path, reason.split(": ", 1)[-1])
            console.print(bad)
        scores = result.topk.scores[..., 0]  # best image of each (layer, head, mode, sign)
        best = torch.topk(scores.flatten(), min(5, scores.numel())).indices
        strongest = Table(title="strongest modes (top-1 score)")
        for column in ("layer", "head", "mode", "sign", "score", "image"):
            strongest.add_column(column, justify="right" if column != "image" else "left")
        for flat in best.tolist():
            slot, head, mode, sign = (int(i) for i in torch.unravel_index(torch.tensor(flat), scores.shape))
            row = result.top(result.layers[slot], head, mode, sign)[0]
            strongest.add_row(str(result.layers[slot]), str(head), str(mode), "+−"[sign], f"{row['score']:.3g}",
                              row["relative_path"])
        console.print(strongest)
        console.print(f"wrote {out / 'mined.json'}, {out / 'mined.safetensors'}, {len(meta['sheets'])} contact "
                      f"sheets under {out / 'sheets'}")

    @app.command()
    @guarded
    def sheets(
        mined: Path = typer.Argument(..., help="A finished `qkdissect mine` folder."),
        workers: int = typer.Option(2, help="Processes drawing the sheets (0 or 1: this process)."),
    ) -> None:
        """Draw the contact sheets a mining run does not have yet (mined with --no-sheets, or interrupted while
        adding them) and record them in its mined.json. Only the run's own files are touched; a run killed
        here is finished by running the command again."""
        from qkdissect.mining import add_sheets, load_mined

        with progress_reporter({"sheets": "contact sheets"}) as progress:
            add_sheets(mined, workers=workers, progress=progress)
        result = load_mined(mined)
        console.print(f"{len(result.meta['sheets'])} contact sheets under {mined / 'sheets'}")
