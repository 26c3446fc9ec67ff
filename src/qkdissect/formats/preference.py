"""``qkdissect-preference`` (preference.json + preference.safetensors + CSV tables + figures, written by
``preference.save_preference``), version 1.

preference.json: the run's metadata with ``layers_analysed``, ``sources``, ``queries``, ``n_heads``, the image
``names`` used, ``problems`` and ``skipped`` counts, per-layer summaries, ``files``. preference.safetensors, with
n images, L layers, H heads, Q = 2 queries, S sources, V = 3 variants, C = 3 categories: shares (n, L, H, Q, S, V, C),
prefix (n, L, H, Q, S), {layer,head,prefix_layer,prefix_head}_{mean,lo,hi} of shapes (L, Q, S, V, C),
(L, H, Q, S, V, C), (L, Q, S), (L, H, Q, S).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, NonNegativeInt, PositiveInt

from qkdissect.formats import Document, Strict

__all__ = ["PREFERENCE_FORMAT", "PREFERENCE_VERSION", "PreferenceDocument", "preference_shapes"]

PREFERENCE_FORMAT, PREFERENCE_VERSION = "qkdissect-preference", 1
N_QUERIES, N_VARIANTS, N_CATEGORIES = 2, 3, 3


class ProblemRecord(Strict):
    name: str
    kind: str
    detail: str


class PreferenceDocument(Document):
    what: ClassVar[str] = "qkdissect preference index"
    format: Literal["qkdissect-preference"]
    format_version: PositiveInt
    n_heads: PositiveInt
    layers_analysed: list[NonNegativeInt] = Field(min_length=1)
    sources: list[str] = Field(min_length=1)
    names: list[str]
    problems: list[ProblemRecord] = []
    skipped: dict[str, NonNegativeInt] = {}
    patch_grid: tuple[PositiveInt, PositiveInt]


def preference_shapes(document: PreferenceDocument) -> dict[str, tuple[int, ...]]:
    """The shape of every array of preference.safetensors according to preference.json."""
    n, L, H, S = len(document.names), len(document.layers_analysed), document.n_heads, len(document.sources)
    Q, V, C = N_QUERIES, N_VARIANTS, N_CATEGORIES
    shapes = {"shares": (n, L, H, Q, S, V, C), "prefix": (n, L, H, Q, S)}
    for name, shape in (("layer", (L, Q, S, V, C)), ("head", (L, H, Q, S, V, C)), ("prefix_layer", (L, Q, S)),
                        ("prefix_head", (L, H, Q, S))):
        for key in ("mean", "lo", "hi"):
            shapes[f"{name}_{key}"] = shape
    return shapes
