"""`qkdissect dissect` on models with today's attention forms: rotary models write the distance figure
and, with --offset, the modes at that offset; ragged Swin atlases dissect, plot, compare and round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from form_models import perturb
from typer.testing import CliRunner

from qkdissect.atlas import ModeAtlas
from qkdissect.cli import app

runner = CliRunner()
ARGS = {"img_size": [40, 56], "patch_size": 8, "embed_dim": 40, "depth": 2, "num_heads": 5, "num_classes": 0}


def _timm_folder(root, architecture: str, args: dict):
    import timm
    from safetensors.torch import save_file

    model = perturb(timm.create_model(architecture, pretrained=False, **args), 0).float()
    root.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 0, "model_args": args}))
    return root


@pytest.fixture(scope="module")
def rope_folder(tmp_path_factory):
    return _timm_folder(tmp_path_factory.mktemp("m") / "rope", "vit_small_patch16_rope_224", ARGS)


def test_dissect_rope_model_with_offsets(rope_folder, tmp_path):
    out = tmp_path / "atlas"
    result = runner.invoke(app, ["dissect", str(rope_folder), "--out", str(out), "--dtype", "float64",
                                 "--null-samples", "50", "--offset", "1,0", "--offset", "0,-2"])
    assert result.exit_code == 0, result.output
    for name in ("atlas.json", "distance_similarity.png", "offsets.json", "offsets.safetensors"):
        assert (out / name).is_file(), name
    document = json.loads((out / "offsets.json").read_text())
    assert [entry["offset"] for entry in document["offsets"]] == [[1.0, 0.0], [0.0, -2.0]]
    first = document["offsets"][0]["layers"][0]
    assert first["pairs"] == 4 * 7 and len(first["heads"]) == 5  # 5×7 grid: 4 row pairs per column
    atlas = ModeAtlas.load(out)
    from qkdissect.positional import offset_modes

    at = offset_modes(atlas, 1, (0.0, -2.0))
    from safetensors.torch import load_file

    stored = load_file(str(out / "offsets.safetensors"))
    torch.testing.assert_close(stored["offset1.layers.1.S"], at.S)
    heads = json.loads((out / "atlas.json").read_text())["heads"]
    positional = heads[0]["positional"]
    assert {"offset_average", "distance_curve", "content_share", "position_share"} <= set(positional)
    assert positional["distance_curve"]["distance"][0] == 0.0


@pytest.mark.parametrize("offset, message", [("9,9", "no pair of tokens"), ("a,b", "numbers separated"),
                                             ("1", "needs 2 numbers")])
def test_bad_offsets_exit_with_one_error_and_write_nothing(rope_folder, tmp_path, offset, message):
    out = tmp_path / "atlas"
    result = runner.invoke(app, ["dissect", str(rope_folder), "--out", str(out), "--null-samples", "20",
                                 "--offset", offset])
    assert result.exit_code == 2 and message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output and not (out / "atlas.json").exists()


def test_offset_on_a_model_without_rotation_is_refused(tmp_path):
    folder = _timm_folder(tmp_path / "plain", "vit_tiny_patch16_224", {**ARGS})
    result = runner.invoke(app, ["dissect", str(folder), "--out", str(tmp_path / "a"), "--null-samples", "20",
                                 "--offset", "0,1"])
    assert result.exit_code == 2 and "rotary" in result.output


def test_swin_atlas_has_a_width_per_layer(tmp_path):
    folder = _timm_folder(tmp_path / "swin", "swin_tiny_patch4_window7_224",
                          {"img_size": [32, 48], "patch_size": 4, "window_size": 4, "embed_dim": 24, "depths": [1, 2],
                           "num_heads": [3, 6], "num_classes": 0})
    out = tmp_path / "atlas"
    result = runner.invoke(app, ["dissect", str(folder), "--out", str(out), "--null-samples", "50"])
    assert result.exit_code == 0, result.output
    atlas = ModeAtlas.load(out)
    assert atlas.d_models == (24, 48, 48) and [atlas.heads_in(i) for i in range(3)] == [3, 6, 6]
    assert atlas.layer_nulls is not None and atlas.layer_nulls[0].d_model == 24 and atlas.layer_nulls[1].d_model == 48
    assert torch.isnan(atlas.weighted_cosines[0, 3:]).all() and not torch.isnan(atlas.weighted_cosines[1]).any()
    document = json.loads((out / "atlas.json").read_text())
    assert len(document["heads"]) == 3 + 6 + 6
    assert document["d_model_per_layer"] == [24, 48, 48]
    assert all("bias_share" in h["positional"] for h in document["heads"])
    with pytest.raises(Exception, match="heads 0..2"):
        atlas.head(0, 4)
    result = runner.invoke(app, ["compare", str(out), str(out), "--out", str(tmp_path / "cmp"), "--labels", "a,b"])
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "cmp" / "compare.json").read_text())["models"][0]
    # n_layers × n_heads as for any model; heads a layer does not have are null, like heads of rank 0
    assert [sum(v is not None for v in row) for row in compared["weighted_cosines"]] == [3, 6, 6]


@pytest.mark.parametrize("path, value", [
    (("layer_forms", 1, "stored", "rotary", "layout"), "diagonal"),
    (("layer_forms", 1, "stored", "rotary", "rotary_dim"), 0),
    (("layer_forms", 0, "stored", "rotary"), KeyError),
    (("layer_forms", 0, "layer"), 1),
    (("layer_forms", 1, "scale"), -1.0),
    (("layer_forms",), [{"layer": 0, "kind": "plain", "scale": 0.3}]),
])
def test_corrupted_format2_atlas_fails_with_one_clear_error(rope_folder, tmp_path, path, value):
    from qkdissect.errors import QKDissectError

    out = tmp_path / "atlas"
    assert runner.invoke(app, ["dissect", str(rope_folder), "--out", str(out), "--null-samples", "20"]).exit_code == 0
    document = json.loads((out / "atlas.json").read_text())
    target = document
    for part in path[:-1]:
        target = target[part]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    (out / "atlas.json").write_text(json.dumps(document))
    with pytest.raises(QKDissectError) as error:
        ModeAtlas.load(out)
    assert str(out / "atlas.json") in str(error.value) or str(out / "atlas.safetensors") in str(error.value)
