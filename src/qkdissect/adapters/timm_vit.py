"""timm ``VisionTransformer`` (vit_*, deit_* incl. distilled, DINO/DINOv2-style, register tokens,
SigLIP ``vit_*_siglip_*``, ``qk_norm=True``) and ``NaFlexVit`` (naflexvit_*, plain blocks).

Parameter layout: ``blocks[i].attn.qkv`` is one fused Linear (3·n_heads·d_head × d_model);
output row ``s·A + h·d_head + i`` (s = 0 query, 1 key, 2 value; A = n_heads·d_head) is
coordinate i of head h — the order timm's own ``reshape(B, N, 3, H, d_head)`` uses.
x̃ = ``blocks[i].norm1(x)`` is the input of ``blocks[i].attn``. With ``qk_norm=True`` the
per-head ``q_norm`` / ``k_norm`` (LayerNorm or RmsNorm over d_head) become the layer's QK-norm form.
"""

from __future__ import annotations

from torch import Tensor, nn

from qkdissect.adapters.base import AttentionLayer, loaded_class
from qkdissect.adapters.registry import register_adapter
from qkdissect.adapters.timm_common import TimmAdapter, qk_norm_of, split_qk
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm


def _vit_classes() -> tuple[type, ...]:
    found = (loaded_class("timm.models.vision_transformer", "VisionTransformer"),
             loaded_class("timm.models.naflexvit", "NaFlexVit"))
    return tuple(c for c in found if c is not None)


@register_adapter
class TimmViTAdapter(TimmAdapter):
    family = "timm-vit"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        classes = _vit_classes()
        return bool(classes) and isinstance(model, classes)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        from timm.layers import Attention
        from timm.models.vision_transformer import Block, ResPostBlock

        self._post_norm = False
        self._naflex = type(model).__name__ == "NaFlexVit"
        for index, block in enumerate(model.blocks):
            if type(block) not in (Block, ResPostBlock):
                raise QKDissectError(
                    f"block {index} of this timm model is a {type(block).__name__}; qkdissect reads "
                    "timm Block / ResPostBlock (separate attention and MLP) here. Parallel or fused "
                    "blocks are not supported" + ("; NaFlexVit with RoPE blocks is not supported either."
                                                  if self._naflex else ".")
                )
            if type(block.attn) is not Attention:
                raise QKDissectError(
                    f"block {index} uses attention module {type(block.attn).__name__}; qkdissect "
                    "reads timm's standard Attention with a fused qkv Linear."
                )
            qk_norm_of(block.attn)  # refuses norms it cannot rebuild
            self._post_norm = self._post_norm or isinstance(block, ResPostBlock)

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.model.blocks]

    def qk_linears(self, layer: int) -> tuple[str, nn.Module, None] | None:
        if qk_norm_of(self.model.blocks[layer].attn) is not None:
            return None  # the maps of a QK-norm layer need the per-token norm: project x̃ instead
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

    def attention_form(self, layer: int) -> AttentionForm:
        norm = qk_norm_of(self.model.blocks[layer].attn)
        return AttentionForm() if norm is None else AttentionForm(qk_norm=norm)

    def attention_layers(self) -> list[AttentionLayer]:
        layers = []
        for index, attn in enumerate(self.attention_modules()):
            W_q, W_k, b_q, b_k = split_qk(attn, attn.num_heads, attn.head_dim)
            ln_weight, ln_bias = self._ln_feeding(index)
            form = self.attention_form(index)
            layers.append(AttentionLayer(W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=float(attn.scale),
                                         ln_weight=ln_weight, ln_bias=ln_bias,
                                         form=None if form.is_plain else form))
        return layers

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        model = self.model
        source = model.embeds if self._naflex else model
        kinds: list[str] = []
        if getattr(source, "cls_token", None) is not None:
            kinds.append("cls")
        if getattr(source, "dist_token", None) is not None:
            kinds.append("dist")
        n_reg = getattr(source, "num_reg_tokens", None)
        if n_reg is None:
            reg = getattr(source, "reg_token", None)
            n_reg = 0 if reg is None else reg.shape[1]
        kinds += ["register"] * int(n_reg or 0)
        if len(kinds) != int(model.num_prefix_tokens):
            raise QKDissectError(
                f"this timm model reports {model.num_prefix_tokens} prefix tokens but qkdissect "
                f"found {kinds}; the model layout is not one qkdissect knows."
            )
        return tuple(kinds)

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        if self._naflex:
            return tuple(int(v) for v in self.model.embeds.dynamic_feat_size(image_size))
        return super().patch_grid(image_size)

    def preprocessing(self):
        prep = super().preprocessing()
        if self._naflex and getattr(self.model.embeds, "default_img_size", None) is not None:
            from dataclasses import replace

            prep = replace(prep, image_size=tuple(int(v) for v in self.model.embeds.default_img_size))
        return prep
