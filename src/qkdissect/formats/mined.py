"""``qkdissect-mined`` (mined.json + mined.safetensors + images.txt + sheets, written by ``mining.mine``), version 2
(version 1 folders are read too).

mined.json: model, family, ``layers`` (the mined layer ids), ``n_heads``, ``rank``, ``top_k``, ``map_modes``,
``grid`` [rows, cols], ``image_root``, ``n_images``, ``bad_images``, ``sheets``, (v2) ``source``, ... mined.safetensors, with
L = len(layers), H = n_heads, r = rank, k = top_k, m = len(map_modes), P = rows·cols: topk.scores, topk.image,
topk.query_pos, topk.key_pos (L, H, r, 2, k), topk.maps (L, H, m, 2, k, 2, P) when m > 0, stats.total,
stats.squares, stats.maximum, stats.minimum (L, 2, H, r), stats.tokens and stats.images (). images.txt: n_images
lines (the id of every sample read).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from qkdissect.formats import Document, Strict

__all__ = ["MINED_FORMAT", "MINED_VERSION", "MinedDocument", "mined_shapes"]

MINED_FORMAT, MINED_VERSION = "qkdissect-mined", 2


class BadImage(Strict):
    path: str
    reason: str


class MinedDocument(Document):
    what: ClassVar[str] = "qkdissect mining index"
    format: Literal["qkdissect-mined"]
    format_version: PositiveInt
    model: str
    layers: list[NonNegativeInt] = Field(min_length=1)
    n_heads: PositiveInt
    rank: PositiveInt
    top_k: PositiveInt
    map_modes: list[NonNegativeInt]
    grid: tuple[PositiveInt, PositiveInt]
    image_root: str
    n_images: NonNegativeInt
    bad_images: list[BadImage] = []


def mined_shapes(document: MinedDocument) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of mined.safetensors according to mined.json."""
    L, H, r, k = len(document.layers), document.n_heads, document.rank, document.top_k
    m, P = len(document.map_modes), document.grid[0] * document.grid[1]
    shapes = {f"topk.{name}": (L, H, r, 2, k) for name in ("scores", "image", "query_pos", "key_pos")}
    if m:
        shapes["topk.maps"] = (L, H, m, 2, k, 2, P)
    shapes.update({f"stats.{name}": (L, 2, H, r) for name in ("total", "squares", "maximum", "minimum")})
    shapes.update({"stats.tokens": (), "stats.images": ()})
    return shapes
