"""Hugging Face Swin (v1) and Swinv2: window attention with shifted windows and relative position
bias; Swinv2 uses cosine attention (L2-normalised q, k) with a learned per-head temperature and a
continuous bias 16·sigmoid(MLP(coordinates)), and is post-norm (x̃ is the block input).

Each layer's window grid, window/shift sizes (which the model clamps to the feature map at run
time) and shift mask are read in one forward pass of a zero image of the model's input size.
HF's Swinv2 adds its shift mask to the scores twice; the recorded mask is what it adds in total.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qkdissect.adapters.hf import HFAdapter
from qkdissect.adapters.registry import register_adapter
from qkdissect.forms import AttentionForm, QKNorm, RelativeBias, WindowLayout, window_token_index

__all__ = ["HFSwinAdapter", "HFSwinv2Adapter"]


class _HFSwinBase(HFAdapter):
    norm_attr = "layernorm_before"
    attention_attr = "attention"
    _windows: list[WindowLayout] | None = None
    mask_repeats = 1

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch = self.config.patch_size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
        return image_size[0] // patch_h, image_size[1] // patch_w

    def window_layouts(self) -> list[WindowLayout]:
        if self._windows is not None:
            return self._windows
        grids: dict[int, tuple[int, int]] = {}
        masks: dict[int, Tensor | None] = {}
        handles = []
        for index, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(
                lambda _m, args, kwargs, i=index: grids.__setitem__(
                    i, tuple(int(v) for v in (args[1] if len(args) > 1 else kwargs["input_dimensions"]))),
                with_kwargs=True))
            owner = self._qk[index][0]
            handles.append(owner.register_forward_pre_hook(
                lambda _m, args, kwargs, i=index: masks.__setitem__(
                    i, args[1] if len(args) > 1 else kwargs.get("attention_mask")), with_kwargs=True))
        try:
            with torch.no_grad():
                self.backbone(pixel_values=self.dummy_pixels())
        finally:
            for handle in handles:
                handle.remove()
        layouts = []
        for index, layer in enumerate(self.layers):
            size = int(layer.window_size)
            shift = int(layer.shift_size)
            mask = masks[index]
            layouts.append(WindowLayout(
                grid=grids[index], window=(size, size), shift=(shift, shift),
                token_index=window_token_index(grids[index], (size, size), (shift, shift)),
                mask=None if mask is None else self.mask_repeats * mask.detach().double().clone()))
        self._windows = layouts
        return layouts


@register_adapter
class HFSwinAdapter(_HFSwinBase):
    family = "hf-swin"
    transformers_module = "transformers.models.swin.modeling_swin"
    backbone_classes = ("SwinModel",)
    layer_class = "SwinLayer"

    def attention_form(self, layer: int) -> AttentionForm:
        bias = self._qk[layer][0].relative_position_bias
        T = bias.window_area
        return AttentionForm(bias=RelativeBias(table=bias.relative_position_bias_table.detach().double(),
                                               index=bias.relative_position_index.reshape(T, T).clone()),
                             windows=self.window_layouts()[layer])


@register_adapter
class HFSwinv2Adapter(_HFSwinBase):
    family = "hf-swinv2"
    transformers_module = "transformers.models.swinv2.modeling_swinv2"
    backbone_classes = ("Swinv2Model",)
    layer_class = "Swinv2Layer"
    mask_repeats = 2  # Swinv2SelfAttention adds attention_mask twice

    def _ln_feeding(self, index: int) -> nn.Module | None:
        return None  # post-norm: layernorm_before is applied to the attention output

    def projections(self, index: int):
        W_q, W_k, b_q, b_k, _ = super().projections(index)
        return W_q, W_k, b_q, b_k, 1.0  # the per-head temperature is the form's head_scale

    def attention_form(self, layer: int) -> AttentionForm:
        attn = self._qk[layer][0]
        n_heads = attn.num_attention_heads
        with torch.no_grad():
            table = 16 * torch.sigmoid(attn.continuous_position_bias_mlp(attn.relative_coords_table).view(-1, n_heads))
            temperature = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().flatten()
        T = attn.window_size[0] * attn.window_size[1]
        return AttentionForm(
            bias=RelativeBias(table=table.detach().double(), index=attn.relative_position_index.reshape(T, T).clone(),
                              info={"continuous": "16·sigmoid(MLP(log-spaced relative coordinates))"}),
            windows=self.window_layouts()[layer], qk_norm=QKNorm(kind="l2", eps=1e-12),
            head_scale=temperature.detach().double())
