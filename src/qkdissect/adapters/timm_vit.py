"""timm ``VisionTransformer`` (vit_*, deit_* incl. distilled, DINO/DINOv2-style, register tokens).

Parameter layout: ``blocks[i].attn.qkv`` is one fused Linear (3·n_heads·d_head × d_model);
output row ``s·A + h·d_head + i`` (s = 0 query, 1 key, 2 value; A = n_heads·d_head) is
coordinate i of head h — the order timm's own ``reshape(B, N, 3, H, d_head)`` uses.
x̃ = ``blocks[i].norm1(x)`` is the input of ``blocks[i].attn``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import Tensor, nn

from qkdissect.adapters.base import AttentionLayer, ModelAdapter, Preprocessing, loaded_class
from qkdissect.adapters.registry import register_adapter
from qkdissect.errors import QKDissectError


def _vit_class() -> type | None:
    return loaded_class("timm.models.vision_transformer", "VisionTransformer")


@register_adapter
class TimmViTAdapter(ModelAdapter):
    family = "timm-vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        vit = _vit_class()
        return vit is not None and isinstance(model, vit)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, ResPostBlock

        self._post_norm = False
        for index, block in enumerate(model.blocks):
            if type(block) not in (Block, ResPostBlock):
                raise QKDissectError(
                    f"block {index} of this timm model is a {type(block).__name__}; qkdissect reads "
                    "timm Block / ResPostBlock (separate attention and MLP). Parallel or fused "
                    "blocks are not supported."
                )
            if not isinstance(block.attn, Attention):
                raise QKDissectError(
                    f"block {index} uses attention module {type(block.attn).__name__}; qkdissect "
                    "reads timm's standard Attention with a fused qkv Linear."
                )
            if not isinstance(block.attn.q_norm, nn.Identity) or not isinstance(block.attn.k_norm, nn.Identity):
                raise QKDissectError(
                    f"block {index} applies QK-norm (a normalisation of q and k per token), so its "
                    "logits are not a bilinear form x̃_iᵀ M x̃_j; qkdissect refuses rather than "
                    "produce wrong modes. Use a model without qk_norm."
                )
            self._post_norm = self._post_norm or isinstance(block, ResPostBlock)

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def qk_linears(self, layer: int) -> tuple[str, nn.Module, None]:
        return "fused", self.model.blocks[layer].attn.qkv, None

    def _ln_feeding(self, index: int) -> tuple[Tensor | None, Tensor | None]:
        if self._post_norm:  # x̃ is the block input: no LayerNorm directly in front of attention
            return None, None
        norm = self.model.blocks[index].norm1
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        return (
            None if weight is None else weight.detach().clone(),
            None if bias is None else bias.detach().clone(),
        )

    def attention_layers(self) -> list[AttentionLayer]:
        layers = []
        for index, attn in enumerate(self.attention_modules()):
            n_heads, d_head = attn.num_heads, attn.head_dim
            width = n_heads * d_head
            weight = attn.qkv.weight.detach()
            d_model = weight.shape[1]
            W_q = weight[:width].reshape(n_heads, d_head, d_model).clone()
            W_k = weight[width : 2 * width].reshape(n_heads, d_head, d_model).clone()
            bias = attn.qkv.bias
            b_q = b_k = None
            if bias is not None:
                bias = bias.detach()
                b_q = bias[:width].reshape(n_heads, d_head).clone()
                b_k = bias[width : 2 * width].reshape(n_heads, d_head).clone()
            ln_weight, ln_bias = self._ln_feeding(index)
            layers.append(
                AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=float(attn.scale),
                               ln_weight=ln_weight, ln_bias=ln_bias)
            )
        return layers

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        model = self.model
        kinds: list[str] = []
        if getattr(model, "cls_token", None) is not None:
            kinds.append("cls")
        if getattr(model, "dist_token", None) is not None:
            kinds.append("dist")
        kinds += ["register"] * int(getattr(model, "num_reg_tokens", 0) or 0)
        if len(kinds) != int(model.num_prefix_tokens):
            raise QKDissectError(
                f"this timm model reports {model.num_prefix_tokens} prefix tokens but qkdissect "
                f"found {kinds}; the model layout is not one qkdissect knows."
            )
        return tuple(kinds)

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch_h, patch_w = self.model.patch_embed.patch_size
        height, width = image_size
        if getattr(self.model.patch_embed, "dynamic_img_pad", False):
            return -(-height // patch_h), -(-width // patch_w)
        return height // patch_h, width // patch_w

    def preprocessing(self) -> Preprocessing:
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(self.model)
        _, height, width = config["input_size"]
        img_size = getattr(self.model.patch_embed, "img_size", None)
        if img_size is not None:  # the size the model was built for wins over its pretrained config
            height, width = img_size
        return Preprocessing(
            image_size=(int(height), int(width)),
            mean=tuple(float(v) for v in config["mean"]),
            std=tuple(float(v) for v in config["std"]),
            interpolation=str(config.get("interpolation", "bicubic")),
            crop_pct=float(config.get("crop_pct", 1.0) or 1.0),
            source="timm data config",
        )

    def forward(self, inputs: Any) -> Any:
        return self.model.forward_features(inputs)

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[list[list[Tensor]]]:
        modules = self.attention_modules()
        saved = [module.fused_attn for module in modules]
        store: list[list[Tensor]] = []
        handles = []

        def make_hook():
            def hook(_module, _inputs, output):
                if not store or len(store[-1]) == len(modules):
                    store.append([])
                store[-1].append(output.detach())

            return hook

        try:
            for module in modules:
                module.fused_attn = False
                handles.append(module.attn_drop.register_forward_hook(make_hook()))
            yield store
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in zip(modules, saved):
                module.fused_attn = flag


def refuse_rotary(model: nn.Module) -> None:
    """Raise when a timm model applies rotary position embeddings inside attention."""
    eva = loaded_class("timm.models.eva", "Eva")
    if eva is not None and isinstance(model, eva) and getattr(model, "rope", None) is not None:
        raise QKDissectError(
            "this timm Eva model applies rotary position embeddings (RoPE) to q and k, so a "
            "query-key logit depends on the relative position and is not one bilinear form "
            "x̃_iᵀ M x̃_j; qkdissect refuses rather than produce wrong modes. Use a model with "
            "absolute position embeddings."
        )

