"""What every per-input view shares: the model and atlas (:class:`ViewContext`), the inputs (images or texts),
the maps of one head, their scores, and the provenance written with them."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import Tensor

from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.progress import ProgressFn, report
from qkdissect.projection import (
    capture_attention_inputs,
    key_bias_logits,
    logit_variance_shares,
    mode_contributions,
    project,
    qk_norm_factors,
    residual_logits,
    windows_to_grid,
)

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["FORMAT_VERSION", "MAPS_FORMAT", "RANK_FORMAT", "HeadMaps", "ViewContext", "ViewInput", "check_head", "check_inputs", "forward_input", "head_maps", "iter_inputs", "model_meta", "prepare_view", "read_view_document", "safe_stem", "save_tensors", "scores_from_maps", "token_strings"]

MAPS_FORMAT, RANK_FORMAT, FORMAT_VERSION = "qkdissect-maps", "qkdissect-rank", 1


@dataclass(frozen=True)
class ViewContext:
    """A model with its adapter, the atlas of its modes and the token layout."""

    loaded: LoadedModel
    atlas: ModeAtlas

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
    if atlas.n_layers != len(layers) or [atlas.heads_in(i) for i in range(atlas.n_layers)] != [
            layer.n_heads for layer in layers] or list(atlas.d_models) != [layer.d_model for layer in layers]:
        raise QKDissectError(f"the atlas ({atlas.n_layers} layers × {atlas.n_heads} heads, d_model {atlas.d_model}) "
                             f"does not belong to this model ({len(layers)} × {layers[0].n_heads}, d_model "
                             f"{layers[0].d_model}); dissect this model or leave the atlas out.")
    return ViewContext(loaded, atlas)


def check_head(atlas: ModeAtlas, layer: int, head: int | None = None, modes: Sequence[int] = ()) -> None:
    """QKDissectError unless layer, head and modes exist in ``atlas``."""
    if not 0 <= layer < atlas.n_layers:
        raise QKDissectError(f"layer {layer} does not exist: the model has layers 0..{atlas.n_layers - 1}.")
    if head is not None and not 0 <= head < atlas.heads_in(layer):
        raise QKDissectError(f"head {head} does not exist: layer {layer} has heads 0..{atlas.heads_in(layer) - 1}.")
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

    q, k: (B, m, N); contributions: (B, m, N, N) = scale·σ_k q_p k_p' (layers with another attention
    form: their exact contributions, see ``qkdissect.projection.mode_contributions``); key_bias_logits
    (B, N) for plain-bilinear layers, or residual_logits (B, N, N) — everything no mode carries
    (offsets of rotated / normalised heads, relative bias) — for the others; mode_shares (B, r) over
    *all* modes of the head, bias_share, relative_bias_share and logit_variance (B,); token_mask (B, N)
    valid tokens (text padding excluded) or None; grid (rows, cols) for images; rho (B, 2, N) the
    QK-norm factors ρ_q, ρ_k of every token (the maps q, k are already divided by them). Window layers
    (Swin): q, k, rho are on the layer's own grid (window partition undone); contributions are
    (B, m, n_windows, T_w, T_w) and residual_logits (B, n_windows, T_w, T_w) inside each window, whose
    tokens sit at grid positions ``window_index``; shares are summed over an image's windows.
    """

    layer: int
    head: int
    modes: tuple[int, ...]
    q: Tensor
    k: Tensor
    contributions: Tensor
    key_bias_logits: Tensor | None
    mode_shares: Tensor
    bias_share: Tensor
    logit_variance: Tensor
    n_prefix: int
    grid: tuple[int, int] | None
    token_mask: Tensor | None = None
    residual_logits: Tensor | None = None
    relative_bias_share: Tensor | None = None
    rho: Tensor | None = None  # (B, 2, N): QK-norm factors ρ_q, ρ_k of every token (None without a QK-norm)
    window_index: Tensor | None = None  # window layers: (n_windows, T_w) grid index of each window token

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
    form = atlas.layers[layer].form
    windows = None if form is None else form.windows
    x = capture_attention_inputs(ctx.loaded, inputs, [layer])[layer]
    q, k = project(atlas, layer, x)  # (B, H, N, r); window layers: (B·n_windows, H, T_w, r)
    selected = list(modes)
    if windows is not None:
        token_mask = None  # images without prefix tokens: every grid token counts
    shares = logit_variance_shares(atlas, layer, x, token_mask)
    plain = form is None
    rho = None
    if not plain and form.qk_norm is not None:
        rho_q, rho_k = qk_norm_factors(atlas, layer, x)
        rho = torch.stack([rho_q[:, head], rho_k[:, head]], dim=1)
    q = q[:, head][..., selected].transpose(1, 2)
    k = k[:, head][..., selected].transpose(1, 2)
    contributions = mode_contributions(atlas, layer, x, head, selected)
    residual = None if plain else residual_logits(atlas, layer, x, head)
    grid = ctx.grid()
    if windows is not None:
        n_windows, T_w = windows.token_index.shape
        q, k = windows_to_grid(q, windows), windows_to_grid(k, windows)
        rho = None if rho is None else windows_to_grid(rho, windows)
        contributions = contributions.reshape(-1, n_windows, len(selected), T_w, T_w).transpose(1, 2)
        residual = residual.reshape(-1, n_windows, T_w, T_w)
        grid = windows.grid
    return HeadMaps(
        layer=layer, head=head, modes=tuple(selected), q=q.cpu(), k=k.cpu(), contributions=contributions.cpu(),
        key_bias_logits=key_bias_logits(atlas, layer, x, head).cpu() if plain else None,
        residual_logits=None if residual is None else residual.cpu(),
        mode_shares=shares.mode_shares[:, head].cpu(), bias_share=shares.bias_share[:, head].cpu(),
        logit_variance=shares.logit_variance[:, head].cpu(), n_prefix=0 if windows is not None else ctx.n_prefix,
        grid=grid, token_mask=None if token_mask is None else token_mask.cpu(),
        relative_bias_share=None if shares.relative_bias_share is None else shares.relative_bias_share[:, head].cpu(),
        rho=None if rho is None else rho.cpu(),
        window_index=None if windows is None else windows.token_index.clone())


