"""Per-input views of a head's modes: query/key maps (``qkdissect maps``) and the ranking of
modes by the share of the head's logit variance they explain (``qkdissect rank``).

For head h of layer l and mode k (atlas U, S, V, key_bias; x̃ captured with hooks):
query map q_p = u_k·x̃_p, key map k_p = v_k·x̃_p, contribution to the logits
C_k[p, p'] = scale·σ_k·q_p·k_p', score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p') over patch
tokens (image) or valid tokens (text); the share of logit variance is defined in
:class:`qkdissect.projection.LogitVarianceShares`.

Folder written by :func:`run_maps` (read it with :func:`load_maps`)::

    maps.json                  format "qkdissect-maps": model, layer, head, modes (σ, cos u·v),
                               preprocessing, prefix tokens, patch grid, scale, versions;
                               "items": one per input (kind, source, folder, files, per-mode
                               scores / shares / argmax positions); "failed": [{source, reason}]
    000_<stem>/crop.png        the image as the model saw it (resized, centre-cropped)
    000_<stem>/mode_<k>.png    overlay: query map red, key map cyan (both signs, or the stronger)
    000_<stem>/maps.safetensors  q, k (m, rows, cols) patch maps; q_prefix, k_prefix (m, n_prefix);
                               contributions (m, N, N) over all tokens; key_bias_logits (N,);
                               mode_shares (r,) of all modes of the head; bias_share, logit_variance ()
    text_000/strip.png         text input: per-token q (red) and k (cyan) of every mode, values printed
    text_000/values.csv        token, mode, q, k
    text_000/maps.safetensors  q, k (m, T); contributions (m, T, T); input_ids (T,); shares as above

Folder written by :func:`run_rank` (read it with :func:`load_rank`)::

    rank.json                  format "qkdissect-rank": model, layers, "items": per input the top
                               rows and its figure; "failed"
    rank.csv                   every (input, layer, head, mode): σ, cos, share, explained variance,
                               the head's logit variance and key-bias share
    000_<stem>.png             bar chart of the top (layer, head, mode) of one input
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write, read_json_document, write_json
from qkdissect.projection import (capture_attention_inputs, key_bias_logits, logit_variance_shares,
                                  mode_contributions, project)

__all__ = ["HeadMaps", "MapsItem", "MapsResult", "RankResult", "ViewContext", "head_maps", "load_maps",
           "load_rank", "prepare_view", "run_maps", "run_rank", "scores_from_maps"]

MAPS_FORMAT, RANK_FORMAT, FORMAT_VERSION = "qkdissect-maps", "qkdissect-rank", 1


@dataclass(frozen=True)
class ViewContext:
    """A model with its adapter, the atlas of its modes and the token layout."""

    loaded: LoadedModel
    atlas: Any  # ModeAtlas

    @property
    def n_prefix(self) -> int:
        return len(self.loaded.adapter.prefix_tokens)

    @property
    def modality(self) -> str:
        return self.loaded.adapter.modality

    def grid(self) -> tuple[int, int] | None:
        if self.modality != "image":
            return None
        return self.loaded.adapter.patch_grid(self.loaded.preprocessing.image_size)


def prepare_view(model: Any, atlas: Any = None) -> ViewContext:
    """Wrap ``model`` and decompose it (float64) unless a matching ``atlas`` is given."""
    from qkdissect.decomposition import dissect

    loaded = wrap_model(model)
    if atlas is None:
        atlas = dissect(loaded, dtype="float64", null_samples=64)
    layers = loaded.adapter.attention_layers()
    if atlas.n_layers != len(layers) or atlas.n_heads != layers[0].n_heads or atlas.d_model != layers[0].d_model:
        raise QKDissectError(f"the atlas ({atlas.n_layers} layers × {atlas.n_heads} heads, d_model {atlas.d_model}) "
                             f"does not belong to this model ({len(layers)} × {layers[0].n_heads}, d_model "
                             f"{layers[0].d_model}); dissect this model or leave the atlas out.")
    return ViewContext(loaded, atlas)


def check_head(atlas, layer: int, head: int | None = None, modes: Sequence[int] = ()) -> None:
    """QKDissectError unless layer, head and modes exist in ``atlas``."""
    if not 0 <= layer < atlas.n_layers:
        raise QKDissectError(f"layer {layer} does not exist: the model has layers 0..{atlas.n_layers - 1}.")
    if head is not None and not 0 <= head < atlas.n_heads:
        raise QKDissectError(f"head {head} does not exist: each layer has heads 0..{atlas.n_heads - 1}.")
    bad = [m for m in modes if not 0 <= m < atlas.rank]
    if bad:
        raise QKDissectError(f"modes {bad} do not exist: each head has modes 0..{atlas.rank - 1}.")


def scores_from_maps(q: Tensor, k: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """score± = max(0, max ±q)·max(0, max ±k) over the token axis (last), valid tokens only.

    q, k: (..., T); mask (..., T) bool or None. Returns scores (..., 2) for signs (+, −) and the
    argmax positions of ±q and ±k, each (..., 2).
    """
    if mask is not None:
        fill = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
        signed_q = torch.stack([torch.where(mask, q, fill), torch.where(mask, -q, fill)], dim=-2)
        signed_k = torch.stack([torch.where(mask, k, fill), torch.where(mask, -k, fill)], dim=-2)
    else:
        signed_q, signed_k = torch.stack([q, -q], dim=-2), torch.stack([k, -k], dim=-2)
    q_max, q_arg = signed_q.max(dim=-1)
    k_max, k_arg = signed_k.max(dim=-1)
    return q_max.clamp_min(0) * k_max.clamp_min(0), q_arg, k_arg


@dataclass(frozen=True)
class HeadMaps:
    """Query/key maps of ``modes`` of one head for a batch of inputs (all tokens, prefix included).

    q, k: (B, m, N); contributions: (B, m, N, N) = scale·σ_k q_p k_p'; key_bias_logits (B, N);
    mode_shares (B, r) over *all* modes of the head, bias_share and logit_variance (B,);
    token_mask (B, N) valid tokens (text padding excluded) or None; grid (rows, cols) for images.
    """

    layer: int
    head: int
    modes: tuple[int, ...]
    q: Tensor
    k: Tensor
    contributions: Tensor
    key_bias_logits: Tensor
    mode_shares: Tensor
    bias_share: Tensor
    logit_variance: Tensor
    n_prefix: int
    grid: tuple[int, int] | None
    token_mask: Tensor | None = None

    def score_mask(self) -> Tensor:
        """(B, N) tokens that count for scores: patch tokens (images) or valid tokens (text)."""
        mask = torch.ones(self.q.shape[0], self.q.shape[-1], dtype=torch.bool)
        mask[:, : self.n_prefix] = False
        return mask if self.token_mask is None else mask & self.token_mask.bool().cpu()

    def scores(self) -> tuple[Tensor, Tensor, Tensor]:
        """(scores (B, m, 2), query argmax (B, m, 2), key argmax (B, m, 2)); positions index all N tokens."""
        mask = self.score_mask()[:, None, :].expand_as(self.q)
        return scores_from_maps(self.q, self.k, mask)


def head_maps(ctx: ViewContext, inputs: Any, layer: int, head: int, modes: Sequence[int],
              token_mask: Tensor | None = None) -> HeadMaps:
    """Run the model on ``inputs`` (pixels (B, 3, H, W) or a dict of token tensors) and return
    the maps of ``modes`` of head ``head`` of ``layer``."""
    atlas = ctx.atlas
    check_head(atlas, layer, head, modes)
    x = capture_attention_inputs(ctx.loaded, inputs, [layer])[layer]
    q, k = project(atlas, layer, x)  # (B, H, N, r)
    selected = list(modes)
    shares = logit_variance_shares(atlas, layer, x, token_mask)
    return HeadMaps(
        layer=layer, head=head, modes=tuple(selected),
        q=q[:, head][..., selected].transpose(1, 2).cpu(), k=k[:, head][..., selected].transpose(1, 2).cpu(),
        contributions=mode_contributions(atlas, layer, x, head, selected).cpu(),
        key_bias_logits=key_bias_logits(atlas, layer, x, head).cpu(),
        mode_shares=shares.mode_shares[:, head].cpu(), bias_share=shares.bias_share[:, head].cpu(),
        logit_variance=shares.logit_variance[:, head].cpu(), n_prefix=ctx.n_prefix, grid=ctx.grid(),
        token_mask=None if token_mask is None else token_mask.cpu())


# ----- inputs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Input:
    kind: str  # "image" or "text"
    source: str
    folder: str
    crop: Any = None  # PIL image as the model saw it (images)
    pixels: Tensor | None = None
    tokens: dict[str, Tensor] | None = None


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:60] or "image"


def _check_inputs(ctx: ViewContext, images: Sequence, texts: Sequence[str]) -> None:
    if images and ctx.modality != "image":
        raise QKDissectError(f"this is a {ctx.modality} model ({ctx.loaded.family}); give --text, not image files.")
    if texts and ctx.modality != "text":
        raise QKDissectError(f"--text needs a text model; {ctx.loaded.spec} reads images.")
    if not images and not texts:
        raise QKDissectError("nothing to do: give image files" + (" or --text" if ctx.modality == "text" else "") + ".")


def _iter_inputs(ctx: ViewContext, images: Sequence[str | os.PathLike], texts: Sequence[str],
                 failed: list[dict[str, str]]) -> Iterator[_Input | None]:
    """Decode images one at a time (a failure is recorded and yields None) and tokenize texts."""
    from qkdissect.images import open_image

    _check_inputs(ctx, images, texts)
    preprocessing = ctx.loaded.preprocessing
    for index, path in enumerate(images):
        try:
            image = open_image(path)
        except QKDissectError as error:
            failed.append({"source": str(path), "reason": str(error)})
            yield None
            continue
        yield _Input("image", str(path), f"{index:03d}_{_safe_stem(Path(path))}",
                     crop=preprocessing.resize_and_crop(image), pixels=preprocessing(image))
    for index, text in enumerate(texts):
        yield _Input("text", text, f"text_{index:03d}", tokens=ctx.loaded.adapter.tokenize([text]))


def _forward_input(item: _Input) -> tuple[Any, Tensor | None]:
    if item.kind == "image":
        return item.pixels[None], None
    return item.tokens, item.tokens.get("attention_mask", torch.ones_like(item.tokens["input_ids"])).bool()


def token_strings(ctx: ViewContext, input_ids: Tensor) -> list[str]:
    """Readable tokens for ids (the tokenizer's own pieces; ids when there is no tokenizer)."""
    tokenizer = getattr(ctx.loaded.adapter, "tokenizer", None)
    ids = [int(i) for i in input_ids]
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]


