"""timm ``Eva``: EVA / EVA-02, RoPE-ViT (``vit_*_rope_*``: axial and mixed, with or without absolute
position embeddings), DINOv3 (``vit_*_dinov3*``), Perception Encoder and the other RoPE ViTs timm
builds on ``Eva``.

Attention modules are ``EvaAttention`` or ``AttentionRope`` (fused qkv with BEiT-style q_bias and
a zero k_bias, or separate q/k/v Linears; grouped-query heads; optional per-head QK-norm applied
before the rotation). The rotary embedding is read as the model computes it for its own input
size — ``model._pos_embed`` on the patch embedding of a zero image returns exactly the tensor
every block receives — and converted to per-pair cos/sin with the layout the attention module
uses (``rotate_half``: half-split, else interleaved), checking that the table repeats each angle
in that layout. The first ``num_prefix_tokens`` tokens (CLS, registers) are not rotated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qkdissect.adapters.base import AttentionLayer, loaded_class
from qkdissect.adapters.registry import register_adapter
from qkdissect.adapters.timm_common import TimmAdapter, qk_norm_of, split_qk
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm, RotaryTable

__all__ = ["TimmEvaAdapter", "pairs_from_full"]

_ROPE_ATTRS = ("temperature", "grid_indexing", "grid_type", "normalize_coords", "ref_feat_shape", "grid_offset",
               "in_pixels", "min_period", "max_period", "max_res", "linear_bands")


def pairs_from_full(full: Tensor, layout: str, what: str) -> Tensor:
    """Per-pair values (..., P) from a full-width table (..., 2P) in the model's layout; refuses
    a table whose duplicated entries disagree (then the layout is not the one the model uses)."""
    P = full.shape[-1] // 2
    first, second = (full[..., 0::2], full[..., 1::2]) if layout == "interleaved" else (full[..., :P], full[..., P:])
    if not torch.allclose(first, second, atol=1e-6, rtol=0):
        raise QKDissectError(f"the {what} table does not repeat each angle in the {layout} layout the attention "
                             "module applies; qkdissect cannot tell which coordinates rotate together.")
    return first


def rope_info(rope: nn.Module, grid: tuple[int, int]) -> dict[str, Any]:
    info: dict[str, Any] = {"module": type(rope).__name__, "grid": list(grid)}
    for name in _ROPE_ATTRS:
        value = getattr(rope, name, None)
        if isinstance(value, (int, float, str, bool)) or (isinstance(value, (tuple, list)) and value):
            info[name] = list(value) if isinstance(value, (tuple, list)) else value
    if info.get("grid_type") == "centered" or type(rope).__name__ == "RotaryEmbeddingDinoV3":
        info["coordinates"] = "patch centres normalised to [-1, 1] over the grid: offsets depend on the grid size"
    elif info.get("ref_feat_shape"):
        info["coordinates"] = "patch index rescaled to the reference grid ref_feat_shape"
    else:
        info["coordinates"] = "patch index"
    return info


@register_adapter
class TimmEvaAdapter(TimmAdapter):
    family = "timm-eva"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        eva = loaded_class("timm.models.eva", "Eva")
        return eva is not None and isinstance(model, eva)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import AttentionRope
        from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

        self._post_norm = False
        for index, block in enumerate(model.blocks):
            if type(block) not in (EvaBlock, EvaBlockPostNorm):
                raise QKDissectError(f"block {index} of this Eva model is a {type(block).__name__}; qkdissect reads "
                                     "EvaBlock / EvaBlockPostNorm.")
            if type(block.attn) not in (EvaAttention, AttentionRope):
                raise QKDissectError(f"block {index} uses attention {type(block.attn).__name__}; qkdissect reads "
                                     "EvaAttention and AttentionRope.")
            qk_norm_of(block.attn)
            self._post_norm = self._post_norm or isinstance(block, EvaBlockPostNorm)
        self._tables: list[RotaryTable | None] | None = None

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def qk_linears(self, layer: int):
        attn = self.model.blocks[layer].attn
        if self.model.rope is not None or qk_norm_of(attn) is not None:
            return None  # rotated / normalised q, k: consumers project x̃ through the atlas
        if isinstance(getattr(attn, "qkv", None), nn.Linear) and getattr(attn, "q_bias", None) is None:
            return "fused", attn.qkv, None
        return None

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        kinds = (["cls"] if self.model.cls_token is not None else [])
        if self.model.reg_token is not None:
            kinds += ["register"] * self.model.reg_token.shape[1]
        if len(kinds) != int(self.model.num_prefix_tokens):
            raise QKDissectError(f"this Eva model reports {self.model.num_prefix_tokens} prefix tokens but qkdissect "
                                 f"found {kinds}.")
        return tuple(kinds)

    # ----- rotary tables -----------------------------------------------------------------------
    def rotary_tables(self) -> list[RotaryTable | None]:
        """Per layer the rotation each block receives for the model's input size (None without RoPE)."""
        if self._tables is not None:
            return self._tables
        model = self.model
        if model.rope is None:
            self._tables = [None] * len(model.blocks)
            return self._tables
        image = self.dummy_image()
        with torch.no_grad():
            embedded = model.patch_embed(image)
            _, rope = model._pos_embed(embedded)
        if rope is None:
            raise QKDissectError("this Eva model has a rotary module but produced no rotary embedding.")
        grid = self.patch_grid(tuple(image.shape[-2:]))
        n_patch = grid[0] * grid[1]
        n_prefix = int(model.num_prefix_tokens)
        rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
        positions = torch.cat([torch.full((n_prefix, 2), float("nan")),
                               torch.stack([rows.flatten(), cols.flatten()], dim=-1).double()])
        info = rope_info(model.rope, grid)
        tables: list[RotaryTable | None] = []
        for index, block in enumerate(model.blocks):
            emb = rope[index] if getattr(model, "rope_mixed", False) else rope
            emb = emb.detach().double()
            if emb.dim() == 2:
                emb = emb[None]  # (1, N, 2·dim): one rotation for all heads
            if emb.shape[-2] != n_patch:
                raise QKDissectError(f"the rotary embedding has {emb.shape[-2]} rows for a {grid[0]}×{grid[1]} grid.")
            layout = "half" if getattr(block.attn, "rotate_half", False) else "interleaved"
            sin_full, cos_full = emb.chunk(2, dim=-1)  # timm's apply_rot_embed_cat order: sin, then cos
            sin = pairs_from_full(sin_full, layout, "sine")
            cos = pairs_from_full(cos_full, layout, "cosine")
            G, _, P = cos.shape
            cos = torch.cat([torch.ones(G, n_prefix, P, dtype=cos.dtype), cos], dim=1)
            sin = torch.cat([torch.zeros(G, n_prefix, P, dtype=sin.dtype), sin], dim=1)
            if 2 * P > block.attn.head_dim:
                raise QKDissectError(f"the rotary table of block {index} is wider than its heads.")
            tables.append(RotaryTable(cos=cos, sin=sin, layout=layout, rotary_dim=2 * P, positions=positions,
                                      info={**info, "per_head_frequencies": G > 1}))
        self._tables = tables
        return tables

    def attention_form(self, layer: int) -> AttentionForm:
        return AttentionForm(rotary=self.rotary_tables()[layer], qk_norm=qk_norm_of(self.model.blocks[layer].attn))

    def attention_layers(self) -> list[AttentionLayer]:
        layers = []
        for index, block in enumerate(self.model.blocks):
            attn = block.attn
            n_heads, d_head = attn.num_heads, attn.head_dim
            n_kv = getattr(attn, "num_kv_heads", n_heads)
            W_q, W_k, b_q, b_k = split_qk(attn, n_heads, d_head, n_kv)
            ln_weight = ln_bias = None
            if not self._post_norm:
                ln_weight = getattr(block.norm1, "weight", None)
                ln_bias = getattr(block.norm1, "bias", None)
                ln_weight = None if ln_weight is None else ln_weight.detach().clone()
                ln_bias = None if ln_bias is None else ln_bias.detach().clone()
            form = self.attention_form(index)
            layers.append(AttentionLayer(
                W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=float(attn.scale), ln_weight=ln_weight, ln_bias=ln_bias,
                kv_head_of=None if n_kv == n_heads else tuple(h * n_kv // n_heads for h in range(n_heads)),
                form=None if form.is_plain else form))
        return layers
