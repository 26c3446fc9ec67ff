"""``qkdissect-atlas`` (atlas.json + atlas.safetensors, written by ``ModeAtlas.save``), version 1.

atlas.json: model metadata (``n_layers``, ``n_heads``, ``d_model``, ``d_head``, ``scale``, ...), ``null`` (the
Gaussian null reference), ``degeneracy_tolerance``, ``undefined_tolerance``, ``heads`` (one record per head),
``layers`` (per-layer statistics), ``files``. atlas.safetensors: per layer i, ``layers.{i}.U`` and ``.V``
(heads, d_model, r), ``.S`` (heads, r), ``.key_bias`` (heads, d_model), optionally ``.ln_weight`` and ``.ln_bias``
(d_model,), with r = min(d_head, d_model); all finite, S ≥ 0.
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal, Optional

from pydantic import NonNegativeInt, PositiveInt, field_validator

from qkdissect.errors import QKDissectError
from qkdissect.formats import Document, Strict, check_shapes

__all__ = ["ATLAS_FORMAT", "ATLAS_VERSION", "AtlasDocument", "NullDocument", "atlas_tensor_shapes",
           "check_atlas_tensors"]

ATLAS_FORMAT, ATLAS_VERSION = "qkdissect-atlas", 1
LAYER_TENSORS = ("U", "S", "V", "key_bias")


class NullDocument(Strict):
    """The Gaussian null reference (``metrics.NullReference.to_dict``)."""

    d_model: PositiveInt
    d_head: PositiveInt
    n_samples: PositiveInt
    seed: int
    percentile: float
    cosine_band: tuple[float, float]
    weighted_band: tuple[float, float]
    weighted_mean: float
    weighted_std: float
    method: str = "dense"


class HeadRecord(Strict):
    layer: NonNegativeInt
    head: NonNegativeInt
    weighted_cosine: Optional[float]
    cosines: list[Optional[float]]
    singular_values: list[float]


class AtlasDocument(Document):
    """atlas.json."""
    what: ClassVar[str] = "qkdissect atlas index"

    format: Literal["qkdissect-atlas"]
    format_version: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    d_model: PositiveInt
    d_head: PositiveInt
    scale: float
    null: NullDocument
    degeneracy_tolerance: float = 1e-3
    undefined_tolerance: Optional[float] = None
    heads: Optional[list[HeadRecord]] = None
    files: Optional[list[str]] = None

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("the attention scale must be a positive number")
        return value

    @property
    def rank(self) -> int:
        return min(self.d_head, self.d_model)


def atlas_tensor_shapes(document: AtlasDocument) -> dict[str, tuple[int, ...]]:
    """The shape every tensor of atlas.safetensors must have according to atlas.json."""
    H, D, r = document.n_heads, document.d_model, document.rank
    shapes: dict[str, tuple[int, ...]] = {}
    for index in range(document.n_layers):
        shapes.update({f"layers.{index}.U": (H, D, r), f"layers.{index}.S": (H, r), f"layers.{index}.V": (H, D, r),
                       f"layers.{index}.key_bias": (H, D), f"layers.{index}.ln_weight": (D,),
                       f"layers.{index}.ln_bias": (D,)})
    return shapes


def check_atlas_tensors(path: str | os.PathLike, document: AtlasDocument, tensors: dict) -> None:
    """Shapes (against atlas.json), one floating dtype, finite values and S ≥ 0; QKDissectError naming the tensor."""
    expected = atlas_tensor_shapes(document)
    optional = [name for name in expected if name.endswith(("ln_weight", "ln_bias"))]
    remedy = "re-run `qkdissect dissect`"
    check_shapes(path, {k: tuple(v.shape) for k, v in tensors.items()}, expected, optional=optional, remedy=remedy)
    import torch

    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise QKDissectError(f"{path}: tensors of dtypes {sorted(map(str, dtypes))}; an atlas holds one floating "
                             f"dtype; {remedy}.")
    for name, value in tensors.items():
        if not bool(torch.isfinite(value).all()):
            raise QKDissectError(f"{path}: tensor {name!r} holds NaN or Inf values; {remedy}.")
        if name.endswith(".S") and bool((value < 0).any()):
            raise QKDissectError(f"{path}: tensor {name!r} holds negative singular values; {remedy}.")
