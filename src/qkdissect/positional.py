"""Position-dependent query-key forms of an atlas: modes at any offset, the offset average M̄, the
distance curve C_h(|Δ|), the content/position split of rotary heads and the relative-bias share.

A rotary head's logit between query i and key j is scale · x̃_iᵀ M(Δ_ij) x̃_j (+ bias terms),
M(Δ) = W_qᵀ R(Δ) W_k = U K(Δ) Vᵀ with the r × r core K of ``qkdissect.forms.rotary``, so

* modes at offset Δ (key − query, grid units): the SVD of K(Δ) — :func:`offset_modes`;
* M̄ = E_Δ M(Δ) over the pairs that attend in the model's own token layout (prefix tokens at θ = 0);
* C_h(d) = tr M̄_d / ‖M̄_d‖_*, M̄_d the average over pairs at distance ≈ d;
* content share ‖M̄‖_F² / E_Δ‖M(Δ)‖_F² (isotropic inputs); position share = 1 − content share.

M is never formed: every quantity costs one r × r SVD per head and offset (or bin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qkdissect.atlas import LayerModes, ModeAtlas, PositionalStats
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm, RotaryTable
from qkdissect.forms.logits import additive_terms, head_logits, normalise
from qkdissect.forms.rotary import (
    core_at,
    distance_average,
    distance_edges,
    expected_norm2,
    modes_of_core,
    offset_average,
    offset_rotation,
    rotations,
    second_moments,
    to_complex,
)

__all__ = ["OffsetModes", "TableMoments", "bias_statistics", "offset_modes", "parse_offset", "positional_statistics",
           "refuse_windows", "rotary_statistics"]


@dataclass(frozen=True)
class OffsetModes:
    """Modes of M(Δ) of every head of a layer at one offset: U, V (H, d_model, r), S (H, r).
    ``offset`` (key − query, grid units) or None for the offset average; ``pairs``: token pairs
    of the model's layout averaged (1 for a translation-invariant rotation)."""

    layer: int
    offset: tuple[float, ...] | None
    U: Tensor
    S: Tensor
    V: Tensor
    pairs: int


@dataclass(frozen=True)
class TableMoments:
    """What the statistics need from one rotary table (shared by all layers that use the same one)."""

    z: Tensor
    w_bar: Tensor
    moment_ww: Tensor
    moment_wcw: Tensor
    w_bins: Tensor
    bin_pairs: Tensor
    bin_distance: Tensor

    @classmethod
    def of(cls, table: RotaryTable, d_head: int) -> "TableMoments":
        z = rotations(table, table.n_tokens, d_head)
        ww, wcw = second_moments(z, table.pairs)
        w_bins, pairs, distance = distance_average(z, table, distance_edges(table.positions))
        return cls(z=z, w_bar=offset_average(z, table.pairs), moment_ww=ww, moment_wcw=wcw, w_bins=w_bins,
                   bin_pairs=pairs, bin_distance=distance)


def _complex_factors(layer: LayerModes, table: RotaryTable) -> tuple[Tensor, Tensor]:
    return (to_complex(layer.G_q.double(), table.layout, table.rotary_dim),
            to_complex(layer.G_k.double(), table.layout, table.rotary_dim))


def positional_statistics(layer: LayerModes, moments: TableMoments | None) -> PositionalStats:
    """The rotary statistics (``moments``: the layer's rotary table's, None without rotation) and the relative-bias
    variance and share of one layer (float64); E‖M(w)‖_F² of the rotary layer is the content variance of its bias
    share."""
    form = layer.form
    stats, norm2 = PositionalStats(), None
    if form is not None and form.rotary is not None:
        stats, norm2 = _rotary_statistics(layer, moments)
    if form is not None and form.bias is not None:
        variance, share = bias_statistics(layer, float(layer.scale), norm2)
        stats = PositionalStats(**{**stats.__dict__, "bias_variance": variance, "bias_share": share})
    return stats


def rotary_statistics(layer: LayerModes, moments: TableMoments) -> PositionalStats:
    """M̄ modes, distance curve, content share and pair coherence of one rotary layer (float64)."""
    return _rotary_statistics(layer, moments)[0]


