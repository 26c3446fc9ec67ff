"""Saving and loading atlases: exact round trip, the JSON document, and corrupt folders."""

from __future__ import annotations

import json

import pytest
import torch

from qkdissect import ModeAtlas, QKDissectError, dissect


@pytest.fixture(scope="module")
def atlas(timm_vit):
    return dissect(timm_vit, fold_ln=True, null_samples=50)


def test_round_trip_is_exact(atlas, tmp_path):
    atlas.save(tmp_path)
    back = ModeAtlas.load(tmp_path)
    assert back.n_layers == atlas.n_layers and back.null == atlas.null and back.gap_tol == atlas.gap_tol
    for a, b in zip(atlas.layers, back.layers):
        for name in ("U", "S", "V", "key_bias", "ln_weight", "ln_bias"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert json.loads(json.dumps(back.meta)) == json.loads(json.dumps(atlas.meta))
    assert torch.equal(back.weighted_cosines, atlas.weighted_cosines)
    head = back.head(2, 3)
    assert head.U.shape == (24, 6) and head.key_bias.shape == (24,) and head.cosines.shape == (6,)


def test_json_document_has_the_promised_fields(atlas, tmp_path):
    atlas.save(tmp_path)
    doc = json.loads((tmp_path / "atlas.json").read_text())
    for key in ("format_version", "model", "family", "n_layers", "n_heads", "d_model", "d_head", "scale",
                "ln_folded", "prefix_tokens", "n_prefix_tokens", "preprocessing", "dtype", "versions", "null",
                "heads", "layers"):
        assert key in doc, key
    assert doc["ln_folded"] is True and doc["preprocessing"]["image_size"] == [40, 56]
    assert len(doc["heads"]) == 3 * 4
    first = doc["heads"][5]
    assert (first["layer"], first["head"]) == (1, 1)
    assert first["weighted_cosine"] == pytest.approx(float(atlas.weighted_cosines[1, 1]))
    assert len(first["cosines"]) == 6 and "null_threshold" in first
    assert doc["null"]["percentile"] == 99.0 and "Gaussian" in doc["null"]["description"]
    assert {"layer", "mean_weighted_cosine", "min_weighted_cosine", "max_weighted_cosine"} <= set(doc["layers"][0])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "atlas.safetensors"), "pt") as handle:
        assert handle.get_tensor("layers.0.U").shape == (4, 24, 6)
        assert handle.get_tensor("layers.0.S").shape == (4, 6)
        assert handle.get_tensor("layers.0.key_bias").shape == (4, 24)


def test_bad_atlas_folders(atlas, tmp_path):
    with pytest.raises(QKDissectError, match="not an atlas folder"):
        ModeAtlas.load(tmp_path)
    # each corruption in a fresh folder: `save` replaces only an intact atlas of its own (qkdissect.outputs)
    atlas.save(tmp_path / "a")
    (tmp_path / "a" / "atlas.json").write_text("{ not json")
    with pytest.raises(QKDissectError, match="corrupt"):
        ModeAtlas.load(tmp_path / "a")
    atlas.save(tmp_path / "b")
    data = (tmp_path / "b" / "atlas.safetensors").read_bytes()
    (tmp_path / "b" / "atlas.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QKDissectError, match="corrupt"):
        ModeAtlas.load(tmp_path / "b")
    atlas.save(tmp_path / "c")
    doc = json.loads((tmp_path / "c" / "atlas.json").read_text())
    doc["format_version"] = 99
    (tmp_path / "c" / "atlas.json").write_text(json.dumps(doc))
    with pytest.raises(QKDissectError, match="upgrade"):
        ModeAtlas.load(tmp_path / "c")
    with pytest.raises(QKDissectError, match="no head"):
        atlas.head(3, 0)
