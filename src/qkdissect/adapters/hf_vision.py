"""Hugging Face vision families beyond the 2021 ViTs: SigLIP / SigLIP2 vision towers, MAE, DINOv3
(rotary), BEiT and Data2Vec-Vision (relative position bias).

SigLIP2 (NaFlex) reads patch sequences: the adapter cuts an image batch (B, 3, H, W) into
(B, h·w, p·p·3) patches the way its image processor does (row-major patches, channels last) and
passes ``spatial_shapes`` and an all-ones ``pixel_attention_mask``. MAE masks 75% of the patches
in random order at every forward; the adapter keeps all patches in image order (``noise`` = patch
index, ``mask_ratio`` = 0 during its own forward passes). DINOv3's rotation comes from the
backbone's own ``rope_embeddings`` module for the model's input size (half-split pairs; CLS and
register tokens unrotated). BEiT's bias is read from the layers' (and the shared) bias modules
as table + index for the model's own patch grid, checked against the modules' output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qkdissect.adapters.base import loaded_class
from qkdissect.adapters.hf import HALF, HFAdapter
from qkdissect.adapters.registry import register_adapter
from qkdissect.adapters.timm_eva import pairs_from_full
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm, RelativeBias, RotaryTable

__all__ = ["HFBeitAdapter", "HFData2VecVisionAdapter", "HFDinov3Adapter", "HFSiglip2Adapter", "HFSiglipAdapter",
           "HFViTMAEAdapter"]


def grid_positions(n_prefix: int, grid: tuple[int, int]) -> Tensor:
    """(n_prefix + rows·cols, 2) row/col of each token, NaN for prefix tokens."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([torch.full((n_prefix, 2), float("nan"), dtype=torch.float64),
                      torch.stack([rows.flatten(), cols.flatten()], dim=-1).double()])


@register_adapter
class HFSiglipAdapter(HFAdapter):
    family = "hf-siglip-vision"
    transformers_module = "transformers.models.siglip.modeling_siglip"
    backbone_classes = ("SiglipVisionModel", "SiglipVisionTransformer")
    layer_class = "SiglipEncoderLayer"
    attention_attr = "self_attn"
    norm_attr = "layer_norm1"
    default_mean, default_std, default_interpolation = HALF, HALF, "bicubic"

    @classmethod
    def _backbone_of(cls, model: nn.Module) -> nn.Module | None:
        full = loaded_class(cls.transformers_module, "SiglipModel")
        if full is not None and isinstance(model, full):
            model = model.vision_model  # never the text tower
        return super()._backbone_of(model)


@register_adapter
class HFSiglip2Adapter(HFAdapter):
    family = "hf-siglip2-vision"
    transformers_module = "transformers.models.siglip2.modeling_siglip2"
    backbone_classes = ("Siglip2VisionModel", "Siglip2VisionTransformer")
    layer_class = "Siglip2EncoderLayer"
    attention_attr = "self_attn"
    norm_attr = "layer_norm1"
    default_mean, default_std, default_interpolation = HALF, HALF, "bilinear"

    @classmethod
    def _backbone_of(cls, model: nn.Module) -> nn.Module | None:
        full = loaded_class(cls.transformers_module, "Siglip2Model")
        if full is not None and isinstance(model, full):
            model = model.vision_model
        return super()._backbone_of(model)

    def preprocessing(self):
        from qkdissect.adapters.base import Preprocessing

        side = int(round(self.config.num_patches ** 0.5)) * int(self.config.patch_size)
        proc = self.processor_config or {}
        return Preprocessing(image_size=(side, side), mean=tuple(float(v) for v in proc.get("image_mean", HALF)),
                             std=tuple(float(v) for v in proc.get("image_std", HALF)),
                             interpolation="bilinear", crop_pct=1.0,
                             source="preprocessor_config.json" if proc else "SigLIP2 defaults (square, num_patches)")

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch = int(self.config.patch_size)
        return image_size[0] // patch, image_size[1] // patch

    def forward(self, inputs: Any) -> Any:
        batch, channels, height, width = inputs.shape
        patch = int(self.config.patch_size)
        rows, cols = height // patch, width // patch
        if rows * cols > int(self.config.num_patches):
            raise QKDissectError(f"a {height}×{width} image has {rows * cols} patches, more than this SigLIP2 "
                                 f"model's {self.config.num_patches}.")
        patches = inputs[:, :, :rows * patch, :cols * patch].reshape(batch, channels, rows, patch, cols, patch)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, patch * patch * channels)
        mask = torch.ones(batch, rows * cols, dtype=torch.long, device=inputs.device)
        shapes = torch.tensor([[rows, cols]] * batch, dtype=torch.long, device=inputs.device)
        return self._call(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)


@register_adapter
class HFViTMAEAdapter(HFAdapter):
    family = "hf-vit-mae"
    transformers_module = "transformers.models.vit_mae.modeling_vit_mae"
    backbone_classes = ("ViTMAEModel",)
    layer_class = "ViTMAELayer"
    attention_attr = "attention"
    norm_attr = "layernorm_before"

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",)

    def forward(self, inputs: Any) -> Any:
        rows, cols = self.patch_grid(tuple(inputs.shape[-2:]))
        noise = torch.arange(rows * cols, dtype=torch.float32, device=inputs.device).expand(inputs.shape[0], -1)
        saved = self.config.mask_ratio
        self.config.mask_ratio = 0.0  # every patch, in image order (MAE's random masking is for pre-training)
        try:
            return self._call(pixel_values=inputs, noise=noise)
        finally:
            self.config.mask_ratio = saved


