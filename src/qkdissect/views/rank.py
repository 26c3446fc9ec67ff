"""Modes ranked by their share of each head's logit variance, per input (``qkdissect rank``): :func:`run_rank`,
:func:`load_rank`."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.progress import ProgressFn
from qkdissect.projection import capture_attention_inputs, logit_variance_shares
from qkdissect.views.context import (
    FORMAT_VERSION,
    RANK_FORMAT,
    ViewContext,
    check_head,
    forward_input,
    iter_inputs,
    model_meta,
    read_view_document,
)

__all__ = ["RANK_COLUMNS", "RankResult", "load_rank", "rank_rows", "run_rank"]


@dataclass(frozen=True)
class RankResult:
    """What :func:`run_rank` wrote: ``meta``, per-input entries and every table row (rank.csv)."""

    directory: Path
    meta: dict[str, Any]
    items: tuple[dict[str, Any], ...]
    rows: tuple[dict[str, Any], ...]
    failed: tuple[dict[str, str], ...]


RANK_COLUMNS = ("source", "layer", "head", "mode", "sigma", "cosine", "share", "explained_variance",
                "head_logit_variance", "head_bias_share", "head_relative_bias_share")


def rank_rows(ctx: ViewContext, inputs: Any, layers: Sequence[int], token_mask: Tensor | None = None) -> list[list[dict]]:
    """Per input in the batch, one row per (layer, head, defined mode) with its variance share (unsorted)."""
    atlas = ctx.atlas
    captured = capture_attention_inputs(ctx.loaded, inputs, layers)
    per_input: list[list[dict]] = []
    for layer in layers:
        form = atlas.layers[layer].form
        windowed = form is not None and form.windows is not None  # windows of one image sum up; no prefix tokens
        shares = logit_variance_shares(atlas, layer, captured[layer], None if windowed else token_mask)
        sigma, cosines = atlas.layers[layer].S.double(), atlas.cosines[layer].double()
        for b in range(shares.mode_shares.shape[0]):
            if len(per_input) <= b:
                per_input.append([])
            variance = shares.logit_variance[b]
            relative = shares.relative_bias_share
            for head in range(atlas.heads_in(layer)):
                for mode in range(atlas.rank):
                    if not bool(atlas.defined[layer, head, mode]):  # undefined modes are not ranked
                        continue
                    share = float(shares.mode_shares[b, head, mode])
                    per_input[b].append({
                        "layer": layer, "head": head, "mode": mode, "sigma": float(sigma[head, mode]),
                        "cosine": float(cosines[head, mode]), "share": share,
                        "explained_variance": share * float(variance[head]),
                        "head_logit_variance": float(variance[head]),
                        "head_bias_share": float(shares.bias_share[b, head]),
                        "head_relative_bias_share": None if relative is None else float(relative[b, head])})
    return per_input


def run_rank(ctx: ViewContext, out: str | os.PathLike, *, layers: Sequence[int], images: Sequence = (),
             texts: Sequence[str] = (), top: int = 15, by: str = "share", patches_only: bool = False,
             progress: ProgressFn | None = None) -> RankResult:
    """Rank every (layer, head, mode) of ``layers`` per input by ``by`` ('share' of its head's
    logit variance, or 'variance' = share × the head's logit variance); write table and bar charts."""
    from qkdissect.overlays import plot_rank_bars

    if by not in ("share", "variance"):
        raise QKDissectError(f"--by must be 'share' or 'variance', got {by!r}.")
    for layer in layers:
        check_head(ctx.atlas, layer)
    from qkdissect.outputs import OutputFolder

    with OutputFolder(out, RANK_FORMAT, "rank.json").claim(replace=True) as folder:
        staging = folder.staging
        failed: list[dict[str, str]] = []
        key = "share" if by == "share" else "explained_variance"
        items, all_rows = [], []
        palette = ["#4363d8", "#f58231", "#3cb44b", "#911eb4", "#e6194b", "#42d4f4", "#f032e6", "#9a6324",
                   "#469990", "#808000", "#000075", "#a9a9a9"]
        for item in iter_inputs(ctx, images, texts, failed, progress, "rank"):
            batch, mask = forward_input(item)
            if item.kind == "image" and patches_only:
                rows_, cols_ = ctx.grid()
                mask = torch.ones(1, ctx.n_prefix + rows_ * cols_, dtype=torch.bool)
                mask[:, : ctx.n_prefix] = False
            rows = sorted(rank_rows(ctx, batch, layers, mask)[0],
                          key=lambda r: (-r[key], r["layer"], r["head"], r["mode"]))
            for row in rows:
                row["source"] = item.source
            all_rows.extend(rows)
            shown = rows[:top]
            figure = f"{item.folder}.png"
            plot_rank_bars([f"L{r['layer']} h{r['head']} m{r['mode']}  (σ={r['sigma']:.2g})" for r in shown],
                           [r[key] if by == "share" else r["share"] for r in shown], staging / figure,
                           title=f"{Path(item.source).name if item.kind == 'image' else item.source[:60]}: "
                                 f"top {len(shown)} modes by {'share' if by == 'share' else 'explained variance'}",
                           colours=[palette[r["head"] % len(palette)] for r in shown])
            items.append({"kind": item.kind, "source": item.source, "figure": figure, "top": shown})

        def write_csv(path: Path) -> None:
            with open(path, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=RANK_COLUMNS)
                writer.writeheader()
                for row in all_rows:
                    writer.writerow({c: (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c])
                                     for c in RANK_COLUMNS})

        atomic_write(staging / "rank.csv", write_csv)
        folder.finish({"format": RANK_FORMAT, "format_version": FORMAT_VERSION, **model_meta(ctx),
                       "layers": list(layers), "by": by, "patches_only": patches_only,
                       "share": "⟨C̄_k, L̄⟩/⟨L̄, L̄⟩ of logits centred over keys (sums to 1 with the key-bias share; for "
                                "rotary, QK-norm, relative-bias and masked layers the exact logits, contributions "
                                "and valid pairs)",
                       "items": items, "failed": failed})
    return load_rank(out)


