"""Tiny random models of every attention form (issue 13), float64, every parameter moved away from its
initial value. Distinct sizes: d_model 40, 5 heads, d_head 8 (rotary pairs need d_head % 4 == 0),
2 layers; images 40×56 (a 5×7 grid of 8-px patches) where the family takes rectangles; Swin 32×48
with 4-px patches and 4×4 windows (its second stage is padded); texts of 9 tokens with padding.
Import with ``from form_models import FAMILIES, make``."""

from __future__ import annotations

import torch

D_MODEL, N_HEADS, D_HEAD, N_LAYERS = 40, 5, 8, 2
IMAGE_HW = (40, 56)


def perturb(model: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Every parameter to random values (no zero bias, unit gain or initial frequency survives); the
    gains of QK-norms are enlarged so that normalised heads still attend sharply. Frequency buffers
    that the model reads at every forward (inv_freq) are scaled too, so nothing can be assumed."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)
            if ("q_norm" in name or "k_norm" in name) and name.endswith("weight"):
                param.mul_(6.0)
            if name.endswith("logit_scale"):  # Swin-V2 temperature: log-scale around log(10)
                param.copy_(torch.log(torch.tensor(10.0)) + 0.3 * param)
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):
                buffer.mul_(1.0 + 0.3 * torch.rand(buffer.shape, generator=generator, dtype=buffer.dtype))
    return model.eval()


def _timm(kind: str):
    import timm
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    common = dict(img_size=IMAGE_HW, patch_size=8, embed_dim=D_MODEL, depth=N_LAYERS, num_heads=N_HEADS, num_classes=0)
    swin = dict(img_size=(32, 48), patch_size=4, window_size=4, embed_dim=24, depths=(1, 2), num_heads=(3, 6),
                num_classes=0)
    return {
        "timm-vit-qknorm": lambda: timm.create_model("vit_tiny_patch16_224", qk_norm=True, qkv_bias=True, reg_tokens=2,
                                                     **common),
        "timm-siglip": lambda: timm.create_model("vit_base_patch16_siglip_224", **common),
        "timm-naflex": lambda: timm.create_model("naflexvit_base_patch16_siglip", **common),
        "timm-eva02": lambda: Eva(use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True, qkv_bias=True,
                                  **common),
        "timm-rope-axial": lambda: Eva(use_rot_pos_emb=True, use_abs_pos_emb=False, attn_type="rope",
                                       rope_grid_indexing="xy", rope_temperature=100.0, qkv_bias=True, **common),
        "timm-rope-mixed-ape": lambda: Eva(use_rot_pos_emb=True, use_abs_pos_emb=True, attn_type="rope",
                                           rope_type="mixed", rope_grid_indexing="xy", rope_temperature=10.0, **common),
        "timm-dinov3": lambda: Eva(use_rot_pos_emb=True, use_abs_pos_emb=False, attn_type="rope", rope_type="dinov3",
                                   rope_rotate_half=True, rope_temperature=100, num_reg_tokens=2, qkv_bias=True,
                                   dynamic_img_size=True, **common),
        "timm-eva-gqa-qknorm": lambda: Eva(use_rot_pos_emb=True, attn_type="rope", qkv_fused=False, num_kv_heads=1,
                                           rope_rotate_half=True, qk_norm=True, **common),
        "timm-beit": lambda: Beit(use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=True,
                                  qkv_bias=True, **common),
        "timm-swin": lambda: SwinTransformer(**swin),
        "timm-swinv2": lambda: SwinTransformerV2(**swin),
    }[kind]()


def _hf(kind: str):
    import transformers as tf

    square = dict(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=37,
                  image_size=40, patch_size=8)
    rect = {**square, "image_size": list(IMAGE_HW)}
    swin = dict(image_size=(32, 48), patch_size=4, window_size=4, embed_dim=24, depths=[1, 2], num_heads=[3, 6])
    decoder = dict(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=37,
                   vocab_size=61, num_key_value_heads=1)
    eager = dict(attn_implementation="eager")
    return {
        "hf-siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**square)),
        "hf-siglip2": lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(
            hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, intermediate_size=37,
            patch_size=8, num_patches=25)),
        "hf-mae": lambda: tf.ViTMAEModel(tf.ViTMAEConfig(**square)),
        "hf-dinov3": lambda: tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**rect, num_register_tokens=2, query_bias=True)),
        "hf-beit": lambda: tf.BeitModel(tf.BeitConfig(**rect, use_relative_position_bias=True,
                                                      use_shared_relative_position_bias=True,
                                                      use_absolute_position_embeddings=False)),
        "hf-data2vec": lambda: tf.Data2VecVisionModel(tf.Data2VecVisionConfig(**rect, use_relative_position_bias=True,
                                                                              **eager)),
        "hf-swin": lambda: tf.SwinModel(tf.SwinConfig(**swin)),
        "hf-swinv2": lambda: tf.Swinv2Model(tf.Swinv2Config(**swin)),
        "hf-gpt2": lambda: tf.GPT2Model(tf.GPT2Config(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, vocab_size=61,
                                                      scale_attn_by_inverse_layer_idx=True, bos_token_id=0,
                                                      eos_token_id=0)),
        "hf-llama": lambda: tf.LlamaModel(tf.LlamaConfig(**decoder, bos_token_id=0, eos_token_id=0)),
        "hf-qwen2": lambda: tf.Qwen2Model(tf.Qwen2Config(**decoder)),
        "hf-qwen3": lambda: tf.Qwen3Model(tf.Qwen3Config(**decoder, head_dim=8)),
    }[kind]()


FAMILIES = ["timm-vit-qknorm", "timm-siglip", "timm-naflex", "timm-eva02", "timm-rope-axial", "timm-rope-mixed-ape",
            "timm-dinov3", "timm-eva-gqa-qknorm", "timm-beit", "timm-swin", "timm-swinv2",
            "hf-siglip", "hf-siglip2", "hf-mae", "hf-dinov3", "hf-beit", "hf-data2vec", "hf-swin", "hf-swinv2",
            "hf-gpt2", "hf-llama", "hf-qwen2", "hf-qwen3"]


def make(kind: str, seed: int = 0):
    """(LoadedModel float64, inputs, key_mask or None) for one family."""
    from qkdissect.adapters import wrap_model

    model = perturb(_timm(kind) if kind.startswith("timm") else _hf(kind), seed)
    loaded = wrap_model(model, spec=f"test:{kind}")
    generator = torch.Generator().manual_seed(seed + 1)
    if loaded.adapter.modality == "text":
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        inputs = {"input_ids": torch.randint(0, 61, (2, 9), generator=generator), "attention_mask": mask}
        return loaded, inputs, mask.bool()
    hw = loaded.preprocessing.image_size
    return loaded, torch.randn(2, 3, *hw, generator=generator, dtype=torch.float64), None