@register_adapter
class HFDinov3Adapter(HFAdapter):
    family = "hf-dinov3"
    transformers_module = "transformers.models.dinov3_vit.modeling_dinov3_vit"
    backbone_classes = ("DINOv3ViTModel", "DINOv3ViTBackbone")
    layer_class = "DINOv3ViTLayer"
    attention_attr = "attention"
    norm_attr = "norm1"
    default_crop_pct = 1.0

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",) + ("register",) * int(self.config.num_register_tokens)

    def rotary_table(self) -> RotaryTable:
        pixels = self.dummy_pixels()
        with torch.no_grad():
            cos_full, sin_full = self.backbone.rope_embeddings(pixels)
        grid = self.patch_grid(tuple(pixels.shape[-2:]))
        n_prefix = len(self.prefix_tokens)
        cos = pairs_from_full(cos_full.double()[None], "half", "cosine")  # rotate_half: pairs (f, f + P)
        sin = pairs_from_full(sin_full.double()[None], "half", "sine")
        P = cos.shape[-1]
        cos = torch.cat([torch.ones(1, n_prefix, P, dtype=cos.dtype), cos], dim=1)
        sin = torch.cat([torch.zeros(1, n_prefix, P, dtype=sin.dtype), sin], dim=1)
        return RotaryTable(cos=cos, sin=sin, layout="half", rotary_dim=2 * P, positions=grid_positions(n_prefix, grid),
                           info={"module": type(self.backbone.rope_embeddings).__name__, "grid": list(grid),
                                 "rope_theta": float(self.config.rope_theta),
                                 "coordinates": "patch centres normalised to [-1, 1] over the grid: offsets depend "
                                                "on the grid size"})

    def attention_form(self, layer: int) -> AttentionForm:
        if not hasattr(self, "_table"):
            self._table = self.rotary_table()
        return AttentionForm(rotary=self._table)


class _RelativeBiasMixin:
    """BEiT-style bias modules: ``relative_position_bias_table`` (R, H) and an index generated for
    the patch grid (+1 row/column for CLS)."""

    def _bias_of(self, modules: list[nn.Module], window: tuple[int, int], n_tokens: int, info: dict) -> RelativeBias:
        """Table + index when the modules apply their tables as they are; otherwise (HF resamples the
        table when the grid is not square) the dense bias exactly as the modules produce it."""
        index = modules[0].generate_relative_position_index(window)
        T = index.shape[0]
        with torch.no_grad():
            applied = sum(m(window, interpolate_pos_encoding=False, dim_size=n_tokens)[0].detach().double()
                          for m in modules)  # (H, T, T)
        table = sum(m.relative_position_bias_table.detach().double() for m in modules)
        info = {**info, "window": list(window)}
        if all(torch.equal(m.generate_relative_position_index(window), index) for m in modules) and torch.allclose(
                table[index.reshape(-1)].reshape(T, T, -1).permute(2, 0, 1), applied, atol=1e-12):
            return RelativeBias(table=table, index=index.clone(), info=info)
        info["dense"] = "the modules resample their tables at this grid; the bias as applied is recorded per pair"
        return RelativeBias(table=applied.permute(1, 2, 0).reshape(T * T, -1).contiguous(),
                            index=torch.arange(T * T).reshape(T, T), info=info)


@register_adapter
class HFBeitAdapter(_RelativeBiasMixin, HFAdapter):
    family = "hf-beit"
    transformers_module = "transformers.models.beit.modeling_beit"
    backbone_classes = ("BeitModel",)
    layer_class = "BeitLayer"
    attention_attr = "attention"
    norm_attr = "layernorm_before"
    default_mean, default_std = HALF, HALF

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",)

    def attention_form(self, layer: int) -> AttentionForm:
        modules = [m for m in (self.layers[layer].relative_position_bias, self.backbone.shared_position_bias)
                   if m is not None]
        if not modules:
            return AttentionForm()
        window = self.patch_grid(self.preprocessing().image_size)
        names = (["layer"] if self.layers[layer].relative_position_bias is not None else []) + (
            ["shared"] if self.backbone.shared_position_bias is not None else [])
        return AttentionForm(bias=self._bias_of(modules, window, 1 + window[0] * window[1], {"tables": names}))


@register_adapter
class HFData2VecVisionAdapter(HFBeitAdapter):
    """Data2Vec-Vision: BEiT's architecture under other class names; its bias modules sit elsewhere."""

    family = "hf-data2vec-vision"
    transformers_module = "transformers.models.data2vec.modeling_data2vec_vision"
    backbone_classes = ("Data2VecVisionModel",)
    layer_class = "Data2VecVisionLayer"

    def attention_form(self, layer: int) -> AttentionForm:
        owner = self._qk[layer][0]
        shared = getattr(self.backbone.encoder, "relative_position_bias", None)
        modules = [m for m in (getattr(owner, "relative_position_bias", None), shared) if m is not None]
        if not modules:
            return AttentionForm()
        window = self.patch_grid(self.preprocessing().image_size)
        return AttentionForm(bias=self._bias_of(modules, window, 1 + window[0] * window[1], {}))
