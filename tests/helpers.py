"""Tiny random models of every supported family and input batches, with distinct dimension sizes
(d_model 24, d_head 6, 4 heads, 3 layers; images 40×56 px with 8-px patches → a 5×7 grid), so a
transposed or mis-reshaped tensor fails loudly. Import with ``from helpers import ...``."""

from __future__ import annotations

import torch

D_MODEL, N_HEADS, D_HEAD, N_LAYERS = 24, 4, 6, 3
IMAGE_HW = (40, 56)
PATCH = 8


def _scramble(model: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Random weights large enough that attention is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model.eval()


def make_timm_vit(seed: int = 0, **overrides):
    import timm

    kwargs = dict(img_size=IMAGE_HW, patch_size=PATCH, embed_dim=D_MODEL, depth=N_LAYERS, num_heads=N_HEADS,
                  num_classes=5, qkv_bias=True, reg_tokens=2, mlp_ratio=1.5)
    kwargs.update(overrides)
    return _scramble(timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs), seed)


def make_hf(family: str, seed: int = 0):
    import transformers as tf

    vision = dict(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                  intermediate_size=37, image_size=IMAGE_HW[0], patch_size=PATCH)
    if family == "vit":
        model = tf.ViTModel(tf.ViTConfig(**vision, qkv_bias=True))
    elif family == "deit":
        model = tf.DeiTModel(tf.DeiTConfig(**vision))
    elif family == "dinov2":
        model = tf.Dinov2Model(tf.Dinov2Config(**{k: v for k, v in vision.items() if k != "intermediate_size"},
                                               mlp_ratio=2))
    elif family == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**vision))
    elif family == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                                           num_attention_heads=N_HEADS, intermediate_size=37, vocab_size=61))
    else:
        raise ValueError(family)
    return _scramble(model, seed)


def image_batch(batch: int = 2, seed: int = 0, hw: tuple[int, int] = IMAGE_HW) -> torch.Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(seed))


def text_batch(batch: int = 2, tokens: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[-1, tokens - 3:] = 0  # padding in the last sequence
    return {"input_ids": torch.randint(0, 61, (batch, tokens), generator=generator), "attention_mask": mask}


TIMM_ARGS = dict(img_size=[IMAGE_HW[0], IMAGE_HW[1]], patch_size=PATCH, embed_dim=D_MODEL, depth=N_LAYERS,
                 num_heads=N_HEADS, qkv_bias=True, reg_tokens=2, mlp_ratio=1.5)


def save_timm_folder(model: torch.nn.Module, folder, state: dict | None = None):
    """Save a make_timm_vit() model as a timm folder (config.json + model.safetensors) that `load_model` reads;
    ``state`` replaces the state dict written (to test broken checkpoints)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in (state if state is not None else model.state_dict()).items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 5,
                                                    "model_args": TIMM_ARGS}))
    return folder
