"""Hugging Face transformers families: ViT, DeiT, DINOv2 (with registers), CLIP vision, BERT.

Each family is found by the type of its backbone (``ViTModel``, ``DeiTModel``, ...), its
layers by their type (``ViTLayer``, ...). Inside a layer the query/key projections are two
separate Linear layers whose attribute names changed across transformers versions
(``query``/``key`` up to v4, ``q_proj``/``k_proj`` from v5): they are looked up on the
attention module of the layer, never by searching all parameter names.

A Linear ``W`` of shape (n_heads·d_head, d_model) is split per head as
``W.view(n_heads, d_head, d_model)``, the order HF's ``view(..., -1, head_dim)`` uses.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator

from torch import Tensor, nn

from qkdissect.adapters.base import AttentionLayer, ModelAdapter, Preprocessing, first_instance, loaded_class
from qkdissect.adapters.registry import register_adapter
from qkdissect.errors import QKDissectError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_QK_NAMES = (("q_proj", "k_proj"), ("query", "key"))


def find_qk(attention: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear]:
    """The sub-module of ``attention`` (itself included) that owns the query and key Linears."""
    for module in attention.modules():
        for q_name, k_name in _QK_NAMES:
            q, k = getattr(module, q_name, None), getattr(module, k_name, None)
            if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
                return module, q, k
    raise QKDissectError(
        f"could not find the query/key projections inside {type(attention).__name__}; this "
        "transformers version lays the attention out in a way qkdissect does not know."
    )


def _heads_and_scale(module: nn.Module, config: Any, width: int) -> tuple[int, int, float]:
    n_heads = int(getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
                  or config.num_attention_heads)
    d_head = width // n_heads
    scale = getattr(module, "scaling", None)
    if scale is None:
        scale = getattr(module, "scale", None)
    return n_heads, d_head, float(scale if scale is not None else d_head ** -0.5)


class HFAdapter(ModelAdapter):
    """Common code; subclasses name their backbone and layer classes."""

    transformers_module: ClassVar[str]
    backbone_classes: ClassVar[tuple[str, ...]]
    layer_class: ClassVar[str]
    attention_attr: ClassVar[str]
    norm_attr: ClassVar[str | None]
    default_mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    default_std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    default_interpolation: ClassVar[str] = "bicubic"
    default_crop_pct: ClassVar[float] = 1.0

    processor_config: dict[str, Any] | None = None

    @classmethod
    def _classes(cls) -> list[type]:
        found = [loaded_class(cls.transformers_module, name) for name in cls.backbone_classes]
        return [c for c in found if c is not None]

    @classmethod
    def _backbone_of(cls, model: nn.Module) -> nn.Module | None:
        return first_instance(model, cls._classes())

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return cls._backbone_of(model) is not None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.backbone = self._backbone_of(model)
        layer_cls = loaded_class(self.transformers_module, self.layer_class)
        self.layers = [m for m in self.backbone.modules() if isinstance(m, layer_cls)]
        if not self.layers:
            raise QKDissectError(f"found no {self.layer_class} in this {self.family} model.")
        self._qk = [find_qk(getattr(layer, self.attention_attr)) for layer in self.layers]
        self.config = self.backbone.config

    def attention_modules(self) -> list[nn.Module]:
        return [owner for owner, _, _ in self._qk]

    def qk_linears(self, layer: int) -> tuple[str, nn.Module, nn.Module]:
        _, q, k = self._qk[layer]
        return "split", q, k

    def _ln_feeding(self, index: int) -> nn.Module | None:
        return getattr(self.layers[index], self.norm_attr) if self.norm_attr else None

    def projections(self, index: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, float]:
        """W_q (H, d_head, d_model), W_k (H_kv, d_head, d_model), b_q, b_k and the scale of layer ``index``.

        A Linear ``W`` of shape (H·d_head, d_model) is split ``view(H, d_head, d_model)``."""
        owner, q, k = self._qk[index]
        n_heads, d_head, scale = _heads_and_scale(owner, self.config, q.weight.shape[0])
        n_kv = k.weight.shape[0] // d_head
        d_model = q.weight.shape[1]
        return (q.weight.detach().reshape(n_heads, d_head, d_model).clone(),
                k.weight.detach().reshape(n_kv, d_head, d_model).clone(),
                None if q.bias is None else q.bias.detach().reshape(n_heads, d_head).clone(),
                None if k.bias is None else k.bias.detach().reshape(n_kv, d_head).clone(), scale)

    def attention_layers(self) -> list[AttentionLayer]:
        result = []
        for index in range(len(self.layers)):
            W_q, W_k, b_q, b_k, scale = self.projections(index)
            n_heads, n_kv = W_q.shape[0], W_k.shape[0]
            norm = self._ln_feeding(index)
            form = self.attention_form(index)
            result.append(
                AttentionLayer(
                    W_q=W_q, W_k=W_k, b_q=b_q, b_k=b_k, scale=scale,
                    ln_weight=None if norm is None or norm.weight is None else norm.weight.detach().clone(),
                    ln_bias=None if norm is None or getattr(norm, "bias", None) is None else norm.bias.detach().clone(),
                    kv_head_of=None if n_kv == n_heads else tuple(h * n_kv // n_heads for h in range(n_heads)),
                    form=None if form.is_plain else form,
                )
            )
        return result

    def dummy_pixels(self) -> Tensor:
        """A zero image of the model's input size in the dtype of its parameters."""
        import torch

        height, width = self.preprocessing().image_size
        parameter = next(self.backbone.parameters())
        return torch.zeros(1, 3, height, width, dtype=parameter.dtype, device=parameter.device)

    # ----- images ----------------------------------------------------------------------
    def _size(self, value: Any) -> tuple[int, int]:
        if isinstance(value, (list, tuple)):
            return int(value[0]), int(value[-1])
        return int(value), int(value)

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch_h, patch_w = self._size(self.config.patch_size)
        return image_size[0] // patch_h, image_size[1] // patch_w

    def preprocessing(self) -> Preprocessing:
        image_size = self._size(self.config.image_size)
        proc = self.processor_config
        if not proc:
            return Preprocessing(image_size, self.default_mean, self.default_std, self.default_interpolation,
                                 self.default_crop_pct, source=f"{self.family} defaults")
        crop = proc.get("crop_size") if proc.get("do_center_crop", False) else None
        size = proc.get("size", {})
        if isinstance(crop, dict) and "height" in crop:
            image_size = (int(crop["height"]), int(crop["width"]))
        elif isinstance(crop, int):
            image_size = (crop, crop)
        elif isinstance(size, dict) and "height" in size:
            image_size = (int(size["height"]), int(size["width"]))
        resize_to = size.get("shortest_edge") if isinstance(size, dict) else size
        crop_pct = min(image_size) / resize_to if crop and resize_to else 1.0
        return Preprocessing(
            image_size=image_size,
            mean=tuple(float(v) for v in proc.get("image_mean", self.default_mean)),
            std=tuple(float(v) for v in proc.get("image_std", self.default_std)),
            interpolation=_PIL_RESAMPLE.get(proc.get("resample"), self.default_interpolation),
            crop_pct=float(crop_pct),
            source="preprocessor_config.json",
        )

    # ----- running -------------------------------------------------------------------------
    _store: list | None = None

    def _call(self, **kwargs: Any) -> Any:
        if self._store is None:
            return self.backbone(**kwargs)
        kwargs["output_attentions"] = True
        probabilities: dict[int, Tensor] = {}

        def make_hook(index: int):
            def hook(_module, _inputs, output):
                if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], Tensor):
                    probabilities[index] = output[1].detach()
            return hook

        handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(self.attention_modules())]
        try:
            output = self.backbone(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if len(probabilities) == len(self.layers):  # read per attention module: every layer, windows included
            self._store.append([probabilities[i] for i in range(len(self.layers))])
        elif getattr(output, "attentions", None) is not None and all(a is not None for a in output.attentions):
            self._store.append([a.detach() for a in output.attentions])
        else:
            raise QKDissectError(f"this {self.family} model returned no attention probabilities (its attention class "
                                 "is fixed to SDPA/flash at construction); load it with attn_implementation=\"eager\".")
        return output

    def forward(self, inputs: Any) -> Any:
        return self._call(pixel_values=inputs)

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[list[list[Tensor]]]:
        configs = [self.config] + [m.config for m in self.backbone.modules() if hasattr(m, "config")]
        saved = [getattr(c, "_attn_implementation", None) for c in configs]
        self._store = []
        try:
            for config in configs:
                config._attn_implementation = "eager"
            yield self._store
        finally:
            for config, value in zip(configs, saved):
                config._attn_implementation = value
            self._store = None


@register_adapter
class HFViTAdapter(HFAdapter):
    family = "hf-vit"
    transformers_module = "transformers.models.vit.modeling_vit"
    backbone_classes = ("ViTModel",)
    layer_class = "ViTLayer"
    attention_attr = "attention"
    norm_attr = "layernorm_before"
    default_mean, default_std, default_interpolation = HALF, HALF, "bilinear"

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",)


@register_adapter
class HFDeiTAdapter(HFAdapter):
    family = "hf-deit"
    transformers_module = "transformers.models.deit.modeling_deit"
    backbone_classes = ("DeiTModel",)
    layer_class = "DeiTLayer"
    attention_attr = "attention"
    norm_attr = "layernorm_before"
    default_crop_pct = 224 / 256

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls", "dist")


@register_adapter
class HFDinov2Adapter(HFAdapter):
    family = "hf-dinov2"
    transformers_module = "transformers.models.dinov2.modeling_dinov2"
    backbone_classes = ("Dinov2Model",)
    layer_class = "Dinov2Layer"
    attention_attr = "attention"
    norm_attr = "norm1"
    default_crop_pct = 224 / 256

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",)


@register_adapter
class HFDinov2RegistersAdapter(HFDinov2Adapter):
    family = "hf-dinov2-registers"
    transformers_module = "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers"
    backbone_classes = ("Dinov2WithRegistersModel",)
    layer_class = "Dinov2WithRegistersLayer"

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",) + ("register",) * int(self.config.num_register_tokens)


@register_adapter
class HFCLIPVisionAdapter(HFAdapter):
    """CLIP's vision tower. The pre-LayerNorm before the blocks is part of the residual stream;
    x̃ is ``layer_norm1`` of each block. The attention scale is read from the module."""

    family = "hf-clip-vision"
    transformers_module = "transformers.models.clip.modeling_clip"
    backbone_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPVisionTransformer")
    layer_class = "CLIPEncoderLayer"
    attention_attr = "self_attn"
    norm_attr = "layer_norm1"
    default_mean, default_std = CLIP_MEAN, CLIP_STD

    @classmethod
    def _backbone_of(cls, model: nn.Module) -> nn.Module | None:
        clip_model = loaded_class(cls.transformers_module, "CLIPModel")
        if clip_model is not None and isinstance(model, clip_model):
            model = model.vision_model  # never the text tower's layers
        return super()._backbone_of(model)

    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        return ("cls",)


class HFTextAdapter(HFAdapter):
    """Shared by the transformers text models: no image grid or preprocessing; inputs are token tensors from
    the model's tokenizer. ``forward_options``: extra keyword arguments of the model's forward call."""

    modality = "text"
    tokenizer: Any = None
    forward_options: ClassVar[dict[str, Any]] = {}

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return ModelAdapter.patch_grid(self, image_size)

    def preprocessing(self) -> None:
        return None

    def forward(self, inputs: Any) -> Any:
        if not isinstance(inputs, dict):
            raise QKDissectError("a text model takes a dict of token tensors (input_ids, attention_mask, ...).")
        return self._call(**inputs, **self.forward_options)

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """Token tensors for ``texts`` with the model's tokenizer (needs one to have been loaded)."""
        if self.tokenizer is None:
            raise QKDissectError("this text model was loaded without a tokenizer; load it from a folder "
                                 "that has tokenizer files (or builtin:minilm).")
        return dict(self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True))


@register_adapter
class HFBertAdapter(HFTextAdapter):
    """BERT-style post-LN text encoders (BERT, MiniLM): x̃ is the block input, which the
    previous block's output LayerNorm (the embedding LayerNorm for layer 0) produced."""

    family = "hf-bert"
    transformers_module = "transformers.models.bert.modeling_bert"
    backbone_classes = ("BertModel",)
    layer_class = "BertLayer"
    attention_attr = "attention"
    norm_attr = None

    def _ln_feeding(self, index: int) -> nn.Module | None:
        if index == 0:
            return getattr(self.backbone.embeddings, "LayerNorm", None)
        return getattr(self.layers[index - 1].output, "LayerNorm", None)
