"""Query/key maps of chosen modes of one head, per input (``qkdissect maps``): :func:`run_maps`, :func:`load_maps`."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.progress import ProgressFn
from qkdissect.views.context import (
    FORMAT_VERSION,
    MAPS_FORMAT,
    HeadMaps,
    ViewContext,
    ViewInput,
    check_head,
    forward_input,
    head_maps,
    iter_inputs,
    model_meta,
    read_view_document,
    save_tensors,
    token_strings,
)

__all__ = ["MapsItem", "MapsResult", "load_maps", "run_maps"]


@dataclass(frozen=True)
class MapsItem:
    """One input of a maps folder: its JSON entry and its tensors (see the module docstring)."""

    kind: str
    source: str
    folder: Path
    entry: dict[str, Any]
    tensors: dict[str, Tensor] = field(repr=False)


@dataclass(frozen=True)
class MapsResult:
    """What :func:`run_maps` wrote: ``meta`` (maps.json without items), items and failed inputs."""

    directory: Path
    meta: dict[str, Any]
    items: tuple[MapsItem, ...]
    failed: tuple[dict[str, str], ...]


def _mode_entries(ctx: ViewContext, maps: HeadMaps, row: int) -> list[dict[str, Any]]:
    scores, q_arg, k_arg = maps.scores()
    cosines = ctx.atlas.cosines[maps.layer, maps.head]
    entries = []
    for j, mode in enumerate(maps.modes):
        entries.append({
            "mode": mode, "sigma": float(ctx.atlas.layers[maps.layer].S[maps.head, mode]),
            "cosine": float(cosines[mode]), "share": float(maps.mode_shares[row, mode]),
            "score": {"+": float(scores[row, j, 0]), "-": float(scores[row, j, 1])},
            "query_argmax": {"+": int(q_arg[row, j, 0]), "-": int(q_arg[row, j, 1])},
            "key_argmax": {"+": int(k_arg[row, j, 0]), "-": int(k_arg[row, j, 1])},
        })
    return entries


def _remainder(maps: HeadMaps, valid: Tensor | None) -> dict[str, Tensor]:
    """key_bias_logits (N,) of a plain layer, or residual_logits (N, N) of a layer with another form; rho
    (2, N) the per-token QK-norm factors ρ_q, ρ_k of a QK-norm layer."""
    if maps.residual_logits is None:
        values = maps.key_bias_logits[0]
        return {"key_bias_logits": values if valid is None else values[valid]}
    values = maps.residual_logits[0]
    out = {"residual_logits": values if valid is None else values[valid][:, valid]}
    if maps.rho is not None:
        out["rho"] = maps.rho[0] if valid is None else maps.rho[0][:, valid]
    if maps.window_index is not None:
        out["window_index"] = maps.window_index
    return out


def _write_image_item(ctx: ViewContext, out: Path, item: ViewInput, maps: HeadMaps, signs: str) -> dict[str, Any]:
    from qkdissect.overlays import plot_mode_overlay
    from qkdissect.projection import split_tokens

    folder = out / item.folder
    folder.mkdir(parents=True, exist_ok=True)
    item.crop.save(folder / "crop.png")
    q_prefix, q_grid = split_tokens(maps.q[0], maps.n_prefix, maps.grid)
    k_prefix, k_grid = split_tokens(maps.k[0], maps.n_prefix, maps.grid)
    save_tensors(folder / "maps.safetensors", {
        "q": q_grid, "k": k_grid, "q_prefix": q_prefix, "k_prefix": k_prefix,
        "contributions": maps.contributions[0], **_remainder(maps, None),
        "mode_shares": maps.mode_shares[0], "bias_share": maps.bias_share[0], "logit_variance": maps.logit_variance[0]})
    entries = _mode_entries(ctx, maps, 0)
    crop = np.asarray(item.crop)
    figures = {}
    for j, entry in enumerate(entries):
        score = (entry["score"]["+"], entry["score"]["-"])
        chosen = (1, -1) if signs == "both" else ((1,) if score[0] >= score[1] else (-1,))
        title = (f"{Path(item.source).name[:40]} — layer {maps.layer} head {maps.head} mode {entry['mode']}\n"
                 f"σ={entry['sigma']:.3g}, cos(u,v)={entry['cosine']:+.2f}, share of logit variance "
                 f"{entry['share']:.1%}")
        name = f"mode_{entry['mode']}.png"
        plot_mode_overlay(crop, q_grid[j].double().numpy(), k_grid[j].double().numpy(), folder / name,
                          title=title, scores=score, signs=chosen)
        figures[str(entry["mode"])] = f"{item.folder}/{name}"
    return {"kind": "image", "source": item.source, "folder": item.folder, "crop": f"{item.folder}/crop.png",
            "tensors": f"{item.folder}/maps.safetensors", "figures": figures, "modes": entries,
            "bias_share": float(maps.bias_share[0]), "logit_variance": float(maps.logit_variance[0])}


def _write_text_item(ctx: ViewContext, out: Path, item: ViewInput, maps: HeadMaps) -> dict[str, Any]:
    from qkdissect.overlays import plot_token_strip

    folder = out / item.folder
    folder.mkdir(parents=True, exist_ok=True)
    valid = maps.score_mask()[0]
    ids = item.tokens["input_ids"][0][valid]
    tokens = token_strings(ctx, ids)
    q, k = maps.q[0][:, valid], maps.k[0][:, valid]
    contributions = maps.contributions[0][:, valid][:, :, valid]
    save_tensors(folder / "maps.safetensors", {
        "q": q, "k": k, "contributions": contributions, "input_ids": ids, **_remainder(maps, valid),
        "mode_shares": maps.mode_shares[0],
        "bias_share": maps.bias_share[0], "logit_variance": maps.logit_variance[0]})
    entries = _mode_entries(ctx, maps, 0)
    labels = [f"mode {e['mode']}\nσ={e['sigma']:.3g}\nshare {e['share']:.0%}" for e in entries]
    plot_token_strip(tokens, q.double().numpy(), k.double().numpy(), maps.modes, folder / "strip.png",
                     title=f"layer {maps.layer} head {maps.head}: query (red) and key (cyan) projections u·x̃, v·x̃",
                     mode_labels=labels)

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["position", "token", "mode", "q", "k"])
            for j, mode in enumerate(maps.modes):
                for position, token in enumerate(tokens):
                    writer.writerow([position, token, mode, f"{float(q[j, position]):.6g}", f"{float(k[j, position]):.6g}"])

    atomic_write(folder / "values.csv", write_csv)
    return {"kind": "text", "source": item.source, "folder": item.folder, "tokens": tokens,
            "strip": f"{item.folder}/strip.png", "values_csv": f"{item.folder}/values.csv",
            "tensors": f"{item.folder}/maps.safetensors", "modes": entries,
            "bias_share": float(maps.bias_share[0]), "logit_variance": float(maps.logit_variance[0])}


def run_maps(ctx: ViewContext, out: str | os.PathLike, *, layer: int, head: int, modes: Sequence[int],
             images: Sequence[str | os.PathLike] = (), texts: Sequence[str] = (), signs: str = "both",
             progress: ProgressFn | None = None) -> MapsResult:
    """Write query/key maps of ``modes`` of (layer, head) for each image / text into ``out``.

    Unreadable images are listed in ``failed`` (and in maps.json); the good ones are all
    written first — the caller decides whether a failure is an error. ``progress("maps", done, total)``
    is called after each input.
    """
    if signs not in ("both", "best"):
        raise QKDissectError(f"signs must be 'both' or 'best', got {signs!r}.")
    check_head(ctx.atlas, layer, head, modes)
    undefined = [m for m in modes if not bool(ctx.atlas.defined[layer, head, m])]
    if undefined:
        n_defined = int(ctx.atlas.head_ranks[layer, head])
        raise QKDissectError(f"modes {undefined} of layer {layer} head {head} are undefined (σ_k ≤ "
                             f"{ctx.atlas.undefined_tolerance:.2g}·σ_1: their u_k, v_k are arbitrary), so they have "
                             "no map; " + (f"choose among modes 0..{n_defined - 1}." if n_defined else
                                           "this head has rank 0 (W_qᵀW_k = 0): choose another head."))
    from qkdissect.outputs import OutputFolder

    with OutputFolder(out, MAPS_FORMAT, "maps.json").claim(replace=True) as folder:
        staging = folder.staging
        failed: list[dict[str, str]] = []
        entries = []
        for item in iter_inputs(ctx, images, texts, failed, progress, "maps"):
            batch, mask = forward_input(item)
            maps = head_maps(ctx, batch, layer, head, modes, mask)
            if item.kind == "image":
                entries.append(_write_image_item(ctx, staging, item, maps, signs))
            else:
                entries.append(_write_text_item(ctx, staging, item, maps))
        atlas = ctx.atlas
        form = atlas.layers[layer].form
        meta = model_meta(ctx)
        meta.update({"layer_form": "plain" if form is None else form.kind,
                     "qk_norm": form is not None and form.qk_norm is not None})
        if form is not None and form.windows is not None:  # the maps live on this stage's grid
            meta.update({"grid": list(form.windows.grid), "n_prefix_tokens": 0,
                         "windows": {"window": list(form.windows.window), "shift": list(form.windows.shift),
                                     "n_windows": form.windows.n_windows,
                                     "window_tokens": form.windows.token_index.shape[1]}})
        document = {"format": MAPS_FORMAT, "format_version": FORMAT_VERSION, **meta, "layer": layer,
                    "head": head, "modes": [{"mode": m, "sigma": float(atlas.layers[layer].S[head, m]),
                                             "cosine": float(atlas.cosines[layer, head, m])} for m in modes],
                    "signs": signs,
                    "score": "score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p') over patch (image) or valid (text) "
                             "tokens",
                    "items": entries, "failed": failed}
        folder.finish(document)
    return load_maps(out)


def load_maps(directory: str | os.PathLike) -> MapsResult:
    """Read a folder written by ``qkdissect maps`` / :func:`run_maps`; one QKDissectError naming the file and the
    field (or tensor) when it is incomplete or inconsistent (schema: :mod:`qkdissect.formats.views`)."""
    from safetensors.torch import load_file

    from qkdissect.formats import check_shapes
    from qkdissect.formats.views import MapsDocument, maps_tensor_shapes

    directory = Path(directory)
    document, checked = read_view_document(directory / "maps.json", MAPS_FORMAT, "maps", MapsDocument)
    items = []
    for entry, record in zip(document["items"], checked.items):
        path = directory / record.tensors
        try:
            tensors = load_file(str(path))
        except Exception as error:  # noqa: BLE001 — missing or corrupt file
            raise QKDissectError(f"{path} is missing or corrupt ({type(error).__name__}); re-run `qkdissect maps`.") from None
        check_shapes(path, {k: tuple(v.shape) for k, v in tensors.items()}, maps_tensor_shapes(checked, record),
                     remedy="re-run `qkdissect maps`")
        items.append(MapsItem(record.kind, record.source, directory / record.folder, entry, tensors))
    meta = {k: v for k, v in document.items() if k not in ("items", "failed", "files")}
    return MapsResult(directory, meta, tuple(items), tuple(document.get("failed", [])))
