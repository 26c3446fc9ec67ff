"""timm families with a learned relative position bias: ``Beit`` (BEiT, BEiT-v2; per-layer and/or
shared bias tables) and Swin (``SwinTransformer`` v1: window attention with shifted windows;
``SwinTransformerV2``: cosine attention with a learned per-head temperature and a continuous
relative position bias 16·sigmoid(MLP(log-spaced coordinates))).

Swin's attention modules see windows: x̃ is (B·n_windows, T_w, d_model) after roll(−shift), padding
and window partition; the model's own shift mask (additive −100) and the grid each block works on
are read in one forward pass of a zero image of the model's input size. Widths and head counts
change per stage (patch merging), so every layer carries its own d_model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkdissect.adapters.base import AttentionLayer, loaded_class
from qkdissect.adapters.registry import register_adapter
from qkdissect.adapters.timm_common import TimmAdapter, split_qk
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm, QKNorm, RelativeBias, WindowLayout, window_token_index

__all__ = ["TimmBeitAdapter", "TimmSwinAdapter"]


def _ln(norm: nn.Module | None) -> tuple[Tensor | None, Tensor | None]:
    if norm is None:
        return None, None
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    return (None if weight is None else weight.detach().clone(), None if bias is None else bias.detach().clone())


@register_adapter
class TimmBeitAdapter(TimmAdapter):
    """timm ``Beit``: x̃ = norm1(x); logits gain B_h[i, j] from the layer's own table and/or the shared one."""

    family = "timm-beit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        beit = loaded_class("timm.models.beit", "Beit")
        return beit is not None and isinstance(model, beit)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.models.beit import Attention, Block

        for index, block in enumerate(model.blocks):
            if type(block) is not Block or type(block.attn) is not Attention:
                raise QKDissectError(f"block {index} of this BEiT model is a {type(block).__name__} with "
                                     f"{type(block.attn).__name__}; qkdissect reads timm's beit Block/Attention.")

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.blocks]

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",)

    def attention_form(self, layer: int) -> AttentionForm:
        attn = self.model.blocks[layer].attn
        shared = self.model.rel_pos_bias
        parts = []
        if attn.relative_position_bias_table is not None:
            parts.append((attn.relative_position_bias_table, attn.relative_position_index, "layer"))
        if shared is not None:
            parts.append((shared.relative_position_bias_table, shared.relative_position_index, "shared"))
        if not parts:
            return AttentionForm()
        index = parts[0][1]
        if any(not torch.equal(p[1], index) for p in parts):
            raise QKDissectError(f"layer {layer}'s own and shared relative position indices differ; not supported.")
        table = sum(p[0].detach().double() for p in parts)
        return AttentionForm(bias=RelativeBias(table=table, index=index.clone(),
                                               info={"tables": [p[2] for p in parts],
                                                     "window": list(self.model.patch_embed.grid_size)}))

    def attention_layers(self) -> list[AttentionLayer]:
        layers = []
        for index, block in enumerate(self.model.blocks):
            attn = block.attn
            d_head = attn.qkv.weight.shape[0] // (3 * attn.num_heads)
            W_q, W_k, b_q, b_k = split_qk(attn, attn.num_heads, d_head)
            ln_weight, ln_bias = _ln(block.norm1)
            form = self.attention_form(index)
            layers.append(AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=float(attn.scale),
                                         ln_weight=ln_weight, ln_bias=ln_bias, form=None if form.is_plain else form))
        return layers


def _swin_classes() -> tuple[type, ...]:
    found = (loaded_class("timm.models.swin_transformer", "SwinTransformer"),
             loaded_class("timm.models.swin_transformer_v2", "SwinTransformerV2"))
    return tuple(c for c in found if c is not None)


@register_adapter
class TimmSwinAdapter(TimmAdapter):
    """timm Swin v1 / v2. Layers are all blocks of all stages in depth order."""

    family = "timm-swin"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        classes = _swin_classes()
        return bool(classes) and isinstance(model, classes)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.models import swin_transformer as v1
        from timm.models import swin_transformer_v2 as v2

        self.v2 = isinstance(model, v2.SwinTransformerV2)
        self.blocks = [block for stage in model.layers for block in stage.blocks]
        block_cls, attn_cls = ((v2.SwinTransformerV2Block, v2.WindowAttention) if self.v2
                               else (v1.SwinTransformerBlock, v1.WindowAttention))
        for index, block in enumerate(self.blocks):
            if type(block) is not block_cls or type(block.attn) is not attn_cls:
                raise QKDissectError(f"block {index} of this Swin model is a {type(block).__name__} with "
                                     f"{type(block.attn).__name__}; qkdissect reads timm's own Swin blocks.")
        self._windows: list[WindowLayout] | None = None

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.blocks]

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch_h, patch_w = self.model.patch_embed.patch_size
        return image_size[0] // patch_h, image_size[1] // patch_w

    def window_layouts(self) -> list[WindowLayout]:
        """Per layer the grid, window, shift and the mask each block passes to its attention, read
        from one forward pass of a zero image of the model's input size."""
        if self._windows is not None:
            return self._windows
        grids: dict[int, tuple[int, int]] = {}
        masks: dict[int, Tensor | None] = {}
        handles = []
        for index, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, i=index: grids.__setitem__(i, tuple(int(v) for v in args[0].shape[1:3]))))
            handles.append(block.attn.register_forward_pre_hook(
                lambda _m, args, kwargs, i=index: masks.__setitem__(
                    i, kwargs.get("mask", args[1] if len(args) > 1 else None)), with_kwargs=True))
        try:
            with torch.no_grad():
                self.model.forward_features(self.dummy_image())
        finally:
            for handle in handles:
                handle.remove()
        layouts = []
        for index, block in enumerate(self.blocks):
            window, shift = tuple(block.window_size), tuple(block.shift_size)
            mask = masks[index]
            layouts.append(WindowLayout(grid=grids[index], window=window, shift=shift,
                                        token_index=window_token_index(grids[index], window, shift),
                                        mask=None if mask is None else mask.detach().double().clone()))
        self._windows = layouts
        return layouts

    def attention_form(self, layer: int) -> AttentionForm:
        attn = self.blocks[layer].attn
        windows = self.window_layouts()[layer]
        n_heads = attn.num_heads
        if self.v2:
            with torch.no_grad():
                table = 16 * torch.sigmoid(attn.cpb_mlp(attn.relative_coords_table).view(-1, n_heads))
                scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().flatten()
            return AttentionForm(
                bias=RelativeBias(table=table.detach().double(), index=attn.relative_position_index.clone(),
                                  info={"continuous": "16·sigmoid(cpb_mlp(log-spaced relative coordinates))"}),
                windows=windows, qk_norm=QKNorm(kind="l2", eps=1e-12), head_scale=scale.detach().double())
        return AttentionForm(bias=RelativeBias(table=attn.relative_position_bias_table.detach().double(),
                                               index=attn.relative_position_index.clone()), windows=windows)

    def attention_layers(self) -> list[AttentionLayer]:
        layers = []
        for index, block in enumerate(self.blocks):
            attn = block.attn
            d_head = attn.qkv.weight.shape[0] // (3 * attn.num_heads)
            W_q, W_k, b_q, b_k = split_qk(attn, attn.num_heads, d_head)
            ln_weight, ln_bias = (None, None) if self.v2 else _ln(block.norm1)
            scale = 1.0 if self.v2 else float(attn.scale)
            layers.append(AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=scale, ln_weight=ln_weight,
                                         ln_bias=ln_bias, form=self.attention_form(index)))
        return layers
