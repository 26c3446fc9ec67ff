"""Factored, batched SVD of every head's query-key matrix: :func:`dissect` builds a ``ModeAtlas``.

For head h: M_h = W_q,hᵀ W_k,h (d_model × d_model, rank ≤ d_head) = U diag(S) Vᵀ, with U and V
(d_model × r) holding the left and right singular vectors *as columns* (V, never Vᵀ). M holds
no 1/√d_head; the model's scale is recorded separately, so

    logit_ij = scale · [ x̃_iᵀ M x̃_j + key_biasᵀ x̃_j ] + (terms constant in j),
    key_bias = W_kᵀ b_q.

M is never formed: W_qᵀ = Q_q R_q, W_kᵀ = Q_k R_k (QR), R_q R_kᵀ = A diag(S) Bᵀ (an r × r SVD),
U = Q_q A, V = Q_k B. Sign rule: each mode (u_k, v_k) ≡ (−u_k, −v_k) is flipped so that the
entry of u_k with the largest magnitude is positive.

Other attention forms (``qkdissect.forms``): a QK-norm's centring and gain are folded into the
projections (W' = diag(γ) P W), so the modes are those of the normalised core M_N = W'_qᵀ W'_k;
rotary layers get M(0) = W_qᵀW_k as content modes plus the offset average M̄, the distance curve
and the content/position split (``qkdissect.positional``); relative-bias layers get the bias
share. Non-plain layers keep head-space factors so that their exact logits can be rebuilt.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import torch
from torch import Tensor

from qkdissect.adapters.base import AttentionLayer
from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.atlas import (
    ATLAS_FORMAT,
    FORMAT_VERSION,
    HeadModes,
    LayerModes,
    ModeAtlas,
    PositionalStats,
    near_degenerate,
)
from qkdissect.errors import QKDissectError
from qkdissect.factored import factored_svd
from qkdissect.files import library_versions, timestamp
from qkdissect.forms.logits import fold_qk_norm
from qkdissect.metrics import gaussian_null
from qkdissect.parallel import thread_map, worker_count
from qkdissect.positional import TableMoments, positional_statistics

__all__ = ["ATLAS_FORMAT", "FORMAT_VERSION", "HeadModes", "LayerModes", "ModeAtlas", "dissect", "factored_svd", "fold_layer_norm",
           "near_degenerate"]

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
    return AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=layer.scale, kv_head_of=layer.kv_head_of,
                          form=layer.form)


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
    normed = [_fold_norm(layer) for layer in folded]
    modes: list[LayerModes] = [None] * len(normed)  # type: ignore[list-item]
    for indices, W_q, W_k in _stacked(normed):
        U, S, V = factored_svd(W_q, W_k)
        for position, index in enumerate(indices):
            modes[index] = _layer_modes(normed[index], raw[index], U[position], S[position], V[position], dtype)
    modes = _with_positional(modes, dtype)
    description = loaded.adapter.describe(raw)
    has_ln = any(layer.ln_weight is not None or layer.ln_bias is not None for layer in raw)
    preprocessing = loaded.preprocessing
    scales = [float(layer.scale) for layer in raw]
    forms = sorted({"plain" if layer.form is None else layer.form.kind for layer in raw})
    meta = {
        "model": loaded.spec,
        "checkpoint": loaded.checkpoint,
        **description,
        "scale": scales[0],
        "scale_is_inverse_sqrt_d_head": math.isclose(scales[0], description["d_head"] ** -0.5, rel_tol=1e-6),
        "attention_forms": forms,
        "ln_folded": bool(fold_ln and has_ln),
        "x_tilde": ("normalised attention input n, x̃ = γ⊙n + β" if fold_ln and has_ln
                    else "attention input x̃ (LN output incl. affine; block input for post-LN)"),
        "preprocessing": None if preprocessing is None else preprocessing.to_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": library_versions(),
        "created": timestamp(),
        "decomposition_seconds": round(time.perf_counter() - started, 4),
        "info": loaded.info,
    }
    if len(set(scales)) > 1:
        meta["layer_scales"] = scales
    shapes = [(layer.d_model, layer.d_head) for layer in raw]
    nulls = {shape: gaussian_null(shape[0], shape[1], n_samples=null_samples, percentile=null_percentile, seed=seed)
             for shape in dict.fromkeys(shapes)}
    layer_nulls = tuple(nulls[shape] for shape in shapes) if len(nulls) > 1 else None
    return ModeAtlas(meta=meta, layers=tuple(modes), null=nulls[shapes[0]], gap_tol=gap_tol, layer_nulls=layer_nulls)


def _fold_norm(layer: AttentionLayer) -> AttentionLayer:
    """Fold a QK-norm's centring and gain into the projections (W' = diag(γ) P W, b' = diag(γ) P b)."""
    norm = None if layer.form is None else layer.form.qk_norm
    if norm is None:
        return layer
    W_q, b_q = fold_qk_norm(layer.W_q, layer.b_q, norm, "q")
    W_k, b_k = fold_qk_norm(layer.W_k, layer.b_k, norm, "k")
    return AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=layer.scale, ln_weight=layer.ln_weight,
                          ln_bias=layer.ln_bias, kv_head_of=layer.kv_head_of, form=layer.form)


