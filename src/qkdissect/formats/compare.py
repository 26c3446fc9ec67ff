"""``qkdissect-compare`` (compare.json [+ compare.png], written by ``Comparison.save``), version 1.

compare.json: ``models``, one record per model: label, model, family, atlas (source folder), n_layers, n_heads,
d_model, d_head, ``null_band`` [lo, hi], ``weighted_cosines`` (n_layers × n_heads; null for a head of rank 0),
``layers`` (n_layers rows of ``ModeAtlas.layer_summary()``; null where undefined).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from qkdissect.formats import Document, Strict

__all__ = ["COMPARE_FORMAT", "COMPARE_VERSION", "CompareDocument", "ComparedModelRecord", "LayerRow"]

COMPARE_FORMAT, COMPARE_VERSION = "qkdissect-compare", 1


class LayerRow(Strict):
    layer: NonNegativeInt
    mean_weighted_cosine: Optional[float]
    std_weighted_cosine: Optional[float]
    min_weighted_cosine: Optional[float] = None
    max_weighted_cosine: Optional[float] = None
    share_heads_above_null: Optional[float]
    share_heads_below_null: Optional[float] = None


class ComparedModelRecord(Strict):
    label: str
    model: str
    family: str
    atlas: str = ""
    n_layers: PositiveInt
    n_heads: PositiveInt
    d_model: PositiveInt
    d_head: PositiveInt
    null_band: tuple[float, float]
    weighted_cosines: list[list[Optional[float]]]
    layers: list[LayerRow]

    @model_validator(mode="after")
    def _shapes(self) -> "ComparedModelRecord":
        if len(self.layers) != self.n_layers:
            raise ValueError(f"{len(self.layers)} layer rows for n_layers {self.n_layers}")
        if len(self.weighted_cosines) != self.n_layers or any(len(row) != self.n_heads
                                                              for row in self.weighted_cosines):
            raise ValueError(f"weighted_cosines is not n_layers × n_heads = {self.n_layers} × {self.n_heads}")
        return self


class CompareDocument(Document):
    what: ClassVar[str] = "`qkdissect compare` result"
    format: Literal["qkdissect-compare"]
    format_version: PositiveInt
    models: list[ComparedModelRecord] = Field(min_length=1)
