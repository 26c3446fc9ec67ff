"""The ``ModeAtlas``: every head's query-key modes, their statistics, attention forms and files.

For head h: M_h = U diag(S) Vᵀ (U, V: d_model × r, right singular vectors as *columns*) and

    logit_ij = scale · [ x̃_iᵀ M x̃_j + key_biasᵀ x̃_j ] + (terms constant in j),   key_bias = W_kᵀ b_q

for a plain layer. A layer with a non-plain :class:`qkdissect.forms.AttentionForm` also keeps the
head-space factors W_qᵀ = U G_q, W_kᵀ = V G_k (G: r × d_head) and biases b_q, b_k (after folding
any QK-norm centring and gain), so its exact logits — rotation per token, QK-norm factors,
relative bias, windows, masks — are rebuilt from the mode projections Uᵀx̃, Vᵀx̃
(``qkdissect.projection``). Layers may differ in width (Swin's stages): ``d_models``,
``heads_in(layer)``; stacked statistics pad missing heads with NaN.

Files: ``atlas.safetensors`` (tensors) and ``atlas.json`` (metadata, per-head statistics, per-layer
forms). Format 2 adds forms, head-space factors, per-layer scales and positional statistics;
format-1 atlases are read unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.forms import AttentionForm
from qkdissect.forms.io import form_from_tensors, form_to_tensors
from qkdissect.metrics import (
    NullReference,
    defined_modes,
    defined_weighted_cosine,
    layer_statistics,
    mode_cosines,
    symmetric_fraction,
    undefined_tolerance,
    weighted_cosine,
)

__all__ = ["ATLAS_FORMAT", "FORMAT_VERSION", "HeadModes", "LayerModes", "ModeAtlas", "PositionalStats", "near_degenerate"]

FORMAT_VERSION = 2
ATLAS_FORMAT = "qkdissect-atlas"
_LAYER_TENSORS = ("U", "S", "V", "key_bias", "ln_weight", "ln_bias", "G_q", "G_k", "head_b_q", "head_b_k")


def near_degenerate(S: Tensor, tol: float) -> Tensor:
    """Mask (..., r−1): True where (σ_k − σ_{k+1}) / σ_1 < tol — u_k, v_k are then ill-defined."""
    gaps = (S[..., :-1] - S[..., 1:]) / S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)
    return gaps < tol


@dataclass(frozen=True)
class PositionalStats:
    """What a layer's position machinery does to its heads (dissect time, weights only).

    Rotary layers: modes of the offset average M̄ = E_Δ M(Δ) over the attending token pairs of the
    model's own layout (``U_bar``, ``S_bar``, ``V_bar``); the weighted cosine C_h(|Δ|) =
    tr M̄_d / ‖M̄_d‖_* of the average over pairs at distance d (``distances`` (D,) mean distance per
    bin in grid units, ``distance_pairs`` (D,), ``distance_cosine`` (H, D)); ``content_share`` (H,)
    = ‖M̄‖_F² / E_Δ‖M(Δ)‖_F² — the offset-independent (content, slow bands) part of the logit
    variance for isotropic inputs, the rest is position (fast bands); ``coherence`` (G, P) = |E w_f|
    per rotary pair (1: the pair acts as content, 0: pure position).
    Relative-bias layers: ``bias_variance`` (H,) = mean over queries of Var_j B_h[i, j], and
    ``bias_share`` (H,) = Var B / (Var B + scale² E‖M‖_F²), the bias' share of the logit variance
    for isotropic inputs x̃ ~ N(0, I).
    """

    U_bar: Tensor | None = None
    S_bar: Tensor | None = None
    V_bar: Tensor | None = None
    distances: Tensor | None = None
    distance_pairs: Tensor | None = None
    distance_cosine: Tensor | None = None
    content_share: Tensor | None = None
    coherence: Tensor | None = None
    bias_variance: Tensor | None = None
    bias_share: Tensor | None = None


@dataclass(frozen=True)
class LayerModes:
    """Modes of all heads of one layer. U, V: (heads, d_model, r); S: (heads, r); key_bias:
    (heads, d_model); ln_weight/ln_bias: (d_model,) of the LN feeding attention (kept so that a
    folded atlas can map captured x̃ back to n = (x̃ − β)/γ). Non-plain layers: ``form``, G_q, G_k
    (heads, r, d_head), head_b_q, head_b_k (heads, d_head), ``scale`` (the layer's own), ``positional``."""

    U: Tensor
    S: Tensor
    V: Tensor
    key_bias: Tensor
    ln_weight: Tensor | None = None
    ln_bias: Tensor | None = None
    form: AttentionForm | None = None
    G_q: Tensor | None = None
    G_k: Tensor | None = None
    head_b_q: Tensor | None = None
    head_b_k: Tensor | None = None
    scale: float | None = None
    positional: PositionalStats | None = None

    @property
    def n_heads(self) -> int:
        return self.S.shape[0]


@dataclass(frozen=True)
class HeadModes:
    """One head: M = U diag(S) Vᵀ, U/V (d_model, r), S (r,), key_bias (d_model,). ``form`` names the
    layer's attention form; ``positional`` holds its head's offset/bias statistics (JSON-ready)."""

    layer: int
    head: int
    U: Tensor
    S: Tensor
    V: Tensor
    key_bias: Tensor
    cosines: Tensor
    weighted_cosine: float
    symmetric_fraction: float
    near_degenerate: tuple[int, ...]
    above_null: bool
    below_null: bool
    n_defined: int = -1  # modes with σ_k > ε·σ_1 (the others have NaN cosines); 0: a head of rank 0
    form: str = "plain"
    positional: dict[str, Any] | None = None

    @property
    def M(self) -> Tensor:
        """The dense d_model × d_model matrix (for checks; never needed for analysis)."""
        return (self.U * self.S) @ self.V.T


def _number(value: float) -> float | None:
    """JSON has no NaN: an undefined statistic is written as null."""
    return value if math.isfinite(value) else None


def _padded(parts: list[Tensor], width: int) -> Tensor:
    """Stack per-layer (heads, ...) tensors, padding missing heads with NaN."""
    out = []
    for part in parts:
        if part.shape[0] < width:
            pad = torch.full((width - part.shape[0], *part.shape[1:]), float("nan"), dtype=part.dtype)
            part = torch.cat([part, pad])
        out.append(part)
    return torch.stack(out)


def head_positional(modes: LayerModes, head: int) -> dict[str, Any] | None:
    """JSON-ready positional statistics of one head (None for a layer without them)."""
    stats = modes.positional
    if stats is None:
        return None
    out: dict[str, Any] = {}
    if stats.S_bar is not None:
        S = stats.S_bar[head]
        cos = mode_cosines(stats.U_bar[head], stats.V_bar[head])
        out["offset_average"] = {"weighted_cosine": float(weighted_cosine(S, cos)),
                                 "singular_values": [float(f"{float(s):.6g}") for s in S]}
    if stats.distance_cosine is not None:
        out["distance_curve"] = {"distance": [round(float(d), 4) for d in stats.distances],
                                 "pairs": [int(n) for n in stats.distance_pairs],
                                 "weighted_cosine": [round(float(c), 6) for c in stats.distance_cosine[head]]}
    if stats.content_share is not None:
        share = float(stats.content_share[head])
        out["content_share"] = share
        out["position_share"] = 1.0 - share
    if stats.bias_variance is not None:
        out["bias_variance"] = float(stats.bias_variance[head])
        out["bias_share"] = float(stats.bias_share[head])
    return out


@dataclass(frozen=True)
class ModeAtlas:
    """Query-key modes of every head of a model, with statistics and provenance.

    ``meta`` is JSON-ready (model spec, family, shapes, scale, preprocessing, versions, ...).
    ``layer_nulls``: one null per layer when layers differ in shape (else ``null`` serves all).
    ``undefined_tol``: ε of "mode k is undefined when σ_k ≤ ε·σ_1" (None: ``metrics.undefined_tolerance`` of the
    atlas's dtype and d_model). Undefined modes have NaN cosines and are left out of every statistic; a head
    without a defined mode (rank 0) has NaN weighted cosine and symmetric fraction. Heads a layer does not have
    (Swin's early stages) are NaN in the stacked statistics and are no heads of rank 0.
    """

    meta: dict[str, Any]
    layers: tuple[LayerModes, ...]
    null: NullReference
    gap_tol: float = 1e-3
    layer_nulls: tuple[NullReference, ...] | None = None
    undefined_tol: float | None = None

    # ----- shapes --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        """Heads per layer (the largest, when layers differ: see :meth:`heads_in`)."""
        return max(layer.S.shape[0] for layer in self.layers)

    def heads_in(self, layer: int) -> int:
        return self.layers[layer].S.shape[0]

    @property
    def d_model(self) -> int:
        """Width of the first layer's input (see ``d_models`` for models whose width changes)."""
        return self.layers[0].U.shape[1]

    @property
    def d_models(self) -> tuple[int, ...]:
        return tuple(layer.U.shape[1] for layer in self.layers)

    @property
    def ragged(self) -> bool:
        """True when layers differ in width or number of heads (Swin's stages)."""
        return len({(layer.U.shape[0], layer.U.shape[1]) for layer in self.layers}) > 1

    @property
    def rank(self) -> int:
        return self.layers[0].S.shape[1]

    @property
    def scale(self) -> float:
        return float(self.meta["scale"])

    def layer_scale(self, layer: int) -> float:
        """The attention scale of ``layer`` (GPT-2 may scale by 1/(layer+1)); per-head scales of
        cosine attention live in the layer's form."""
        own = self.layers[layer].scale
        return self.scale if own is None else float(own)

    def null_for(self, layer: int) -> NullReference:
        return self.null if self.layer_nulls is None else self.layer_nulls[layer]

    def form(self, layer: int) -> AttentionForm | None:
        return self.layers[layer].form

    # ----- statistics (derived, cached) ---------------------------------------------------------
    @property
    def undefined_tolerance(self) -> float:
        """ε: mode k is undefined when σ_k ≤ ε·σ_1."""
        if self.undefined_tol is not None:
            return float(self.undefined_tol)
        return undefined_tolerance(self.layers[0].S.dtype, max(self.d_models))

    @cached_property
    def present(self) -> Tensor:
        """(layers, heads) bool: the head exists in its layer (False for the padding of narrower layers)."""
        return ~torch.isnan(self.singular_values[..., 0])

    @cached_property
    def defined(self) -> Tensor:
        """(layers, heads, r) bool: σ_k > ε·σ_1 (see :attr:`undefined_tolerance`)."""
        return defined_modes(self.singular_values, self.undefined_tolerance)

    @cached_property
    def head_ranks(self) -> Tensor:
        """(layers, heads) number of defined modes; 0 marks a head of rank 0 (W_qᵀW_k = 0)."""
        return self.defined.sum(dim=-1)

    def rank0_heads(self) -> list[tuple[int, int]]:
        """(layer, head) of every head without a defined mode."""
        return [tuple(int(i) for i in pair) for pair in torch.nonzero((self.head_ranks == 0) & self.present)]

    @cached_property
    def cosines(self) -> Tensor:
        """Per-mode cosines u_k·v_k, (layers, heads, r); NaN for undefined modes and absent heads."""
        raw = _padded([mode_cosines(layer.U, layer.V) for layer in self.layers], self.n_heads)
        return torch.where(self.defined, raw, torch.full_like(raw, float("nan")))

    @cached_property
    def singular_values(self) -> Tensor:
        """(layers, heads, r); NaN for heads a layer does not have."""
        return _padded([layer.S for layer in self.layers], self.n_heads)

    @cached_property
    def weighted_cosines(self) -> Tensor:
        """C_h = Σσcos/Σσ = tr(M)/‖M‖_* over the defined modes, (layers, heads); NaN for a head of rank 0 (and for
        heads a layer does not have)."""
        return defined_weighted_cosine(self.singular_values, self.cosines, self.defined)

    @cached_property
    def symmetric_fractions(self) -> Tensor:
        """‖M_s‖_F²/‖M‖_F², (layers, heads); NaN for a head of rank 0."""
        values = _padded([symmetric_fraction(layer.U, layer.S, layer.V) for layer in self.layers], self.n_heads)
        return torch.where(self.head_ranks > 0, values, torch.full_like(values, float("nan")))

    @cached_property
    def degenerate(self) -> Tensor:
        """(layers, heads, r−1) mask of near-degenerate consecutive defined singular values."""
        return near_degenerate(self.singular_values, self.gap_tol) & self.defined[..., 1:]

    def head(self, layer: int, head: int) -> HeadModes:
        """The modes and statistics of one head."""
        if not (0 <= layer < self.n_layers and 0 <= head < self.heads_in(layer)):
            upper = self.heads_in(layer) - 1 if 0 <= layer < self.n_layers else self.n_heads - 1
            raise QKDissectError(
                f"no head ({layer}, {head}): this atlas has layers 0..{self.n_layers - 1} and heads 0..{upper}."
            )
        modes = self.layers[layer]
        weighted = float(self.weighted_cosines[layer, head])
        band = self.null_for(layer).weighted_band
        return HeadModes(
            layer=layer, head=head, U=modes.U[head], S=modes.S[head], V=modes.V[head],
            key_bias=modes.key_bias[head], cosines=self.cosines[layer, head], weighted_cosine=weighted,
            symmetric_fraction=float(self.symmetric_fractions[layer, head]),
            near_degenerate=tuple(int(k) for k in torch.nonzero(self.degenerate[layer, head]).flatten()),
            above_null=weighted > band[1], below_null=weighted < band[0], n_defined=int(self.head_ranks[layer, head]),
            form="plain" if modes.form is None else modes.form.kind, positional=head_positional(modes, head),
        )

    def layer_summary(self) -> list[dict[str, Any]]:
        """Per layer: mean / std / min / max weighted cosine, shares of heads above/below the null,
        shares of modes above/below the cosine null, mean symmetric fraction — over the heads of rank > 0 and
        the defined modes (NaN when a layer has none), against the layer's own null."""
        rows = []
        for index in range(self.n_layers):
            n = self.heads_in(index)
            rows.append({"layer": index, **layer_statistics(self.weighted_cosines[index, :n], self.cosines[index, :n],
                                                            self.symmetric_fractions[index, :n],
                                                            self.null_for(index))})
        return rows

    # ----- files ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The atlas.json document: metadata, null, one object per head, one per layer, layer forms."""
        heads = []
        for layer in range(self.n_layers):
            lo, hi = self.null_for(layer).weighted_band
            for head in range(self.heads_in(layer)):
                w = float(self.weighted_cosines[layer, head])
                entry = {
                    "layer": layer, "head": head, "weighted_cosine": _number(w),
                    "cosines": [_number(round(float(c), 6)) for c in self.cosines[layer, head]],
                    "singular_values": [float(f"{float(s):.6g}") for s in self.singular_values[layer, head]],
                    "symmetric_fraction": _number(float(self.symmetric_fractions[layer, head])),
                    "null_threshold": hi, "null_band": [lo, hi],
                    "above_null": w > hi, "below_null": w < lo,
                    "near_degenerate_modes": [int(k) for k in torch.nonzero(self.degenerate[layer, head]).flatten()],
                    "n_defined_modes": int(self.head_ranks[layer, head]),
                    "rank0": bool(self.head_ranks[layer, head] == 0),
                }
                positional = head_positional(self.layers[layer], head)
                if positional:
                    entry["positional"] = positional
                heads.append(entry)
        document = {
            **self.meta,
            "format": ATLAS_FORMAT,
            "format_version": FORMAT_VERSION,
            "null": self.null.to_dict(),
            "degeneracy_tolerance": self.gap_tol,
            "undefined_tolerance": self.undefined_tolerance,
            "rank0_heads": [list(pair) for pair in self.rank0_heads()],
            "heads": heads,
            "layers": [{k: _number(v) for k, v in row.items()} for row in self.layer_summary()],
            "layer_forms": [self._layer_form_json(i) for i in range(self.n_layers)],
        }
        if self.layer_nulls is not None:
            document["layer_nulls"] = [null.to_dict() for null in self.layer_nulls]
        return document

    def _layer_form_json(self, index: int) -> dict[str, Any]:
        modes = self.layers[index]
        out: dict[str, Any] = {"layer": index, "d_model": modes.U.shape[1], "n_heads": modes.S.shape[0],
                               "scale": self.layer_scale(index)}
        if modes.form is None:
            out.update({"kind": "plain", "exact": ["W_q, W_k, b_q (key bias); logits exact up to per-query constants"]})
            return out
        out.update(modes.form.describe())
        out["stored"] = form_to_tensors(modes.form, f"layers.{index}.form")[1]
        if modes.positional is not None and modes.positional.content_share is not None:
            out["content_position_split"] = ("‖M̄‖²/E‖M(Δ)‖² over the model's attending token pairs, for isotropic "
                                             "inputs (a weights-only reference, not a data statistic)")
        if modes.positional is not None and modes.positional.bias_share is not None:
            out["bias_share_reference"] = "Var B / (Var B + scale²‖M‖_F²) for isotropic inputs x̃ ~ N(0, I)"
        return out

    def save(self, directory: str | os.PathLike, *, extra: Callable[[Path], Any] | None = None) -> Path:
        """Write ``atlas.safetensors`` and ``atlas.json`` into ``directory`` (created; a previous atlas there is
        replaced, any other non-empty folder refused: see :mod:`qkdissect.outputs`). ``extra(folder)`` may write
        more files (figures) into the same output before the index is written."""
        from qkdissect.formats import validated
        from qkdissect.formats.atlas import AtlasDocument
        from qkdissect.outputs import OutputFolder

        document = self.to_json()
        validated(AtlasDocument, document, Path(directory) / "atlas.json", "this atlas cannot be saved")
        with OutputFolder(directory, ATLAS_FORMAT, "atlas.json").claim(replace=True) as folder:
            self.write_tensors(folder.staging / "atlas.safetensors")
            if extra is not None:
                extra(folder.staging)
            folder.finish(document)
        return Path(directory)

    def write_tensors(self, path: str | os.PathLike) -> Path:
        """Write the tensors of the atlas (``layers.{i}.{U,S,V,key_bias,ln_weight,ln_bias,G_q,...}``, forms,
        positional statistics) to ``path``."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        for index, layer in enumerate(self.layers):
            for name in _LAYER_TENSORS:
                value = getattr(layer, name)
                if value is not None:
                    tensors[f"layers.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            if layer.form is not None:
                tensors.update(form_to_tensors(layer.form, f"layers.{index}.form")[0])
            if layer.positional is not None:
                for field in fields(PositionalStats):
                    value = getattr(layer.positional, field.name)
                    if value is not None:
                        tensors[f"layers.{index}.positional.{field.name}"] = value.detach().cpu().contiguous().clone()
        # one metadata key: safetensors writes several in an arbitrary order, and a rerun must give the same bytes
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={"format": ATLAS_FORMAT}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ModeAtlas":
        """Read an atlas written by :meth:`save` (format 1 or 2); one QKDissectError naming the file and the field
        for a missing, corrupt or inconsistent one (schema: :mod:`qkdissect.formats.atlas`)."""
        from qkdissect.formats import read_document
        from qkdissect.formats.atlas import AtlasDocument, check_atlas_tensors

        directory = Path(directory)
        json_path, tensor_path = directory / "atlas.json", directory / "atlas.safetensors"
        remedy = "create one with `qkdissect dissect MODEL --out DIR`"
        if not tensor_path.is_file():
            raise QKDissectError(f"{tensor_path} not found: {directory} is not an atlas folder. {remedy[0].upper()}{remedy[1:]}.")
        document, checked = read_document(json_path, AtlasDocument, missing=f"{directory} is not an atlas folder",
                                          remedy=remedy, kind=ATLAS_FORMAT, max_version=FORMAT_VERSION)
        try:
            from safetensors.torch import load_file

            tensors = load_file(str(tensor_path))
        except Exception as error:  # noqa: BLE001
            raise QKDissectError(f"{tensor_path} is corrupt ({type(error).__name__}); re-run `qkdissect dissect`.") from None
        check_atlas_tensors(tensor_path, checked, tensors)
        problem = checked.per_layer_problem()
        if problem is not None:
            raise QKDissectError(f"{json_path} is not a readable qkdissect atlas index: {problem}; {remedy}.")
        layers = []
        for index in range(checked.n_layers):
            prefix = f"layers.{index}"
            core = [tensors[f"{prefix}.{n}"] for n in ("U", "S", "V", "key_bias")]
            extra = {n: tensors.get(f"{prefix}.{n}") for n in _LAYER_TENSORS[4:]}
            entry = None if checked.layer_forms is None else checked.layer_forms[index]
            form = None
            if entry is not None and entry.stored is not None:
                try:
                    form = form_from_tensors(tensors, f"{prefix}.form", entry.stored.model_dump(exclude_none=True))
                except QKDissectError as error:
                    raise QKDissectError(f"{tensor_path}: layer {index}'s attention form: {error}") from None
            stored_keys = {k for k in tensors if k.startswith(f"{prefix}.form.")}
            described = set() if form is None else set(form_to_tensors(form, f"{prefix}.form")[0])
            if stored_keys != described:
                raise QKDissectError(f"{tensor_path}: layer {index}'s form tensors {sorted(stored_keys ^ described)[:3]} "
                                     f"do not match its description in {json_path}; re-run `qkdissect dissect`.")
            if form is not None:
                if form.needs_head_space and (extra["G_q"] is None or extra["G_k"] is None):
                    raise QKDissectError(f"{tensor_path} lacks layer {index}'s head-space factors G_q, G_k; "
                                         "re-run `qkdissect dissect`.")
            stats = {f.name: tensors.get(f"{prefix}.positional.{f.name}") for f in fields(PositionalStats)}
            layers.append(LayerModes(*core, **extra, form=form, scale=None if entry is None else entry.scale,
                                     positional=PositionalStats(**stats) if any(v is not None for v in stats.values())
                                     else None))
        meta = {k: v for k, v in document.items()
                if k not in ("heads", "layers", "null", "format", "format_version", "degeneracy_tolerance",
                             "undefined_tolerance", "rank0_heads", "layer_forms", "layer_nulls", "files")}
        layer_nulls = checked.layer_nulls
        return cls(meta=meta, layers=tuple(layers), null=NullReference.from_dict(checked.null.model_dump()),
                   gap_tol=checked.degeneracy_tolerance, undefined_tol=checked.undefined_tolerance,
                   layer_nulls=None if layer_nulls is None else tuple(NullReference.from_dict(n.model_dump())
                                                                      for n in layer_nulls))
