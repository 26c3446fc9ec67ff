"""``qkdissect-atlas`` (atlas.json + atlas.safetensors, written by ``ModeAtlas.save``), versions 1 and 2.

atlas.json: model metadata (``n_layers``, ``n_heads``, ``d_model``, ``d_head``, ``scale``, ...), ``null`` (the
Gaussian null reference), ``degeneracy_tolerance``, ``undefined_tolerance``, ``heads`` (one record per head),
``layers`` (per-layer statistics), ``files``. atlas.safetensors: per layer i, ``layers.{i}.U`` and ``.V``
(heads, d_model, r), ``.S`` (heads, r), ``.key_bias`` (heads, d_model), optionally ``.ln_weight`` and ``.ln_bias``
(d_model,), with r = min(d_head, d_model); all finite, S ≥ 0.

Version 2 (attention forms, issue 13) adds: ``heads_per_layer`` / ``d_model_per_layer`` when layers differ in
shape (Swin), ``layer_forms`` (per layer: kind, what is exact, the stored form's fields), ``layer_nulls``; tensors
``layers.{i}.G_q`` / ``.G_k`` (heads, r, d_head) and ``.head_b_q`` / ``.head_b_k`` (heads, d_head) for layers with
rotary embeddings or QK-norm, ``layers.{i}.form.*`` (rotary cos/sin and positions — NaN for tokens without a
position —, QK-norm parameters, relative-bias table and index, window index and mask, per-head scales) and
``layers.{i}.positional.*`` (offset-average modes, distance curve, content share, bias statistics).
"""

from __future__ import annotations

import os
from typing import ClassVar, Literal, Optional

from pydantic import NonNegativeInt, PositiveInt, field_validator

from qkdissect.errors import QKDissectError
from qkdissect.formats import Document, Strict, check_shapes

__all__ = ["ATLAS_FORMAT", "ATLAS_VERSION", "AtlasDocument", "NullDocument", "atlas_tensor_shapes",
           "check_atlas_tensors"]

ATLAS_FORMAT, ATLAS_VERSION = "qkdissect-atlas", 2
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


class RotaryRecord(Strict):
    layout: Literal["interleaved", "half"]
    rotary_dim: PositiveInt
    pairs: Literal["all", "causal"]
    variable_length: bool
    info: dict = {}


class QKNormRecord(Strict):
    kind: Literal["layer", "rms", "l2"]
    eps: float

    @field_validator("eps")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("eps must be positive")
        return value


class WindowsRecord(Strict):
    grid: tuple[PositiveInt, PositiveInt]
    window: tuple[PositiveInt, PositiveInt]
    shift: tuple[NonNegativeInt, NonNegativeInt]


class BiasRecord(Strict):
    info: dict = {}


class StoredForm(Strict):
    """The fields of an attention form that atlas.json stores next to its tensors (``forms.io``)."""

    causal: bool = False
    sliding_window: Optional[PositiveInt] = None
    rotary: Optional[RotaryRecord] = None
    qk_norm: Optional[QKNormRecord] = None
    bias: Optional[BiasRecord] = None
    windows: Optional[WindowsRecord] = None


class LayerFormRecord(Strict):
    layer: NonNegativeInt
    kind: str
    scale: float
    stored: Optional[StoredForm] = None

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("the attention scale must be a positive number")
        return value


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
    heads_per_layer: Optional[list[PositiveInt]] = None
    d_model_per_layer: Optional[list[PositiveInt]] = None
    layer_nulls: Optional[list[NullDocument]] = None
    layer_forms: Optional[list[LayerFormRecord]] = None

    def per_layer_problem(self) -> str | None:
        """What is wrong with the per-layer lists (their length against n_layers, the order of layer_forms)."""
        for name in ("heads_per_layer", "d_model_per_layer", "layer_nulls", "layer_forms"):
            value = getattr(self, name)
            if value is not None and len(value) != self.n_layers:
                return f"field {name}: {len(value)} entries for n_layers {self.n_layers}"
        if self.layer_forms is not None and [f.layer for f in self.layer_forms] != list(range(self.n_layers)):
            return "field layer_forms: the layers must be listed 0..n_layers−1 in order"
        return None

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
    """The shape every tensor of atlas.safetensors must have according to atlas.json (forms and positional
    statistics excepted: their shapes depend on the model's token layout)."""
    L = document.n_layers
    heads = list(document.heads_per_layer or []) + [document.n_heads] * L  # short lists: see per_layer_problem
    widths = list(document.d_model_per_layer or []) + [document.d_model] * L
    r, e = document.rank, document.d_head
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (H, D) in enumerate(zip(heads[:L], widths[:L])):
        shapes.update({f"layers.{index}.U": (H, D, r), f"layers.{index}.S": (H, r), f"layers.{index}.V": (H, D, r),
                       f"layers.{index}.key_bias": (H, D), f"layers.{index}.ln_weight": (D,),
                       f"layers.{index}.ln_bias": (D,), f"layers.{index}.G_q": (H, r, e),
                       f"layers.{index}.G_k": (H, r, e), f"layers.{index}.head_b_q": (H, e),
                       f"layers.{index}.head_b_k": (H, e)})
    return shapes


_OPTIONAL = ("ln_weight", "ln_bias", "G_q", "G_k", "head_b_q", "head_b_k")


def check_atlas_tensors(path: str | os.PathLike, document: AtlasDocument, tensors: dict) -> None:
    """Shapes (against atlas.json), one floating dtype, finite values and S ≥ 0 for the modes; form and
    positional tensors (``layers.{i}.form.*``, ``layers.{i}.positional.*``) must be finite except the
    positions of tokens without one (NaN). QKDissectError naming the tensor."""
    import torch

    remedy = "re-run `qkdissect dissect`"
    expected = atlas_tensor_shapes(document)
    optional = [name for name in expected if name.endswith(_OPTIONAL)]
    extra = [name for name in tensors if ".form." in name or ".positional." in name]
    modes = {k: v for k, v in tensors.items() if k not in extra}
    check_shapes(path, {k: tuple(v.shape) for k, v in modes.items()}, expected, optional=optional, remedy=remedy)
    dtypes = {v.dtype for v in modes.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise QKDissectError(f"{path}: tensors of dtypes {sorted(map(str, dtypes))}; an atlas holds one floating "
                             f"dtype; {remedy}.")
    for name, value in tensors.items():
        if name.endswith(".rotary.positions") or not (value.is_floating_point() or value.is_complex()):
            continue
        if not bool(torch.isfinite(value).all()):
            raise QKDissectError(f"{path}: tensor {name!r} holds NaN or Inf values; {remedy}.")
        if name.endswith(".S") and bool((value < 0).any()):
            raise QKDissectError(f"{path}: tensor {name!r} holds negative singular values; {remedy}.")
