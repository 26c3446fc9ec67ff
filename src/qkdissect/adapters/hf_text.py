"""Hugging Face causal text decoders: GPT-2 (learned absolute positions, fused Conv1D ``c_attn``),
Llama, Qwen2 (RoPE, grouped-query heads, q/k biases) and Qwen3 (RoPE + per-head RMSNorm on q and
k before the rotation).

GPT-2's ``c_attn`` is a Conv1D whose weight is stored transposed (d_model × 3·d_model): q = x̃ W[:, :d]
+ b[:d], so W_q = W[:, :d]ᵀ. Its scale includes 1/(layer+1) when ``scale_attn_by_inverse_layer_idx``.
The RoPE decoders' rotation is read from the backbone's own ``rotary_emb`` for positions
0..L−1 (L = ``text_context``, default 256; any scaling such as YaRN's stays folded into cos/sin),
half-split pairs ("rotate_half"); inputs may be shorter than L. Causal masks (and Qwen's sliding
windows, where configured) are part of the form; x̃ is the input norm's output (RMSNorm: γ only).
"""

from __future__ import annotations

import torch
from torch import nn

from qkdissect.adapters.base import ModelAdapter
from qkdissect.adapters.hf import HFTextAdapter
from qkdissect.adapters.registry import register_adapter
from qkdissect.adapters.timm_common import norm_module
from qkdissect.adapters.timm_eva import pairs_from_full
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm, RotaryTable

__all__ = ["HFGPT2Adapter", "HFLlamaAdapter", "HFQwen2Adapter", "HFQwen3Adapter"]


class _HFDecoder(HFTextAdapter):
    norm_attr = "input_layernorm"
    attention_attr = "self_attn"
    text_context = 256
    forward_options = {"use_cache": False}

    def _sliding(self, index: int) -> int | None:
        types = getattr(self.config, "layer_types", None)
        if types and types[index] == "sliding_attention":
            return int(self.config.sliding_window)
        return None


@register_adapter
class HFGPT2Adapter(_HFDecoder):
    family = "hf-gpt2"
    transformers_module = "transformers.models.gpt2.modeling_gpt2"
    backbone_classes = ("GPT2Model",)
    layer_class = "GPT2Block"
    attention_attr = "attn"
    norm_attr = "ln_1"

    def __init__(self, model: nn.Module):  # c_attn is no Linear: skip the q/k lookup of the base class
        ModelAdapter.__init__(self, model)
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        self.backbone = self._backbone_of(model)
        self.layers = [m for m in self.backbone.modules() if isinstance(m, GPT2Block)]
        self.config = self.backbone.config
        if any(getattr(layer, "crossattention", None) is not None for layer in self.layers):
            raise QKDissectError("this GPT-2 has cross-attention layers; qkdissect reads self-attention decoders.")
        self._qk = [(layer.attn, layer.attn.c_attn, None) for layer in self.layers]

    def qk_linears(self, layer: int):
        return None

    def projections(self, index: int):
        attn = self.layers[index].attn
        d_model = attn.embed_dim
        n_heads, d_head = attn.num_heads, attn.head_dim
        weight = attn.c_attn.weight.detach()  # (d_model, 3·d_model): Conv1D stores Wᵀ
        bias = attn.c_attn.bias.detach()
        W_q = weight[:, :d_model].T.reshape(n_heads, d_head, d_model).clone()
        W_k = weight[:, d_model:2 * d_model].T.reshape(n_heads, d_head, d_model).clone()
        scale = getattr(attn, "scaling", None)
        if scale is None:  # older transformers: the same rule, spelled out
            scale = (d_head ** -0.5 if attn.scale_attn_weights else 1.0) / (
                float(attn.layer_idx + 1) if attn.scale_attn_by_inverse_layer_idx else 1.0)
        return (W_q, W_k, bias[:d_model].reshape(n_heads, d_head).clone(),
                bias[d_model:2 * d_model].reshape(n_heads, d_head).clone(), float(scale))

    def attention_form(self, layer: int) -> AttentionForm:
        return AttentionForm(causal=True)


class _HFRopeDecoder(_HFDecoder):
    """Llama-style decoders: q_proj/k_proj Linears, rotary_emb on the backbone, GQA."""

    def rotary_table(self) -> RotaryTable:
        if hasattr(self, "_table"):
            return self._table
        rotary = getattr(self.backbone, "rotary_emb", None)
        if rotary is None:
            raise QKDissectError(f"this {self.family} model has no rotary_emb module; qkdissect cannot read its rotation.")
        L = min(int(self.text_context), int(getattr(self.config, "max_position_embeddings", self.text_context)))
        parameter = next(self.backbone.parameters())
        with torch.no_grad():
            probe = torch.zeros(1, L, 1, dtype=parameter.dtype, device=parameter.device)
            cos_full, sin_full = rotary(probe, torch.arange(L, device=parameter.device)[None])
        d_head = self.projections(0)[0].shape[1]
        cos = pairs_from_full(cos_full[0].double()[None], "half", "cosine")
        sin = pairs_from_full(sin_full[0].double()[None], "half", "sine")
        if 2 * cos.shape[-1] > d_head:
            raise QKDissectError("the rotary table is wider than the heads.")
        self._table = RotaryTable(
            cos=cos, sin=sin, layout="half", rotary_dim=2 * cos.shape[-1],
            positions=torch.arange(L, dtype=torch.float64)[:, None], pairs="causal", variable_length=True,
            info={"module": type(rotary).__name__, "rope_type": str(getattr(rotary, "rope_type", "default")),
                  "attention_scaling": float(getattr(rotary, "attention_scaling", 1.0)), "context": L,
                  "coordinates": "token index (position_ids 0..N−1)"})
        return self._table

    def _qk_norm(self, index: int):
        owner = self._qk[index][0]
        q_norm, k_norm = getattr(owner, "q_norm", None), getattr(owner, "k_norm", None)
        if q_norm is None and k_norm is None:
            return None
        return norm_module(q_norm, k_norm)

    def attention_form(self, layer: int) -> AttentionForm:
        return AttentionForm(rotary=self.rotary_table(), qk_norm=self._qk_norm(layer), causal=True,
                             sliding_window=self._sliding(layer))


@register_adapter
class HFLlamaAdapter(_HFRopeDecoder):
    family = "hf-llama"
    transformers_module = "transformers.models.llama.modeling_llama"
    backbone_classes = ("LlamaModel",)
    layer_class = "LlamaDecoderLayer"


@register_adapter
class HFQwen2Adapter(_HFRopeDecoder):
    family = "hf-qwen2"
    transformers_module = "transformers.models.qwen2.modeling_qwen2"
    backbone_classes = ("Qwen2Model",)
    layer_class = "Qwen2DecoderLayer"


@register_adapter
class HFQwen3Adapter(_HFRopeDecoder):
    family = "hf-qwen3"
    transformers_module = "transformers.models.qwen3.modeling_qwen3"
    backbone_classes = ("Qwen3Model",)
    layer_class = "Qwen3DecoderLayer"