@dataclass(frozen=True)
class ViewInput:
    kind: str  # "image" or "text"
    source: str
    folder: str
    crop: Any = None  # PIL image as the model saw it (images)
    pixels: Tensor | None = None
    tokens: dict[str, Tensor] | None = None


def safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:60] or "image"


def check_inputs(ctx: ViewContext, images: Sequence, texts: Sequence[str]) -> None:
    if images and ctx.modality != "image":
        raise QKDissectError(f"this is a {ctx.modality} model ({ctx.loaded.family}); give --text, not image files.")
    if texts and ctx.modality != "text":
        raise QKDissectError(f"--text needs a text model; {ctx.loaded.spec} reads images.")
    if not images and not texts:
        raise QKDissectError("nothing to do: give image files" + (" or --text" if ctx.modality == "text" else "") + ".")


def iter_inputs(ctx: ViewContext, images: Sequence[str | os.PathLike], texts: Sequence[str],
                failed: list[dict[str, str]], progress: ProgressFn | None = None,
                stage: str = "inputs") -> Iterator[ViewInput]:
    """Decode images one at a time and tokenize texts; an unreadable image is recorded in ``failed`` and skipped.

    ``progress(stage, done, total)`` follows every input: a failed one at once, a good one when the caller asks
    for the next (that is, once the caller has finished with it).
    """
    from qkdissect.images import open_image

    check_inputs(ctx, images, texts)
    preprocessing = ctx.loaded.preprocessing
    total, done = len(images) + len(texts), 0
    for index, path in enumerate(images):
        try:
            image = open_image(path)
        except QKDissectError as error:
            failed.append({"source": str(path), "reason": str(error)})
        else:
            yield ViewInput("image", str(path), f"{index:03d}_{safe_stem(Path(path))}",
                            crop=preprocessing.resize_and_crop(image), pixels=preprocessing(image))
        done += 1
        report(progress, stage, done, total)
    for index, text in enumerate(texts):
        yield ViewInput("text", text, f"text_{index:03d}", tokens=ctx.loaded.adapter.tokenize([text]))
        done += 1
        report(progress, stage, done, total)


def forward_input(item: ViewInput) -> tuple[Any, Tensor | None]:
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


def model_meta(ctx: ViewContext) -> dict[str, Any]:
    from qkdissect.files import library_versions

    preprocessing = ctx.loaded.preprocessing
    return {"model": ctx.loaded.spec, "checkpoint": ctx.loaded.checkpoint, "family": ctx.loaded.family,
            "modality": ctx.modality, "prefix_tokens": list(ctx.loaded.adapter.prefix_tokens),
            "n_prefix_tokens": ctx.n_prefix, "grid": None if ctx.grid() is None else list(ctx.grid()),
            "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
            "scale": ctx.atlas.scale, "n_layers": ctx.atlas.n_layers, "n_heads": ctx.atlas.n_heads,
            "attention_forms": ctx.atlas.meta.get("attention_forms", ["plain"]),
            "rank": ctx.atlas.rank, "x_tilde": ctx.atlas.meta.get("x_tilde"), "versions": library_versions()}


def save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    data = {name: value.detach().cpu().contiguous() for name, value in tensors.items()}
    atomic_write(path, lambda p: save_file(data, str(p)))


def read_view_document(path: Path, expected: str, command: str, schema: Any) -> tuple[dict[str, Any], Any]:
    """(document, validated schema) of a maps.json / rank.json (see :mod:`qkdissect.formats.views`)."""
    from qkdissect.formats import read_document

    return read_document(path, schema, missing=f"not a folder written by `qkdissect {command}`",
                         remedy=f"re-run `qkdissect {command}`", kind=expected, max_version=FORMAT_VERSION)
