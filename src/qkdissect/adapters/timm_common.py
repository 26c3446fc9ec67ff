"""What the timm families share: reading q/k projections (fused qkv, separate q/k, BEiT-style
q_bias with a zero k_bias buffer), QK-norm modules, preprocessing, and the eager attention path
(``fused_attn = False`` and a hook on ``attn_drop``, whose input is the softmax output)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from qkdissect.adapters.base import ModelAdapter, Preprocessing
from qkdissect.errors import QKDissectError
from qkdissect.forms import QKNorm

__all__ = ["TimmAdapter", "qk_norm_of", "split_qk"]


def split_qk(attn: nn.Module, n_heads: int, d_head: int, n_kv_heads: int | None = None
             ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """W_q (H, d_head, d_model), W_k (H_kv, d_head, d_model), b_q, b_k of a timm attention module.

    Fused ``qkv``: output row s·A + h·d_head + i (s = 0 query, 1 key; A = H·d_head) is coordinate i
    of head h (timm's ``reshape(B, N, 3, H, d_head)``); the bias is the Linear's own or, BEiT/EVA
    style, ``q_bias`` / ``k_bias`` parameters or buffers. Separate ``q_proj`` / ``k_proj`` Linears
    are split ``view(H, d_head, d_model)``.
    """
    n_kv = n_kv_heads or n_heads
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        width = n_heads * d_head
        weight = qkv.weight.detach()
        d_model = weight.shape[1]
        W_q = weight[:width].reshape(n_heads, d_head, d_model).clone()
        W_k = weight[width:2 * width].reshape(n_heads, d_head, d_model).clone()
        if qkv.bias is not None:
            bias = qkv.bias.detach()
            return W_q, W_k, bias[:width].reshape(n_heads, d_head).clone(), bias[width:2 * width].reshape(n_heads, d_head).clone()
        q_bias, k_bias = getattr(attn, "q_bias", None), getattr(attn, "k_bias", None)
        b_q = None if q_bias is None else q_bias.detach().reshape(n_heads, d_head).clone()
        b_k = None if k_bias is None else k_bias.detach().reshape(n_heads, d_head).clone()
        return W_q, W_k, b_q, b_k
    q_proj, k_proj = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
    if isinstance(q_proj, nn.Linear) and isinstance(k_proj, nn.Linear):
        d_model = q_proj.weight.shape[1]
        W_q = q_proj.weight.detach().reshape(n_heads, d_head, d_model).clone()
        W_k = k_proj.weight.detach().reshape(n_kv, d_head, d_model).clone()
        b_q = None if q_proj.bias is None else q_proj.bias.detach().reshape(n_heads, d_head).clone()
        b_k = None if k_proj.bias is None else k_proj.bias.detach().reshape(n_kv, d_head).clone()
        return W_q, W_k, b_q, b_k
    raise QKDissectError(f"{type(attn).__name__} has neither a fused qkv Linear nor q_proj/k_proj Linears; "
                         "qkdissect does not know this attention layout.")


def qk_norm_of(attn: nn.Module) -> QKNorm | None:
    """The QK-norm of a timm attention module (``q_norm`` / ``k_norm``), None when both are Identity."""
    q_norm, k_norm = getattr(attn, "q_norm", nn.Identity()), getattr(attn, "k_norm", nn.Identity())
    if isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity):
        return None
    if type(q_norm) is not type(k_norm):
        raise QKDissectError(f"{type(attn).__name__} normalises q with {type(q_norm).__name__} but k with "
                             f"{type(k_norm).__name__}; qkdissect needs the same kind on both sides.")
    return norm_module(q_norm, k_norm)


def norm_module(q_norm: nn.Module, k_norm: nn.Module) -> QKNorm:
    """QKNorm from two per-head norm modules (LayerNorm or RMSNorm types of torch, timm or transformers)."""
    name = type(q_norm).__name__.lower()
    if isinstance(q_norm, nn.LayerNorm) or name in ("layernorm", "layernorm2d"):
        kind = "layer"
    elif isinstance(q_norm, nn.RMSNorm) or "rmsnorm" in name:
        kind = "rms"
    else:
        raise QKDissectError(f"QK-norm module {type(q_norm).__name__} is neither a LayerNorm nor an RMSNorm; "
                             "qkdissect cannot rebuild its logits exactly.")
    eps = getattr(q_norm, "eps", None)
    if eps is None:
        eps = getattr(q_norm, "variance_epsilon", None)
    if eps is None:
        raise QKDissectError(f"could not read the eps of {type(q_norm).__name__}.")

    def param(module: nn.Module, name: str) -> Tensor | None:
        value = getattr(module, name, None)
        return None if value is None else value.detach().clone()

    return QKNorm(kind=kind, eps=float(eps), q_weight=param(q_norm, "weight"), q_bias=param(q_norm, "bias"),
                  k_weight=param(k_norm, "weight"), k_bias=param(k_norm, "bias"))


class TimmAdapter(ModelAdapter):
    """Common timm behaviour: preprocessing from the data config, the eager attention path."""

    def preprocessing(self) -> Preprocessing:
        from timm.data import resolve_model_data_config

        config = resolve_model_data_config(self.model)
        _, height, width = config["input_size"]
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
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

    def patch_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        patch_h, patch_w = self.model.patch_embed.patch_size
        height, width = image_size
        if getattr(self.model.patch_embed, "dynamic_img_pad", False):
            return -(-height // patch_h), -(-width // patch_w)
        return height // patch_h, width // patch_w

    def dummy_image(self) -> Tensor:
        """A zero image of the model's input size, in the dtype of its parameters."""
        height, width = self.preprocessing().image_size
        parameter = next(self.model.parameters())
        return torch.zeros(1, 3, height, width, dtype=parameter.dtype, device=parameter.device)

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[list[list[Tensor]]]:
        modules = self.attention_modules()
        saved = [getattr(module, "fused_attn", None) for module in modules]
        store: list[list[Tensor]] = []
        handles = []

        def hook(_module, _inputs, output):
            if not store or len(store[-1]) == len(modules):
                store.append([])
            store[-1].append(output.detach())

        try:
            for module in modules:
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
                handles.append(module.attn_drop.register_forward_hook(hook))
            yield store
        finally:
            for handle in handles:
                handle.remove()
            for module, flag in zip(modules, saved):
                if flag is not None:
                    module.fused_attn = flag