def _layer_modes(layer: AttentionLayer, raw: AttentionLayer, U: Tensor, S: Tensor, V: Tensor,
                 dtype: torch.dtype) -> LayerModes:
    key_bias = (torch.einsum("hd,hdm->hm", layer.b_q, layer.W_k) if layer.b_q is not None
                else torch.zeros(layer.n_heads, layer.d_model, dtype=dtype, device=U.device))
    ln_w, ln_b = raw.ln_weight, raw.ln_bias
    G_q = G_k = b_q = b_k = None
    if layer.form is not None and layer.form.needs_head_space:
        G_q = torch.einsum("hmr,hem->hre", U, layer.W_q).cpu()  # W_qᵀ = U G_q
        G_k = torch.einsum("hmr,hem->hre", V, layer.W_k).cpu()
        zeros = torch.zeros(layer.n_heads, layer.d_head, dtype=dtype)
        b_q = zeros if layer.b_q is None else layer.b_q.cpu()
        b_k = zeros if layer.b_k is None else layer.b_k.cpu()
    return LayerModes(U.cpu(), S.cpu(), V.cpu(), key_bias.cpu(),
                      None if ln_w is None else ln_w.to(dtype).cpu(),
                      None if ln_b is None else ln_b.to(dtype).cpu(),
                      form=layer.form, G_q=G_q, G_k=G_k, head_b_q=b_q, head_b_k=b_k, scale=float(layer.scale))


def _with_positional(modes: list[LayerModes], dtype: torch.dtype) -> list[LayerModes]:
    """Add rotary and relative-bias statistics; rotary tables shared by layers are processed once, and the
    layers' statistics are computed in parallel threads (:mod:`qkdissect.parallel`)."""
    unique: list[tuple[Any, int]] = []  # distinct (rotary table, d_head)
    which: list[int | None] = []  # per layer: its index in unique
    for layer in modes:
        table = None if layer.form is None else layer.form.rotary
        index = None
        if table is not None:
            d_head = layer.G_q.shape[-1]
            index = next((i for i, (t, d) in enumerate(unique) if d == d_head and torch.equal(t.cos, table.cos)
                          and torch.equal(t.sin, table.sin) and t.pairs == table.pairs), None)
            if index is None:
                index, _ = len(unique), unique.append((table, d_head))
        which.append(index)
    moments = thread_map(lambda key: TableMoments.of(*key), unique, worker_count(len(unique)))
    work = [(layer, None if i is None else moments[i], dtype) for layer, i in zip(modes, which)]
    n_positional = sum(layer.form is not None and (layer.form.rotary is not None or layer.form.bias is not None)
                       for layer in modes)
    return thread_map(_layer_with_positional, work, worker_count(n_positional))


def _layer_with_positional(work: tuple[LayerModes, TableMoments | None, torch.dtype]) -> LayerModes:
    layer, moments, dtype = work
    form = layer.form
    if form is None or (form.rotary is None and form.bias is None):
        return layer
    stats = positional_statistics(layer, moments)
    stats = PositionalStats(**{k: None if v is None else (v.to(dtype) if v.is_floating_point() else v)
                               for k, v in stats.__dict__.items()})
    return LayerModes(**{**layer.__dict__, "positional": stats})


def _to(layer: AttentionLayer, dtype: torch.dtype, device: Any) -> AttentionLayer:
    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype=dtype, device=device)

    return AttentionLayer(W_q=cast(layer.W_q), W_k=cast(layer.W_k), b_q=cast(layer.b_q), b_k=cast(layer.b_k),
                          scale=layer.scale, ln_weight=cast(layer.ln_weight), ln_bias=cast(layer.ln_bias),
                          kv_head_of=layer.kv_head_of, form=layer.form)
