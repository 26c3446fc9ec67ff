"""Attention rows of query tokens, measured (from the model's own parameters) and predicted from the QK modes, and
their shares over same object / other objects / background."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from qkdissect.adapters.base import AttentionLayer
from qkdissect.errors import QKDissectError
from qkdissect.forms.logits import layer_logits
from qkdissect.projection import atlas_input, mode_contributions, project, residual_logits, valid_pairs

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["attention_rows", "attention_rows_from_modes", "attention_shares"]


def _gather_tokens(x: Tensor, tokens: Tensor) -> Tensor:
    """x (B, N, D), tokens (B, Q) -> (B, Q, D)."""
    return torch.gather(x, 1, tokens[..., None].expand(-1, -1, x.shape[-1]))


def attention_rows(layer: AttentionLayer, x: Tensor, tokens: Tensor) -> Tensor:
    """The model's attention rows of the query ``tokens``, from its own W_q, W_k, b_q, b_k.

    x: x̃ (B, N, d_model); tokens: (B, Q) sequence positions -> (B, heads, Q, N), rows summing to 1:
    softmax_j(scale · (W_q x̃_t + b_q)·(W_k x̃_j + b_k)), or for a layer with another attention form
    (rotation, QK-norm, relative bias, masks) its exact logits from the parameters
    (``qkdissect.forms.logits.layer_logits``).
    """
    if layer.form is not None:
        logits = layer_logits(layer, x)  # (B, H, N, N)
        index = tokens[:, None, :, None].expand(-1, logits.shape[1], -1, logits.shape[-1])
        return torch.gather(logits, 2, index).softmax(dim=-1)
    layer = layer.expanded()
    W_q, W_k = layer.W_q.to(x), layer.W_k.to(x)
    q = torch.einsum("bqd,hed->bhqe", _gather_tokens(x, tokens), W_q)
    k = torch.einsum("bnd,hed->bhne", x, W_k)
    if layer.b_q is not None:
        q = q + layer.b_q.to(x)[None, :, None, :]
    if layer.b_k is not None:
        k = k + layer.b_k.to(x)[None, :, None, :]
    return (layer.scale * torch.einsum("bhqe,bhne->bhqn", q, k)).softmax(dim=-1)


def attention_rows_from_modes(atlas: ModeAtlas, layer: int, x: Tensor, tokens: Tensor,
                              n_modes: Sequence[int | None] = (None,)) -> Tensor:
    """Attention rows predicted from the leading modes of each head.

    x: x̃ (B, N, d_model); tokens (B, Q) -> (len(n_modes), B, heads, Q, N):
    softmax_j(scale · (Σ_{k<m} σ_k (u_k·x̃_t)(v_k·x̃_j) + key_bias·x̃_j)) for each m in ``n_modes``
    (None = all r modes, which reproduces the model's attention exactly). Layers with another attention
    form keep their exact non-mode part (:func:`qkdissect.projection.residual_logits`) and masks and
    add the exact contributions of the leading modes (:func:`qkdissect.projection.mode_contributions`).
    """
    modes = atlas.layers[layer]
    if modes.form is not None:
        return _rows_from_form(atlas, layer, x, tokens, n_modes)
    q, k = project(atlas, layer, x)  # (B, H, N, r)
    q = torch.gather(q, 2, tokens[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    q = q * modes.S.to(q)[None, :, None, :]  # σ_k (u_k·x̃_t)
    salience = torch.einsum("bnd,hd->bhn", atlas_input(atlas, layer, x), modes.key_bias.to(q))[:, :, None, :]
    rows = []
    for m in n_modes:
        m = q.shape[-1] if m is None else min(int(m), q.shape[-1])
        bilinear = torch.einsum("bhqr,bhnr->bhqn", q[..., :m], k[..., :m])
        rows.append((atlas.scale * (bilinear + salience)).softmax(dim=-1))
    return torch.stack(rows)


def _rows_from_form(atlas: ModeAtlas, layer: int, x: Tensor, tokens: Tensor, n_modes: Sequence[int | None]) -> Tensor:
    B, N = x.shape[:2]
    allowed = valid_pairs(atlas, layer, x)
    index = tokens[:, None, :, None].expand(-1, 1, -1, N)
    heads = []
    for head in range(atlas.heads_in(layer)):
        parts = mode_contributions(atlas, layer, x, head)  # (B, r, N, N)
        residual = residual_logits(atlas, layer, x, head)
        per_m = []
        for m in n_modes:
            m = parts.shape[1] if m is None else min(int(m), parts.shape[1])
            logits = parts[:, :m].sum(dim=1) + residual
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            per_m.append(torch.gather(logits[:, None], 2, index)[:, 0].softmax(dim=-1))  # (B, Q, N)
        heads.append(torch.stack(per_m))
    return torch.stack(heads, dim=2)  # (len(n_modes), B, H, Q, N)


def attention_shares(rows: Tensor, n_prefix: int, maps: Tensor, query_patch: Tensor) -> tuple[Tensor, Tensor]:
    """Shares of attention per category, in the three variants of the module docstring.

    rows (..., B, H, Q, N) attention over all tokens; maps (B, Q, C, P) area fractions on the
    P = N − n_prefix patches; query_patch (B, Q) the query's patch index (−1: unavailable).
    Returns (shares (..., B, H, Q, 3 variants, C), prefix (..., B, H, Q)), NaN where the query is
    unavailable (and area-normalised shares of a category with zero area).
    """
    patch = rows[..., n_prefix:].double()
    if patch.shape[-1] != maps.shape[-1]:
        raise QKDissectError(f"the model has {patch.shape[-1]} patch tokens but the masks give {maps.shape[-1]} "
                             "patches; the patch grid does not match the model's token count.")
    maps = maps.to(patch)
    prefix = rows[..., :n_prefix].double().sum(dim=-1)
    a = patch / patch.sum(dim=-1, keepdim=True)
    raw = torch.einsum("...bhqp,bqcp->...bhqc", a, maps)
    area = maps.mean(dim=-1)[:, None]  # (B, 1, Q, C)
    area_norm = raw / torch.where(area > 0, area, torch.nan)
    index = query_patch.clamp_min(0).to(a.device)[:, None, :, None].expand(*a.shape[:-1], 1)
    own = torch.gather(a, -1, index)
    without = a.scatter(-1, index, 0.0) / (1.0 - own)
    noself = torch.einsum("...bhqp,bqcp->...bhqc", without, maps)
    shares = torch.stack([raw, area_norm, noself], dim=-2)
    missing = (query_patch < 0).to(a.device)[:, None, :]
    shares = shares.masked_fill(missing[..., None, None], torch.nan)
    return shares, prefix.masked_fill(missing, torch.nan)


