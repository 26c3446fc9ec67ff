"""Factored, batched SVD of every head's query-key matrix, and the ``ModeAtlas`` that holds it.

For head h: M_h = W_q,hᵀ W_k,h (d_model × d_model, rank ≤ d_head) = U diag(S) Vᵀ, with U and V
(d_model × r) holding the left and right singular vectors *as columns* (V, never Vᵀ). M holds
no 1/√d_head; the model's scale is recorded separately, so

    logit_ij = scale · [ x̃_iᵀ M x̃_j + key_biasᵀ x̃_j ] + (terms constant in j),
    key_bias = W_kᵀ b_q.

M is never formed: W_qᵀ = Q_q R_q, W_kᵀ = Q_k R_k (QR), R_q R_kᵀ = A diag(S) Bᵀ (an r × r SVD),
U = Q_q A, V = Q_k B. Sign rule: each mode (u_k, v_k) ≡ (−u_k, −v_k) is flipped so that the
entry of u_k with the largest magnitude is positive.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from qkdissect.adapters.base import AttentionLayer
from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.factored import factored_svd
from qkdissect.files import atomic_write, library_versions, read_json_document
from qkdissect.metrics import NullReference, gaussian_null, mode_cosines, symmetric_fraction, weighted_cosine

__all__ = ["FORMAT_VERSION", "HeadModes", "LayerModes", "ModeAtlas", "dissect", "factored_svd", "fold_layer_norm"]

FORMAT_VERSION = 1
ATLAS_FORMAT = "qkdissect-atlas"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fold_layer_norm(layer: AttentionLayer) -> AttentionLayer:
    """Fold the LayerNorm affine x̃ = γ ⊙ n + β into the projections (n = normalised input).

    W_q' = W_q diag(γ), b_q' = b_q + W_q β (same for k); the returned layer has no LN affine.
    """
    if layer.ln_weight is None and layer.ln_bias is None:
        return layer
    gamma = layer.ln_weight if layer.ln_weight is not None else torch.ones(layer.d_model, dtype=layer.W_q.dtype)
    beta = layer.ln_bias

    def fold(W: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
        W_folded = W * gamma
        if beta is None:
            return W_folded, b
        shift = W @ beta
        return W_folded, shift if b is None else b + shift

    W_q, b_q = fold(layer.W_q, layer.b_q)
    W_k, b_k = fold(layer.W_k, layer.b_k)
    return AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=layer.scale, kv_head_of=layer.kv_head_of)


def near_degenerate(S: Tensor, tol: float) -> Tensor:
    """Mask (..., r−1): True where (σ_k − σ_{k+1}) / σ_1 < tol — u_k, v_k are then ill-defined."""
    gaps = (S[..., :-1] - S[..., 1:]) / S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)
    return gaps < tol


@dataclass(frozen=True)
class LayerModes:
    """Modes of all heads of one layer. U, V: (heads, d_model, r); S: (heads, r);
    key_bias: (heads, d_model); ln_weight/ln_bias: (d_model,) of the LN feeding attention
    (kept so that a folded atlas can map captured x̃ back to the normalised n = (x̃ − β)/γ)."""

    U: Tensor
    S: Tensor
    V: Tensor
    key_bias: Tensor
    ln_weight: Tensor | None = None
    ln_bias: Tensor | None = None


@dataclass(frozen=True)
class HeadModes:
    """One head: M = U diag(S) Vᵀ, U/V (d_model, r), S (r,), key_bias (d_model,)."""

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

    @property
    def M(self) -> Tensor:
        """The dense d_model × d_model matrix (for checks; never needed for analysis)."""
        return (self.U * self.S) @ self.V.T


@dataclass(frozen=True)
class ModeAtlas:
    """Query-key modes of every head of a model, with statistics and provenance.

    ``meta`` is JSON-ready (model spec, family, shapes, scale, preprocessing, versions, ...).
    """

    meta: dict[str, Any]
    layers: tuple[LayerModes, ...]
    null: NullReference
    gap_tol: float = 1e-3

    # ----- shapes --------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.layers[0].S.shape[0]

    @property
    def d_model(self) -> int:
        return self.layers[0].U.shape[1]

    @property
    def rank(self) -> int:
        return self.layers[0].S.shape[1]

    @property
    def scale(self) -> float:
        return float(self.meta["scale"])

    # ----- statistics (derived, cached) ---------------------------------------------------------
    @cached_property
    def cosines(self) -> Tensor:
        """Per-mode cosines u_k·v_k, (layers, heads, r)."""
        return torch.stack([mode_cosines(layer.U, layer.V) for layer in self.layers])

    @cached_property
    def singular_values(self) -> Tensor:
        """(layers, heads, r)."""
        return torch.stack([layer.S for layer in self.layers])

    @cached_property
    def weighted_cosines(self) -> Tensor:
        """C_h = Σσcos/Σσ = tr(M)/‖M‖_*, (layers, heads)."""
        return weighted_cosine(self.singular_values, self.cosines)

    @cached_property
    def symmetric_fractions(self) -> Tensor:
        """‖M_s‖_F²/‖M‖_F², (layers, heads)."""
        return torch.stack([symmetric_fraction(layer.U, layer.S, layer.V) for layer in self.layers])

    @cached_property
    def degenerate(self) -> Tensor:
        """(layers, heads, r−1) mask of near-degenerate consecutive singular values."""
        return near_degenerate(self.singular_values, self.gap_tol)

    def head(self, layer: int, head: int) -> HeadModes:
        """The modes and statistics of one head."""
        if not (0 <= layer < self.n_layers and 0 <= head < self.n_heads):
            raise QKDissectError(
                f"no head ({layer}, {head}): this atlas has layers 0..{self.n_layers - 1} and heads 0..{self.n_heads - 1}."
            )
        modes = self.layers[layer]
        weighted = float(self.weighted_cosines[layer, head])
        return HeadModes(
            layer=layer, head=head, U=modes.U[head], S=modes.S[head], V=modes.V[head],
            key_bias=modes.key_bias[head], cosines=self.cosines[layer, head], weighted_cosine=weighted,
            symmetric_fraction=float(self.symmetric_fractions[layer, head]),
            near_degenerate=tuple(int(k) for k in torch.nonzero(self.degenerate[layer, head]).flatten()),
            above_null=weighted > self.null.weighted_band[1], below_null=weighted < self.null.weighted_band[0],
        )

    def layer_summary(self) -> list[dict[str, Any]]:
        """Per layer: mean / std / min / max weighted cosine, shares of heads above/below the null,
        share of modes above the cosine null, mean symmetric fraction."""
        lo, hi = self.null.weighted_band
        c_lo, c_hi = self.null.cosine_band
        rows = []
        for index in range(self.n_layers):
            w = self.weighted_cosines[index].double()
            cos = self.cosines[index].double()
            rows.append({
                "layer": index,
                "mean_weighted_cosine": float(w.mean()),
                "std_weighted_cosine": float(w.std()) if w.numel() > 1 else 0.0,
                "min_weighted_cosine": float(w.min()),
                "max_weighted_cosine": float(w.max()),
                "share_heads_above_null": float((w > hi).double().mean()),
                "share_heads_below_null": float((w < lo).double().mean()),
                "share_modes_above_null": float((cos > c_hi).double().mean()),
                "share_modes_below_null": float((cos < c_lo).double().mean()),
                "mean_symmetric_fraction": float(self.symmetric_fractions[index].double().mean()),
            })
        return rows

    # ----- files ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The atlas.json document: metadata, null, one object per head, one per layer."""
        lo, hi = self.null.weighted_band
        heads = []
        for layer in range(self.n_layers):
            for head in range(self.n_heads):
                w = float(self.weighted_cosines[layer, head])
                heads.append({
                    "layer": layer, "head": head, "weighted_cosine": w,
                    "cosines": [round(float(c), 6) for c in self.cosines[layer, head]],
                    "singular_values": [float(f"{float(s):.6g}") for s in self.singular_values[layer, head]],
                    "symmetric_fraction": float(self.symmetric_fractions[layer, head]),
                    "null_threshold": hi, "null_band": [lo, hi],
                    "above_null": w > hi, "below_null": w < lo,
                    "near_degenerate_modes": [int(k) for k in torch.nonzero(self.degenerate[layer, head]).flatten()],
                })
        return {
            **self.meta,
            "format": "qkdissect-atlas",
            "format_version": FORMAT_VERSION,
            "null": self.null.to_dict(),
            "degeneracy_tolerance": self.gap_tol,
            "heads": heads,
            "layers": self.layer_summary(),
        }

    def save(self, directory: str | os.PathLike, *, extra: Callable[[Path], Any] | None = None) -> Path:
        """Write ``atlas.safetensors`` and ``atlas.json`` into ``directory`` (created; a previous atlas there is
        replaced, any other non-empty folder refused: see :mod:`qkdissect.outputs`). ``extra(folder)`` may write
        more files (figures) into the same output before the index is written."""
        from qkdissect.outputs import OutputFolder

        with OutputFolder(directory, ATLAS_FORMAT, "atlas.json").claim(replace=True) as folder:
            self.write_tensors(folder.staging / "atlas.safetensors")
            if extra is not None:
                extra(folder.staging)
            folder.finish(self.to_json())
        return Path(directory)

    def write_tensors(self, path: str | os.PathLike) -> Path:
        """Write the tensors of the atlas (``layers.{i}.{U,S,V,key_bias,ln_weight,ln_bias}``) to ``path``."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        for index, layer in enumerate(self.layers):
            for name in ("U", "S", "V", "key_bias", "ln_weight", "ln_bias"):
                value = getattr(layer, name)
                if value is not None:
                    tensors[f"layers.{index}.{name}"] = value.detach().cpu().contiguous()
        return atomic_write(path, lambda p: save_file(tensors, str(p), metadata={
            "format": ATLAS_FORMAT, "format_version": str(FORMAT_VERSION)}))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ModeAtlas":
        """Read an atlas written by :meth:`save`; QKDissectError for a missing or corrupt one."""
        directory = Path(directory)
        json_path, tensor_path = directory / "atlas.json", directory / "atlas.safetensors"
        remedy = "create one with `qkdissect dissect MODEL --out DIR`"
        if not tensor_path.is_file():
            raise QKDissectError(f"{tensor_path} not found: {directory} is not an atlas folder. {remedy[0].upper()}{remedy[1:]}.")
        document = read_json_document(json_path, missing=f"{directory} is not an atlas folder", remedy=remedy,
                                      kind="qkdissect-atlas", max_version=FORMAT_VERSION)
        try:
            from safetensors.torch import load_file

            tensors = load_file(str(tensor_path))
        except Exception as error:  # noqa: BLE001
            raise QKDissectError(f"{tensor_path} is corrupt ({type(error).__name__}); re-run `qkdissect dissect`.") from None
        layers = []
        for index in range(int(document["n_layers"])):
            try:
                layers.append(LayerModes(*(tensors[f"layers.{index}.{n}"] for n in ("U", "S", "V", "key_bias")),
                                         tensors.get(f"layers.{index}.ln_weight"),
                                         tensors.get(f"layers.{index}.ln_bias")))
            except KeyError as error:
                raise QKDissectError(f"{tensor_path} lacks {error.args[0]}; the atlas is incomplete.") from None
        meta = {k: v for k, v in document.items()
                if k not in ("heads", "layers", "null", "format", "format_version", "degeneracy_tolerance", "files")}
        return cls(meta=meta, layers=tuple(layers), null=NullReference.from_dict(document["null"]),
                   gap_tol=float(document.get("degeneracy_tolerance", 1e-3)))


def _stacked(layers: list[AttentionLayer]) -> Iterable[tuple[list[int], Tensor, Tensor]]:
    """Group layers of equal shape so that each group is decomposed in one batched call."""
    groups: dict[tuple, list[int]] = {}
    for index, layer in enumerate(layers):
        groups.setdefault(tuple(layer.W_q.shape), []).append(index)
    for indices in groups.values():
        yield indices, torch.stack([layers[i].W_q for i in indices]), torch.stack([layers[i].W_k for i in indices])


def dissect(
    model: Any,
    *,
    fold_ln: bool = False,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    null_samples: int = 1000,
    null_percentile: float = 99.0,
    seed: int = 0,
    gap_tol: float = 1e-3,
) -> ModeAtlas:
    """Decompose every head of ``model`` (a ``LoadedModel`` or a supported ``nn.Module``).

    ``fold_ln`` folds the LayerNorm affine feeding attention into W_q, W_k and the biases (the
    modes then live on the normalised input n, x̃ = γ⊙n + β). ``dtype``: float32 or float64 for
    the SVD. The Gaussian null uses ``null_samples`` heads with the model's shapes and the
    central ``null_percentile``% band.
    """
    loaded: LoadedModel = wrap_model(model)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise QKDissectError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        dtype = _DTYPES[dtype]
    started = time.perf_counter()
    raw = [layer.expanded() for layer in loaded.adapter.attention_layers()]
    cast = [_to(layer, dtype, device) for layer in raw]  # fold in the working precision
    folded = [fold_layer_norm(layer) if fold_ln else layer for layer in cast]
    modes: list[LayerModes | None] = [None] * len(folded)
    for indices, W_q, W_k in _stacked(folded):
        U, S, V = factored_svd(W_q, W_k)
        for position, index in enumerate(indices):
            layer = folded[index]
            key_bias = (torch.einsum("hd,hdm->hm", layer.b_q, layer.W_k) if layer.b_q is not None
                        else torch.zeros(layer.n_heads, layer.d_model, dtype=dtype, device=U.device))
            ln_w, ln_b = raw[index].ln_weight, raw[index].ln_bias
            modes[index] = LayerModes(U[position].cpu(), S[position].cpu(), V[position].cpu(), key_bias.cpu(),
                                      None if ln_w is None else ln_w.to(dtype).cpu(),
                                      None if ln_b is None else ln_b.to(dtype).cpu())
    description = loaded.adapter.describe()
    has_ln = any(layer.ln_weight is not None or layer.ln_bias is not None for layer in raw)
    preprocessing = loaded.preprocessing
    scales = sorted({layer.scale for layer in raw})
    if len(scales) != 1:
        raise QKDissectError(f"layers of this model use different attention scales {scales}; not supported.")
    meta = {
        "model": loaded.spec,
        "checkpoint": loaded.checkpoint,
        **description,
        "scale": scales[0],
        "scale_is_inverse_sqrt_d_head": math.isclose(scales[0], description["d_head"] ** -0.5, rel_tol=1e-6),
        "ln_folded": bool(fold_ln and has_ln),
        "x_tilde": ("normalised attention input n, x̃ = γ⊙n + β" if fold_ln and has_ln
                    else "attention input x̃ (LN output incl. affine; block input for post-LN)"),
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "decomposition_seconds": round(time.perf_counter() - started, 4),
        "info": loaded.info,
    }
    null = gaussian_null(description["d_model"], description["d_head"], n_samples=null_samples,
                         percentile=null_percentile, seed=seed)
    return ModeAtlas(meta=meta, layers=tuple(modes), null=null, gap_tol=gap_tol)


def _to(layer: AttentionLayer, dtype: torch.dtype, device: Any) -> AttentionLayer:
    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype=dtype, device=device)

    return AttentionLayer(W_q=cast(layer.W_q), W_k=cast(layer.W_k), b_q=cast(layer.b_q), b_k=cast(layer.b_k),
                          scale=layer.scale, ln_weight=cast(layer.ln_weight), ln_bias=cast(layer.ln_bias),
                          kv_head_of=layer.kv_head_of)