def _model_meta(ctx: ViewContext) -> dict[str, Any]:
    from qkdissect.files import library_versions

    preprocessing = ctx.loaded.preprocessing
    return {"model": ctx.loaded.spec, "checkpoint": ctx.loaded.checkpoint, "family": ctx.loaded.family,
            "modality": ctx.modality, "prefix_tokens": list(ctx.loaded.adapter.prefix_tokens),
            "n_prefix_tokens": ctx.n_prefix, "grid": None if ctx.grid() is None else list(ctx.grid()),
            "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
            "scale": ctx.atlas.scale, "n_layers": ctx.atlas.n_layers, "n_heads": ctx.atlas.n_heads,
            "rank": ctx.atlas.rank, "x_tilde": ctx.atlas.meta.get("x_tilde"), "versions": library_versions()}


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    data = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    atomic_write(path, lambda p: save_file(data, str(p)))


# ----- maps --------------------------------------------------------------------------------------------------
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


def _write_image_item(ctx: ViewContext, out: Path, item: _Input, maps: HeadMaps, signs: str) -> dict[str, Any]:
    from qkdissect.overlays import plot_mode_overlay
    from qkdissect.projection import split_tokens

    folder = out / item.folder
    folder.mkdir(parents=True, exist_ok=True)
    item.crop.save(folder / "crop.png")
    q_prefix, q_grid = split_tokens(maps.q[0], maps.n_prefix, maps.grid)
    k_prefix, k_grid = split_tokens(maps.k[0], maps.n_prefix, maps.grid)
    _save_tensors(folder / "maps.safetensors", {
        "q": q_grid, "k": k_grid, "q_prefix": q_prefix, "k_prefix": k_prefix,
        "contributions": maps.contributions[0], "key_bias_logits": maps.key_bias_logits[0],
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


def _write_text_item(ctx: ViewContext, out: Path, item: _Input, maps: HeadMaps) -> dict[str, Any]:
    from qkdissect.overlays import plot_token_strip

    folder = out / item.folder
    folder.mkdir(parents=True, exist_ok=True)
    valid = maps.score_mask()[0]
    ids = item.tokens["input_ids"][0][valid]
    tokens = token_strings(ctx, ids)
    q, k = maps.q[0][:, valid], maps.k[0][:, valid]
    contributions = maps.contributions[0][:, valid][:, :, valid]
    _save_tensors(folder / "maps.safetensors", {
        "q": q, "k": k, "contributions": contributions, "input_ids": ids,
        "key_bias_logits": maps.key_bias_logits[0][valid], "mode_shares": maps.mode_shares[0],
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
             on_item: Callable[[str], None] | None = None) -> MapsResult:
    """Write query/key maps of ``modes`` of (layer, head) for each image / text into ``out``.

    Unreadable images are listed in ``failed`` (and in maps.json); the good ones are all
    written first — the caller decides whether a failure is an error.
    """
    if signs not in ("both", "best"):
        raise QKDissectError(f"signs must be 'both' or 'best', got {signs!r}.")
    check_head(ctx.atlas, layer, head, modes)
    out = Path(out)
    failed: list[dict[str, str]] = []
    entries = []
    for item in _iter_inputs(ctx, images, texts, failed):
        if item is None:
            if on_item is not None:
                on_item("")
            continue
        batch, mask = _forward_input(item)
        maps = head_maps(ctx, batch, layer, head, modes, mask)
        if item.kind == "image":
            entries.append(_write_image_item(ctx, out, item, maps, signs))
        else:
            entries.append(_write_text_item(ctx, out, item, maps))
        if on_item is not None:
            on_item(item.source)
    atlas = ctx.atlas
    document = {"format": MAPS_FORMAT, "format_version": FORMAT_VERSION, **_model_meta(ctx), "layer": layer,
                "head": head, "modes": [{"mode": m, "sigma": float(atlas.layers[layer].S[head, m]),
                                         "cosine": float(atlas.cosines[layer, head, m])} for m in modes],
                "signs": signs,
                "score": "score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p') over patch (image) or valid (text) tokens",
                "items": entries, "failed": failed}
    write_json(out / "maps.json", document)
    return load_maps(out)


def _read_document(path: Path, expected: str, command: str) -> dict[str, Any]:
    return read_json_document(path, missing=f"not a folder written by `qkdissect {command}`",
                              remedy=f"re-run `qkdissect {command}`", kind=expected, max_version=FORMAT_VERSION)


def load_maps(directory: str | os.PathLike) -> MapsResult:
    """Read a folder written by ``qkdissect maps`` / :func:`run_maps`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    document = _read_document(directory / "maps.json", MAPS_FORMAT, "maps")
    items = []
    for entry in document["items"]:
        path = directory / entry["tensors"]
        try:
            tensors = load_file(str(path))
        except Exception as error:  # noqa: BLE001 — missing or corrupt file
            raise QKDissectError(f"{path} is missing or corrupt ({type(error).__name__}); re-run `qkdissect maps`.") from None
        items.append(MapsItem(entry["kind"], entry["source"], directory / entry["folder"], entry, tensors))
    meta = {k: v for k, v in document.items() if k not in ("items", "failed")}
    return MapsResult(directory, meta, tuple(items), tuple(document.get("failed", [])))


# ----- rank --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankResult:
    """What :func:`run_rank` wrote: ``meta``, per-input entries and every table row (rank.csv)."""

    directory: Path
    meta: dict[str, Any]
    items: tuple[dict[str, Any], ...]
    rows: tuple[dict[str, Any], ...]
    failed: tuple[dict[str, str], ...]


RANK_COLUMNS = ("source", "layer", "head", "mode", "sigma", "cosine", "share", "explained_variance",
                "head_logit_variance", "head_bias_share")


def rank_rows(ctx: ViewContext, inputs: Any, layers: Sequence[int], token_mask: Tensor | None = None) -> list[list[dict]]:
    """Per input in the batch, one row per (layer, head, mode) with its variance share (unsorted)."""
    atlas = ctx.atlas
    captured = capture_attention_inputs(ctx.loaded, inputs, layers)
    per_input: list[list[dict]] = []
    for layer in layers:
        shares = logit_variance_shares(atlas, layer, captured[layer], token_mask)
        sigma, cosines = atlas.layers[layer].S.double(), atlas.cosines[layer].double()
        for b in range(shares.mode_shares.shape[0]):
            if len(per_input) <= b:
                per_input.append([])
            variance = shares.logit_variance[b]
            for head in range(atlas.n_heads):
                for mode in range(atlas.rank):
                    share = float(shares.mode_shares[b, head, mode])
                    per_input[b].append({
                        "layer": layer, "head": head, "mode": mode, "sigma": float(sigma[head, mode]),
                        "cosine": float(cosines[head, mode]), "share": share,
                        "explained_variance": share * float(variance[head]),
                        "head_logit_variance": float(variance[head]),
                        "head_bias_share": float(shares.bias_share[b, head])})
    return per_input


def run_rank(ctx: ViewContext, out: str | os.PathLike, *, layers: Sequence[int], images: Sequence = (),
             texts: Sequence[str] = (), top: int = 15, by: str = "share", patches_only: bool = False,
             on_item: Callable[[str], None] | None = None) -> RankResult:
    """Rank every (layer, head, mode) of ``layers`` per input by ``by`` ('share' of its head's
    logit variance, or 'variance' = share × the head's logit variance); write table and bar charts."""
    from qkdissect.overlays import plot_rank_bars

    if by not in ("share", "variance"):
        raise QKDissectError(f"--by must be 'share' or 'variance', got {by!r}.")
    for layer in layers:
        check_head(ctx.atlas, layer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    failed: list[dict[str, str]] = []
    key = "share" if by == "share" else "explained_variance"
    items, all_rows = [], []
    palette = ["#4363d8", "#f58231", "#3cb44b", "#911eb4", "#e6194b", "#42d4f4", "#f032e6", "#9a6324",
               "#469990", "#808000", "#000075", "#a9a9a9"]
    for item in _iter_inputs(ctx, images, texts, failed):
        if item is None:
            if on_item is not None:
                on_item("")
            continue
        batch, mask = _forward_input(item)
        if item.kind == "image" and patches_only:
            rows_, cols_ = ctx.grid()
            mask = torch.ones(1, ctx.n_prefix + rows_ * cols_, dtype=torch.bool)
            mask[:, : ctx.n_prefix] = False
        rows = sorted(rank_rows(ctx, batch, layers, mask)[0], key=lambda r: (-r[key], r["layer"], r["head"], r["mode"]))
        for row in rows:
            row["source"] = item.source
        all_rows.extend(rows)
        shown = rows[:top]
        figure = f"{item.folder}.png"
        plot_rank_bars([f"L{r['layer']} h{r['head']} m{r['mode']}  (σ={r['sigma']:.2g})" for r in shown],
                       [r[key] if by == "share" else r["share"] for r in shown], out / figure,
                       title=f"{Path(item.source).name if item.kind == 'image' else item.source[:60]}: "
                             f"top {len(shown)} modes by {'share' if by == 'share' else 'explained variance'}",
                       colours=[palette[r["head"] % len(palette)] for r in shown])
        items.append({"kind": item.kind, "source": item.source, "figure": figure, "top": shown})
        if on_item is not None:
            on_item(item.source)

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=RANK_COLUMNS)
            writer.writeheader()
            for row in all_rows:
                writer.writerow({c: (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in RANK_COLUMNS})

    atomic_write(out / "rank.csv", write_csv)
    write_json(out / "rank.json", {"format": RANK_FORMAT, "format_version": FORMAT_VERSION, **_model_meta(ctx),
                                   "layers": list(layers), "by": by, "patches_only": patches_only,
                                   "share": "⟨C̄_k, L̄⟩/⟨L̄, L̄⟩ of logits centred over keys (sums to 1 with the "
                                            "key-bias share)", "items": items, "failed": failed})
    return load_rank(out)


def load_rank(directory: str | os.PathLike) -> RankResult:
    """Read a folder written by ``qkdissect rank`` / :func:`run_rank`."""
    directory = Path(directory)
    document = _read_document(directory / "rank.json", RANK_FORMAT, "rank")
    rows = []
    with open(directory / "rank.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({k: (row[k] if k == "source" else int(row[k]) if k in ("layer", "head", "mode")
                             else float(row[k])) for k in RANK_COLUMNS})
    meta = {k: v for k, v in document.items() if k not in ("items", "failed")}
    return RankResult(directory, meta, tuple(document["items"]), tuple(rows), tuple(document.get("failed", [])))