def _rotary_statistics(layer: LayerModes, moments: TableMoments) -> tuple[PositionalStats, Tensor]:
    """:func:`rotary_statistics` and E‖K(w)‖_F² per head (H,)."""
    table = layer.form.rotary
    U, V = layer.U.double(), layer.V.double()
    g_q, g_k = _complex_factors(layer, table)
    core_bar = core_at(g_q, g_k, moments.w_bar)
    U_bar, S_bar, V_bar = modes_of_core(U, V, core_bar)
    cores = core_at(g_q, g_k, moments.w_bins)  # (H, D, r, r)
    VtU = V.transpose(-1, -2) @ U
    trace = torch.einsum("hdkl,hlk->hd", cores, VtU)
    nuclear = nuclear_norm(cores)
    curve = torch.where(nuclear > 0, trace / nuclear.clamp_min(torch.finfo(nuclear.dtype).tiny), 0.0)
    total = expected_norm2(g_q, g_k, moments.moment_ww, moments.moment_wcw)
    content = (core_bar * core_bar).sum(dim=(-1, -2))
    share = torch.where(total > 0, content / total.clamp_min(torch.finfo(total.dtype).tiny), 1.0)
    coherence = moments.w_bar[..., :table.n_pairs].abs()
    return PositionalStats(U_bar=U_bar, S_bar=S_bar, V_bar=V_bar, distances=moments.bin_distance,
                           distance_pairs=moments.bin_pairs, distance_cosine=curve, content_share=share,
                           coherence=coherence), total


def nuclear_norm(cores: Tensor) -> Tensor:
    """‖K‖_* = Σ √λ(K Kᵀ) for a batch of square cores (..., r, r): a symmetric eigenvalue problem, a few
    times cheaper than an SVD; the error of a tiny σ is ~√ε·σ_0, far below what C_h resolves."""
    return torch.linalg.eigvalsh(cores @ cores.transpose(-1, -2)).clamp_min(0).sqrt().sum(-1)


def bias_statistics(layer: LayerModes, scale: float, content_norm2: Tensor | None, seed: int = 0
                    ) -> tuple[Tensor, Tensor]:
    """(bias_variance, bias_share) per head for a relative-bias layer (see PositionalStats).

    Var B is the variance of B_h[i, ·] over keys, averaged over queries. The content variance for
    isotropic x̃ ~ N(0, I) is scale² E‖M(Δ)‖_F² (``content_norm2``, or Σσ² of M); with a QK-norm it
    is estimated from 256 seeded Gaussian tokens through the exact normalised logits.
    """
    bias = layer.form.bias.dense().double()  # (H, T, T)
    bias_variance = bias.var(dim=-1, unbiased=False).mean(dim=-1)
    if layer.form.qk_norm is None:
        norm2 = (layer.S.double() ** 2).sum(-1) if content_norm2 is None else content_norm2
        if layer.form.head_scale is not None:
            content = layer.form.head_scale.double() ** 2 * norm2
        else:
            content = scale ** 2 * norm2
    else:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 256, layer.U.shape[1], generator=generator, dtype=torch.float64)
        q, k = head_vectors(layer, x)
        plain = AttentionForm(qk_norm=layer.form.qk_norm, head_scale=layer.form.head_scale)
        logits = head_logits(normalise(q, plain.qk_norm, "q")[0], normalise(k, plain.qk_norm, "k")[0], plain, scale)
        content = logits[0].var(dim=-1, unbiased=False).mean(dim=-1)
    share = bias_variance / (bias_variance + content).clamp_min(torch.finfo(torch.float64).tiny)
    return bias_variance, share


def head_vectors(layer: LayerModes, z: Tensor) -> tuple[Tensor, Tensor]:
    """Head-space a = G_qᵀ(Uᵀ z) + b_q and c = G_kᵀ(Vᵀ z) + b_k of a layer with head-space factors.

    z: (B, N, d_model) in the atlas' input space -> (B, H, N, d_head) each.
    """
    if layer.G_q is None:
        raise QKDissectError("this atlas layer has no head-space factors (a plain layer).")
    U, V = layer.U.to(z), layer.V.to(z)
    a = torch.einsum("bnd,hdr,hre->bhne", z, U, layer.G_q.to(z))
    c = torch.einsum("bnd,hdr,hre->bhne", z, V, layer.G_k.to(z))
    if layer.head_b_q is not None:
        a = a + layer.head_b_q.to(z)[None, :, None, :]
    if layer.head_b_k is not None:
        c = c + layer.head_b_k.to(z)[None, :, None, :]
    return a, c


def parse_offset(text: str) -> tuple[float, ...]:
    """"DY,DX" (or "D" for text) -> a tuple of floats; QKDissectError for anything else."""
    try:
        values = tuple(float(part) for part in str(text).replace(" ", "").split(","))
    except ValueError:
        values = ()
    if not values:
        raise QKDissectError(f"--offset must be numbers separated by commas (DY,DX for images, D for text), got {text!r}.")
    return values