def load_rank(directory: str | os.PathLike) -> RankResult:
    """Read a folder written by ``qkdissect rank`` / :func:`run_rank`; one QKDissectError naming the file and the
    field (rank.csv: line and column) when it is incomplete or inconsistent (:mod:`qkdissect.formats.views`)."""
    from qkdissect.formats import validated
    from qkdissect.formats.views import RankDocument, RankRow

    directory = Path(directory)
    document, _ = read_view_document(directory / "rank.json", RANK_FORMAT, "rank", RankDocument)
    path = directory / "rank.csv"
    rows = []
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if tuple(reader.fieldnames or ()) != RANK_COLUMNS:
                raise QKDissectError(f"{path} has the columns {reader.fieldnames}, expected {list(RANK_COLUMNS)}; "
                                     "re-run `qkdissect rank`.")
            for line, row in enumerate(reader, start=2):
                values = {k: (None if row[k] in ("", "nan") and k in ("cosine", "head_relative_bias_share") else row[k])
                          for k in RANK_COLUMNS}
                checked = validated(RankRow, values, f"{path} line {line}", "re-run `qkdissect rank`")
                rows.append({"source": row["source"], **checked.model_dump(include=set(RANK_COLUMNS))})
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise QKDissectError(f"{path} is missing or unreadable ({type(error).__name__}); re-run `qkdissect rank`.") \
            from None
    for row in rows:
        if row["cosine"] is None:
            row["cosine"] = float("nan")
    meta = {k: v for k, v in document.items() if k not in ("items", "failed", "files")}
    return RankResult(directory, meta, tuple(document["items"]), tuple(rows), tuple(document.get("failed", [])))
