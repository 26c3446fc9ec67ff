"""The common form every model family is converted to, and the adapter protocol.

An adapter knows where a family keeps its attention parameters and how to run it; the
maths (``qkdissect.decomposition``) only ever sees :class:`AttentionLayer` objects:

    q_i = W_q x̃_i + b_q,   k_j = W_k x̃_j + b_k,   logit_ij = scale · q_i·k_j

with x̃ the input of the attention block (for pre-LN models the output of the block's first
LayerNorm, affine included; for post-LN text encoders the block input).
"""

from __future__ import annotations

import contextlib
import sys
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Iterator, Sequence

import torch
from torch import Tensor, nn

from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm

__all__ = ["AttentionLayer", "ModelAdapter", "Preprocessing", "loaded_class", "first_instance"]


@dataclass(frozen=True)
class AttentionLayer:
    """Query/key parameters of one attention layer, split per head.

    Shapes: ``W_q`` (n_heads, d_head, d_model); ``W_k`` (n_kv_heads, d_head, d_model);
    ``b_q`` (n_heads, d_head) or None; ``b_k`` (n_kv_heads, d_head) or None;
    ``ln_weight``/``ln_bias`` (d_model,) — the affine (γ, β) of the LayerNorm whose output is
    the attention input x̃, or None when there is none. ``kv_head_of[h]`` is the key head that
    query head h reads (multi-query / grouped-query attention); identity when None. ``form``: what
    the layer does besides the bilinear form (rotary embeddings, QK-norm, relative bias, windows,
    masks; see :class:`qkdissect.forms.AttentionForm`), None for a plain layer.
    """

    W_q: Tensor
    W_k: Tensor
    b_q: Tensor | None
    b_k: Tensor | None
    scale: float
    ln_weight: Tensor | None = None
    ln_bias: Tensor | None = None
    kv_head_of: tuple[int, ...] | None = None
    form: AttentionForm | None = None

    @property
    def n_heads(self) -> int:
        return self.W_q.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_q.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_q.shape[2]

    def expanded(self) -> "AttentionLayer":
        """The same layer with the key parameters repeated per query head (no GQA left)."""
        if self.kv_head_of is None:
            return self
        index = torch.tensor(self.kv_head_of, dtype=torch.long)
        return AttentionLayer(
            W_q=self.W_q,
            W_k=self.W_k[index],
            b_q=self.b_q,
            b_k=None if self.b_k is None else self.b_k[index],
            scale=self.scale,
            ln_weight=self.ln_weight,
            ln_bias=self.ln_bias,
            form=self.form,
        )


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for the model (from the model's own config).

    ``image_size`` is (height, width) of the model input; the image is resized so that its
    shorter side is ``round(min(image_size) / crop_pct)``, centre-cropped to ``image_size``,
    scaled to [0, 1] and normalised with ``mean``/``std`` per channel.
    """

    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    source: str = "default"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        return cls(
            image_size=tuple(int(v) for v in data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bicubic")),
            crop_pct=float(data.get("crop_pct", 1.0)),
            source=str(data.get("source", "default")),
        )

    def resize_and_crop(self, image):  # PIL.Image -> PIL.Image
        """Resize (shorter side to image_size/crop_pct) and centre-crop; returns an RGB PIL image."""
        from PIL import Image

        methods = {
            "bicubic": Image.Resampling.BICUBIC,
            "bilinear": Image.Resampling.BILINEAR,
            "nearest": Image.Resampling.NEAREST,
            "lanczos": Image.Resampling.LANCZOS,
            "box": Image.Resampling.BOX,
            "hamming": Image.Resampling.HAMMING,
        }
        image = image.convert("RGB")
        height, width = self.image_size
        scale_to = max(height, width) / self.crop_pct
        w0, h0 = image.size
        ratio = scale_to / min(w0, h0)
        new_w, new_h = max(width, round(w0 * ratio)), max(height, round(h0 * ratio))
        image = image.resize((new_w, new_h), methods.get(self.interpolation, Image.Resampling.BICUBIC))
        left, top = (new_w - width) // 2, (new_h - height) // 2
        return image.crop((left, top, left + width, top + height))

    def __call__(self, image) -> Tensor:
        """PIL image -> normalised tensor (3, height, width), float32."""
        import numpy as np

        array = np.asarray(self.resize_and_crop(image), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (tensor - mean) / std


def loaded_class(module_name: str, class_name: str) -> type | None:
    """The class ``module_name.class_name`` if that module is already imported, else None.

    A model can only be an instance of a class whose module is loaded, so adapters match by
    type without importing heavy libraries (transformers) that the model does not come from.
    """
    module = sys.modules.get(module_name)
    return getattr(module, class_name, None) if module is not None else None


def first_instance(model: nn.Module, classes: Sequence[type]) -> nn.Module | None:
    """The first sub-module (in ``model.modules()`` order, ``model`` itself first) of one of ``classes``."""
    classes = tuple(c for c in classes if c is not None)
    if not classes:
        return None
    for module in model.modules():
        if isinstance(module, classes):
            return module
    return None


class ModelAdapter(ABC):
    """Converts one model family to qkdissect's common form.

    Subclasses register with :func:`qkdissect.adapters.register_adapter` and are found by
    :meth:`matches` (module types, never parameter-name matching).
    """

    family: ClassVar[str] = "unknown"
    modality: ClassVar[str] = "image"  # "image" or "text"

    def __init__(self, model: nn.Module):
        self.model = model

    # ----- discovery -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter handles ``model`` (decided by module types)."""

    # ----- parameters --------------------------------------------------------------------
    @abstractmethod
    def attention_layers(self) -> list[AttentionLayer]:
        """One :class:`AttentionLayer` per layer, in depth order (detached copies)."""

    def attention_form(self, layer: int) -> AttentionForm:
        """How ``layer`` turns q and k into logits besides the bilinear form — rotary tables, QK-norm,
        relative bias, windows, masks, read from the model for its own input size. Families override
        this to describe their form, and raise QKDissectError (naming the reason) for variants
        qkdissect cannot rebuild exactly. The default is a plain layer."""
        return AttentionForm()

    @abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """Per layer, the module whose first input (positional or ``hidden_states=``) is x̃."""

    @property
    def n_layers(self) -> int:
        return len(self.attention_modules())

    def qk_linears(self, layer: int) -> tuple[str, nn.Module, nn.Module | None] | None:
        """The Linear modules that compute q and k in ``layer``: ("fused", qkv, None) when one Linear
        outputs q, k, v (rows in that order, heads contiguous), ("split", q, k) for two Linears, or
        None when the family does not expose them (then consumers fall back to projecting x̃)."""
        return None

    # ----- tokens and inputs --------------------------------------------------------------
    @property
    def prefix_tokens(self) -> tuple[str, ...]:
        """Kinds of the non-patch tokens that come first in the sequence, in order."""
        return ()

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch-grid (rows, cols) for an input image of ``image_size`` = (height, width)."""
        raise QKDissectError(f"{self.family} models have no patch grid (they read text, not images).")

    def preprocessing(self) -> Preprocessing | None:
        """Image preprocessing from the model's own config (None for text models)."""
        return None

    @abstractmethod
    def forward(self, inputs: Any) -> Any:
        """Run the model on ``inputs`` (pixel tensor (B, 3, H, W), or a dict of text tensors)."""

    # ----- the model's own attention --------------------------------------------------------
    @abstractmethod
    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[list[list[Tensor]]]:
        """Context in which the model computes attention explicitly; yields a list that the
        forward passes made inside fill with one tensor (B, n_heads, N, N) per layer —
        the model's own attention probabilities."""

    def attention_probabilities(self, inputs: Any) -> list[Tensor]:
        """The model's own attention probabilities per layer, each (B, n_heads, N, N)."""
        with torch.no_grad(), self.eager_attention() as store:
            self.forward(inputs)
        if not store or len(store[0]) != self.n_layers:
            raise QKDissectError(
                f"could not read the attention probabilities of this {self.family} model "
                f"(got {len(store[0]) if store else 0} of {self.n_layers} layers)."
            )
        return store[0]

    def describe(self, layers: Sequence[AttentionLayer] | None = None) -> dict[str, Any]:
        """Shapes and token layout, for the atlas metadata (``layers``: this adapter's
        :meth:`attention_layers`, when the caller has them already)."""
        layers = self.attention_layers() if layers is None else layers
        first = layers[0]
        out = {
            "family": self.family,
            "modality": self.modality,
            "n_layers": len(layers),
            "n_heads": first.n_heads,
            "n_kv_heads": first.W_k.shape[0],
            "d_model": first.d_model,
            "d_head": first.d_head,
            "scale": first.scale,
            "prefix_tokens": list(self.prefix_tokens),
            "n_prefix_tokens": len(self.prefix_tokens),
        }
        if len({(layer.n_heads, layer.d_model) for layer in layers}) > 1:  # e.g. Swin's stages
            out["heads_per_layer"] = [layer.n_heads for layer in layers]
            out["d_model_per_layer"] = [layer.d_model for layer in layers]
        return out

