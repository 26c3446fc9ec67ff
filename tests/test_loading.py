"""Model specs, folders, checkpoints, and the refusals — every bad input is one QKDissectError."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_hf, make_timm_vit

from qkdissect import QKDissectError, dissect, load_model
from qkdissect.adapters import get_adapter, load_state_dict, wrap_model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A state dict of timm's vit_tiny_patch16_224 (the real architecture) saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


def test_timm_spec_with_checkpoint_loads_those_weights(tiny_checkpoint):
    path, reference = tiny_checkpoint
    loaded = load_model("timm:vit_tiny_patch16_224", checkpoint=path)
    assert loaded.family == "timm-vit" and loaded.checkpoint == str(path)
    assert torch.equal(loaded.model.blocks[3].attn.qkv.weight, reference.blocks[3].attn.qkv.weight)
    assert loaded.preprocessing.image_size == (224, 224) and loaded.adapter.prefix_tokens == ("cls",)
    assert not loaded.model.training


def test_torch_pickle_checkpoint_with_wrapper_key(tmp_path, tiny_checkpoint):
    _, reference = tiny_checkpoint
    path = tmp_path / "model.pth"
    torch.save({"model": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    loaded = load_model("timm:vit_tiny_patch16_224", checkpoint=path)
    assert torch.equal(loaded.model.pos_embed, reference.pos_embed)


def test_shape_mismatched_checkpoint_names_the_tensors(tiny_checkpoint):
    path, _ = tiny_checkpoint
    with pytest.raises(QKDissectError, match=r"does not fit this architecture.*pos_embed"):
        load_model("timm:vit_tiny_patch16_384", checkpoint=path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_corrupt_checkpoint(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01not a checkpoint at all" * 10)
    with pytest.raises(QKDissectError, match="corrupt"):
        load_model("timm:vit_tiny_patch16_224", checkpoint=path)


def test_missing_checkpoint_and_unknown_specs(tmp_path):
    with pytest.raises(QKDissectError, match="not found"):
        load_model("timm:vit_tiny_patch16_224", checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(QKDissectError, match="timm has no model"):
        load_model("timm:vit_enormous_patch3")
    with pytest.raises(QKDissectError, match="prefix 'foo'"):
        load_model("foo:bar")
    with pytest.raises(QKDissectError, match="unknown model"):
        load_model("definitely_not_a_model_or_folder")
    with pytest.raises(QKDissectError, match="unknown built-in"):
        load_model("builtin:nonexistent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QKDissectError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(QKDissectError, match="needs an architecture"):
        load_model(str(weights))


def test_offline_pretrained_download_fails_with_advice():
    with pytest.raises(QKDissectError, match="--checkpoint"):
        load_model("timm:vit_tiny_patch16_224")


def test_hf_folder_with_preprocessor_config(tmp_path):
    model = make_hf("vit", seed=2)
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "do_center_crop": False, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6],
        "resample": 2, "size": {"height": 40, "width": 40}}))
    loaded = load_model(str(tmp_path))
    assert loaded.family == "hf-vit"
    assert loaded.preprocessing.mean == (0.1, 0.2, 0.3) and loaded.preprocessing.interpolation == "bilinear"
    for name, param in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], param)
    assert load_model(f"hf:{tmp_path}").family == "hf-vit"
    assert load_model(str(tmp_path), random_init=True).family == "hf-vit"


def test_full_clip_folder_loads_the_vision_tower(tmp_path):
    import transformers as tf

    config = tf.CLIPConfig(vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=37, image_size=40, patch_size=8),
                           text_config=dict(hidden_size=20, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=11))
    tf.CLIPModel(config).save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.family == "hf-clip-vision" and loaded.adapter.n_layers == 2
    # a full CLIPModel passed as a module: only the vision tower's 2 layers, never the text tower's
    assert wrap_model(tf.CLIPModel(config)).adapter.n_layers == 2


def test_timm_folder_format(tmp_path):
    from safetensors.torch import save_file

    model = make_timm_vit(seed=4)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 5,
        "model_args": {"img_size": [40, 56], "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 4,
                       "qkv_bias": True, "reg_tokens": 2, "mlp_ratio": 1.5}}))
    loaded = load_model(str(tmp_path))
    assert torch.equal(loaded.model.blocks[2].attn.qkv.weight, model.blocks[2].attn.qkv.weight)
    assert loaded.preprocessing.image_size == (40, 56)
    assert loaded.adapter.patch_grid((40, 56)) == (5, 7)


def test_unsupported_models_are_refused_with_reasons():
    import timm

    with pytest.raises(QKDissectError, match="no qkdissect adapter.*Supported families"):
        get_adapter(torch.nn.Linear(3, 4))
    # QK-norm and RoPE models were refused before issue 13; they are attention forms qkdissect now rebuilds
    qk_norm = wrap_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True, depth=1,
                                           embed_dim=24, num_heads=4))
    assert qk_norm.family == "timm-vit" and qk_norm.adapter.attention_layers()[0].form.qk_norm.kind == "layer"
    from timm.models.eva import Eva

    rope = wrap_model(Eva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, use_rot_pos_emb=True))
    assert rope.family == "timm-eva" and rope.adapter.attention_layers()[0].form.rotary is not None
    # what stays out is refused with its reason
    with pytest.raises(QKDissectError, match="Parallel or fused"):
        wrap_model(timm.create_model("vit_small_patch16_18x2_224", pretrained=False, depth=1, embed_dim=24,
                                     num_heads=4))
    with pytest.raises(QKDissectError, match="no qkdissect adapter"):
        wrap_model(timm.create_model("swinv2_cr_tiny_224", pretrained=False, img_size=64, window_size=4,
                                     embed_dim=24, depths=(1,), num_heads=(3,)))
    with pytest.raises(QKDissectError, match="expected a torch nn.Module"):
        dissect("not a model")


def test_load_state_dict_reports_missing_and_unexpected(tmp_path):
    from safetensors.torch import save_file

    model = make_timm_vit()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "cls_token"}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(QKDissectError, match=r"1 missing keys \(e.g. cls_token\).*1 unexpected keys"):
        load_state_dict(model, tmp_path / "partial.safetensors")


def test_prefix_tokens_of_families(hf_model):
    expected = {"hf-vit": ("cls",), "hf-deit": ("cls", "dist"), "hf-dinov2": ("cls",),
                "hf-clip-vision": ("cls",), "hf-bert": ()}
    assert hf_model.adapter.prefix_tokens == expected[hf_model.family]
    if hf_model.adapter.modality == "image":
        captured = __import__("qkdissect.projection", fromlist=["x"]).capture_attention_inputs(
            hf_model, torch.zeros(1, 3, 40, 40), layers=[0])
        grid = hf_model.adapter.patch_grid((40, 40))
        assert captured[0].shape[1] == len(hf_model.adapter.prefix_tokens) + grid[0] * grid[1]


def test_dinov2_with_registers_and_distilled_timm():
    import timm
    import transformers as tf

    config = tf.Dinov2WithRegistersConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                                          image_size=40, patch_size=8, num_register_tokens=3, mlp_ratio=2)
    loaded = wrap_model(tf.Dinov2WithRegistersModel(config).eval())
    assert loaded.adapter.prefix_tokens == ("cls", "register", "register", "register")
    distilled = wrap_model(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2))
    assert distilled.adapter.prefix_tokens == ("cls", "dist")
