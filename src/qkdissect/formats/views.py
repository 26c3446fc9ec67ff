"""``qkdissect-maps`` (maps.json + per-input maps.safetensors) and ``qkdissect-rank`` (rank.json + rank.csv),
version 1, written by ``views.run_maps`` / ``views.run_rank`` (the files are described in :mod:`qkdissect.views`).

Maps tensors per input, m = number of modes, r = the atlas rank, N = n_prefix + rows·cols tokens (images) or T
tokens (texts): images q, k (m, rows, cols), q_prefix, k_prefix (m, n_prefix), contributions (m, N, N),
key_bias_logits (N,); texts q, k (m, T), contributions (m, T, T), input_ids (T,), key_bias_logits (T,); both
mode_shares (r,), bias_share and logit_variance ().

A layer with another attention form (``layer_form`` ≠ "plain", atlas format 2) stores residual_logits (N, N)
instead of key_bias_logits, and rho (2, N) when it has a QK-norm; a window layer (``windows``: n_windows, window,
shift) stores contributions (m, n_windows, T_w, T_w), residual_logits (n_windows, T_w, T_w) and window_index
(n_windows, T_w), with q, k on the layer's own grid and no prefix tokens.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from qkdissect.formats import Document, Strict

__all__ = ["MAPS_FORMAT", "RANK_FORMAT", "VIEWS_VERSION", "MapsDocument", "RankDocument", "RankRow",
           "maps_tensor_shapes"]

MAPS_FORMAT, RANK_FORMAT, VIEWS_VERSION = "qkdissect-maps", "qkdissect-rank", 1


class Failed(Strict):
    source: str
    reason: str


class ModeRecord(Strict):
    mode: NonNegativeInt
    sigma: float
    cosine: Optional[float]


class ItemMode(ModeRecord):
    share: float
    score: dict[Literal["+", "-"], float]


class MapsItemRecord(Strict):
    kind: Literal["image", "text"]
    source: str
    folder: str
    tensors: str
    modes: list[ItemMode]
    tokens: Optional[list[str]] = None

    @model_validator(mode="after")
    def _tokens(self) -> "MapsItemRecord":
        if self.kind == "text" and self.tokens is None:
            raise ValueError("a text item lists its tokens")
        return self


class MapsDocument(Document):
    what: ClassVar[str] = "qkdissect maps index"
    format: Literal["qkdissect-maps"]
    format_version: PositiveInt
    model: str
    layer: NonNegativeInt
    head: NonNegativeInt
    rank: PositiveInt
    n_prefix_tokens: NonNegativeInt
    grid: Optional[tuple[PositiveInt, PositiveInt]] = None
    layer_form: str = "plain"
    qk_norm: bool = False
    windows: Optional[dict] = None
    modes: list[ModeRecord] = Field(min_length=1)
    items: list[MapsItemRecord]
    failed: list[Failed] = []

    @model_validator(mode="after")
    def _modes(self) -> "MapsDocument":
        listed = [m.mode for m in self.modes]
        for index, item in enumerate(self.items):
            if [m.mode for m in item.modes] != listed:
                raise ValueError(f"items[{index}] has modes {[m.mode for m in item.modes]}, the document {listed}")
        if any(item.kind == "image" for item in self.items) and self.grid is None:
            raise ValueError("image items need the patch grid")
        return self


def maps_tensor_shapes(document: MapsDocument, item: MapsItemRecord) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of one item's maps.safetensors according to maps.json."""
    m, r, P = len(document.modes), document.rank, document.n_prefix_tokens
    common = {"mode_shares": (r,), "bias_share": (), "logit_variance": ()}
    if item.kind == "image":
        rows, cols = document.grid
        N = P + rows * cols
        shapes = {"q": (m, rows, cols), "k": (m, rows, cols), "q_prefix": (m, P), "k_prefix": (m, P),
                  "contributions": (m, N, N), "key_bias_logits": (N,), **common}
    else:
        N = len(item.tokens)
        shapes = {"q": (m, N), "k": (m, N), "contributions": (m, N, N), "input_ids": (N,), "key_bias_logits": (N,),
                  **common}
    if document.layer_form == "plain":
        return shapes
    del shapes["key_bias_logits"]
    shapes["residual_logits"] = (N, N)
    if document.qk_norm:
        shapes["rho"] = (2, N)
    if document.windows is not None:
        n_windows, size = int(document.windows["n_windows"]), int(document.windows["window_tokens"])
        shapes.update({"contributions": (m, n_windows, size, size), "residual_logits": (n_windows, size, size),
                       "window_index": (n_windows, size)})
    return shapes


class RankRow(Strict):
    """One row of rank.csv / of an item's ``top`` list."""
    what: ClassVar[str] = "rank table row"

    layer: NonNegativeInt
    head: NonNegativeInt
    mode: NonNegativeInt
    sigma: float
    cosine: Optional[float]
    share: float
    explained_variance: float
    head_logit_variance: float
    head_bias_share: float
    head_relative_bias_share: Optional[float] = None  # layers with a relative position bias (atlas format 2)


class RankItem(Strict):
    kind: Literal["image", "text"]
    source: str
    figure: str
    top: list[RankRow]


class RankDocument(Document):
    what: ClassVar[str] = "qkdissect rank index"
    format: Literal["qkdissect-rank"]
    format_version: PositiveInt
    model: str
    layers: list[NonNegativeInt] = Field(min_length=1)
    by: Literal["share", "variance"]
    items: list[RankItem]
    failed: list[Failed] = []