def offset_modes(atlas: ModeAtlas, layer: int, offset: tuple[float, ...] | None) -> OffsetModes:
    """Modes of every head of ``layer`` at ``offset`` (key − query position, grid units: (rows,
    cols) for images, tokens for text). ``None``: the offset average M̄ over the model's layout.
    A layer without rotation has the same modes at every offset (its content modes)."""
    if not 0 <= layer < atlas.n_layers:
        raise QKDissectError(f"layer {layer} does not exist: the atlas has layers 0..{atlas.n_layers - 1}.")
    modes = atlas.layers[layer]
    table = None if modes.form is None else modes.form.rotary
    if table is None:
        return OffsetModes(layer, offset, modes.U, modes.S, modes.V, 0)
    if offset is None:
        stats = modes.positional
        if stats is None or stats.U_bar is None:
            raise QKDissectError(f"layer {layer} of this atlas has no offset average; re-run `qkdissect dissect`.")
        return OffsetModes(layer, None, stats.U_bar, stats.S_bar, stats.V_bar, 0)
    z = rotations(table, table.n_tokens, modes.G_q.shape[-1])
    w, count = offset_rotation(z, table, tuple(float(v) for v in offset))
    g_q, g_k = _complex_factors(modes, table)
    U, S, V = modes_of_core(modes.U.double(), modes.V.double(), core_at(g_q, g_k, w))
    dtype = modes.U.dtype
    return OffsetModes(layer, tuple(offset), U.to(dtype), S.to(dtype), V.to(dtype), count)


def exact_layer_logits(layer: LayerModes, z: Tensor, scale: float, masks: bool = True
                       ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Exact logits of a head-space layer from inputs z (B, N, d_model) in the atlas' input space:
    (logits (B, H, N, N) incl. the form's bias (and masks unless ``masks=False``), ρ_q, ρ_k (B, H, N) or None)."""
    form = layer.form
    a, c = head_vectors(layer, z)
    q, rho_q = normalise(a, form.qk_norm, "q")
    k, rho_k = normalise(c, form.qk_norm, "k")
    logits = head_logits(q, k, form, scale)
    extra = additive_terms(form, z.shape[0], z.shape[1], logits.dtype, logits.device, masks=masks)
    return (logits if extra is None else logits + extra), rho_q, rho_k


def offset_document(atlas: ModeAtlas, offsets: list[tuple[float, ...]]) -> tuple[dict, dict[str, Tensor]]:
    """JSON document and tensors of the modes at each offset, for every rotary layer:
    ``offsets[i].layers[j]`` = {layer, pairs, heads: [{head, weighted_cosine, singular_values}]},
    tensors ``offset{i}.layers.{layer}.{U,S,V}``. Layers without rotation have the same modes at
    every offset (their content modes) and are listed under ``position_free_layers``."""
    from qkdissect.metrics import mode_cosines, weighted_cosine

    rotary = [i for i, layer in enumerate(atlas.layers) if layer.form is not None and layer.form.rotary is not None]
    if not rotary:
        raise QKDissectError("--offset needs a model with rotary position embeddings; this model's logits do not "
                             "depend on the relative position through the bilinear form (its modes are the same "
                             "at every offset).")
    entries, tensors = [], {}
    for i, offset in enumerate(offsets):
        layers = []
        for layer in rotary:
            at = offset_modes(atlas, layer, offset)
            weighted = weighted_cosine(at.S, mode_cosines(at.U, at.V))
            layers.append({"layer": layer, "pairs": at.pairs, "heads": [
                {"head": h, "weighted_cosine": float(weighted[h]),
                 "singular_values": [float(f"{float(s):.6g}") for s in at.S[h]]} for h in range(at.S.shape[0])]})
            for name in ("U", "S", "V"):
                tensors[f"offset{i}.layers.{layer}.{name}"] = getattr(at, name).contiguous().clone()
        entries.append({"offset": list(offset), "layers": layers})
    document = {"format": "qkdissect-offsets", "format_version": 1, "model": atlas.meta.get("model"),
                "offset_meaning": "key position − query position in grid units (rows, cols) or tokens",
                "position_free_layers": [i for i in range(atlas.n_layers) if i not in rotary], "offsets": entries}
    return document, tensors


def refuse_windows(atlas: ModeAtlas, layer: int) -> None:
    """QKDissectError when ``layer`` attends inside (shifted) windows, for analyses that need one attention
    row over the whole image per query (mining's patch scores, preference between objects)."""
    form = atlas.layers[layer].form
    if form is not None and form.windows is not None:
        raise QKDissectError(f"layer {layer} attends inside (shifted) windows (Swin): mining and attention preference "
                             "of window attention are not supported (a query sees only its window); `qkdissect "
                             "dissect`, `maps`, `rank` and `report` are.")
