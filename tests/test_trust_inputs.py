"""The bad-input suite of issue 14: every numbered case and every rule, through the command line.

Each refusal: exit code 2, exactly one ``error:`` line, no traceback, and every file that existed in the watched
folder before is unchanged (sha256 before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import D_HEAD, IMAGE_HW, make_hf, make_timm_vit, save_timm_folder
from typer.testing import CliRunner

from qkdissect.cli import app

runner = CliRunner()


def tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def refused(args, watch: Path, words: str | None = None) -> str:
    """Run the CLI, expect one error line (containing ``words``) and every file below ``watch`` unchanged (a command
    may have written new files, e.g. maps lists an unreadable image after writing the good ones)."""
    before = tree_hash(watch)
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    assert result.exit_code == 2, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert sum(line.startswith("error:") for line in output.splitlines()) == 1, output
    if words:
        assert words in " ".join(output.split()), output
    after = tree_hash(watch)
    assert {name: after.get(name) for name in before} == before, "pre-existing files changed"
    return output


def ok(args) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory, natural_image_folder):
    from qkdissect.synthetic.oddoneout import generate_oddoneout

    root = tmp_path_factory.mktemp("inputs")
    model = save_timm_folder(make_timm_vit(seed=2), root / "model")
    ok(["dissect", model, "--out", root / "atlas", "--null-samples", 40])
    generate_oddoneout(root / "o3", 4, IMAGE_HW, seed=1, objects=3, radius=5.0)
    image = sorted(natural_image_folder.iterdir())[0]
    return {"root": root, "model": model, "atlas": root / "atlas", "o3": root / "o3", "image": image}


def command_args(name: str, world, out) -> list:
    """A correct invocation of each command that writes ``--out``."""
    m, a, i, d = world["model"], world["atlas"], world["image"], world["o3"]
    return {"dissect": ["dissect", m], "compare": ["compare", a, a],
            "report": ["report", a], "maps": ["maps", m, i, "--layer", 0, "--head", 1, "--atlas", a],
            "rank": ["rank", m, i, "--layer", 0, "--atlas", a], "oddoneout": ["oddoneout", "--n", 2],
            "preference": ["preference", m, "--data", d, "--atlas", a], "demo": ["demo", "--quick"],
            "mine": ["mine", m, "--images", i.parent, "--atlas", a]}[name] + ["--out", out]


COMMANDS = ("dissect", "compare", "report", "maps", "rank", "oddoneout", "preference", "demo", "mine")


# ----- ownership (cases 1, 2; --out that is a file or not writable) ------------------------------------------------
def test_case1_report_does_not_wipe_a_folder_holding_a_report_json(world, tmp_path):
    (tmp_path / "r" / "thesis").mkdir(parents=True)
    (tmp_path / "r" / "report.json").write_text('{"title": "x"}')
    (tmp_path / "r" / "thesis" / "ch1.tex").write_text("t")
    refused(["report", world["atlas"], "--out", tmp_path / "r"], tmp_path, "not a previous qkdissect report")


def test_case2_overwrite_never_deletes_outside_out(world, tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    out = tmp_path / "a" / "b"
    ok(["oddoneout", "--out", out, "--n", 2, "--size", 32])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["images"].append({**manifest["images"][0], "name": "../../victim"})
    manifest["files"].append("../../victim.png")
    (out / "manifest.json").write_text(json.dumps(manifest))
    refused(["oddoneout", "--out", out, "--n", 2, "--size", 32, "--overwrite"], tmp_path, "not a plain relative path")
    del manifest["files"]  # a manifest without the list of files (older qkdissect): nothing is deleted either
    (out / "manifest.json").write_text(json.dumps(manifest))
    refused(["oddoneout", "--out", out, "--n", 2, "--size", 32, "--overwrite"], tmp_path, "without the list of its files")


@pytest.mark.parametrize("name", COMMANDS)
def test_out_that_is_a_file_is_one_error(world, tmp_path, name):
    (tmp_path / "taken").write_text("mine")
    refused(command_args(name, world, tmp_path / "taken"), tmp_path, "is a file")


@pytest.mark.parametrize("name", COMMANDS)
def test_out_that_cannot_be_written_is_one_error(world, tmp_path, name):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            refused(command_args(name, world, locked / "out"), tmp_path, "writ")
        finally:
            locked.chmod(0o755)
    refused(command_args(name, world, "/sys/qkdissect-test-out"), tmp_path)  # read-only even for root


def test_a_foreign_non_empty_out_is_refused_by_every_writer(world, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for name in ("dissect", "compare", "report", "maps", "rank", "oddoneout", "preference", "demo"):
        refused(command_args(name, world, tmp_path), tmp_path, "no qkdissect manifest")


# ----- only real weights (cases 3, 6, 7, 10) ----------------------------------------------------------------------
def test_case3_checkpoint_without_query_weights_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf("bert", seed=1).save_pretrained(tmp_path / "bert")
    state = load_file(str(tmp_path / "bert" / "model.safetensors"))
    del state["encoder.layer.1.attention.self.query.weight"]
    save_file(state, str(tmp_path / "bert" / "model.safetensors"), metadata={"format": "pt"})
    refused(["dissect", tmp_path / "bert", "--out", tmp_path / "atlas"], tmp_path,
            "encoder.layer.1.attention.self.query.weight")
    model = make_timm_vit(seed=2)
    state = {k: v for k, v in model.state_dict().items() if k != "blocks.2.attn.qkv.weight"}
    folder = save_timm_folder(model, tmp_path / "timm", state=state)
    refused(["dissect", folder, "--out", tmp_path / "atlas"], tmp_path, "blocks.2.attn.qkv.weight")


@pytest.mark.parametrize("where,value,words", [
    ("qkv.weight", float("nan"), "layer 1, head 2: the query weight W_q holds NaN or Inf"),
    ("qkv.weight.key", float("inf"), "layer 1, head 2: the key weight W_k holds NaN or Inf"),
    ("norm1.weight", float("nan"), "layer 1, all heads: the LayerNorm weight γ"),
    ("norm1.bias", float("-inf"), "layer 1, all heads: the LayerNorm bias β"),
    ("mlp.fc1.weight", float("nan"), "parameter blocks.1.mlp.fc1.weight holds NaN"),
])
def test_case6_7_non_finite_weights_name_layer_and_head(tmp_path, natural_image_folder, where, value, words):
    model = make_timm_vit(seed=2)
    block = model.blocks[1]
    with torch.no_grad():
        if where.startswith("qkv"):
            offset = 24 if where.endswith("key") else 0  # rows of W_k follow the d_model rows of W_q
            block.attn.qkv.weight[offset + 2 * D_HEAD + 1, 3] = value
        else:
            module, name = where.rsplit(".", 1)
            getattr(block.get_submodule(module), name)[5] = value
    folder = save_timm_folder(model, tmp_path / "model")
    image = sorted(natural_image_folder.iterdir())[0]
    for args in (["dissect", folder], ["dissect", folder, "--fold-ln"],
                 ["maps", folder, image, "--layer", 0, "--head", 0]):
        refused([*args, "--out", tmp_path / "out"], tmp_path, words)


def test_case10_load_model_takes_a_module():
    import qkdissect

    module = make_timm_vit(seed=5)
    loaded = qkdissect.load_model(module)
    assert loaded.model is module and loaded.family
    assert torch.equal(qkdissect.dissect(loaded, null_samples=20).singular_values,
                       qkdissect.dissect(module, null_samples=20).singular_values)
    module.blocks[0].attn.qkv.weight.data[0, 0] = float("nan")
    with pytest.raises(qkdissect.QKDissectError, match="layer 0, head 0"):
        qkdissect.load_model(module)


# ----- validated inputs (case 6) ----------------------------------------------------------------------------------
def copy_atlas(world, folder: Path) -> Path:
    import shutil

    shutil.copytree(world["atlas"], folder)
    return folder


@pytest.mark.parametrize("change,words", [
    (lambda doc: doc.pop("n_layers"), "field n_layers: Field required"),
    (lambda doc: doc.update(n_layers=None), "field n_layers: Input should be a valid integer"),
    (lambda doc: doc.update(n_layers="abc"), "field n_layers: Input should be a valid integer"),
    (lambda doc: doc.update(n_layers=7), "lacks the tensor 'layers.3.U'"),
    (lambda doc: doc["null"].update(weighted_band="wide"), "field null.weighted_band"),
    (lambda doc: doc.update(scale=-1), "field scale"),
])
def test_case6_corrupt_atlas_json_is_one_error_naming_the_field(world, tmp_path, change, words):
    atlas = copy_atlas(world, tmp_path / "atlas")
    document = json.loads((atlas / "atlas.json").read_text())
    change(document)
    (atlas / "atlas.json").write_text(json.dumps(document))
    for args in (["report", atlas, "--out", tmp_path / "r"], ["compare", atlas, world["atlas"], "--out", tmp_path / "c"],
                 ["maps", world["model"], world["image"], "--layer", 0, "--head", 0, "--atlas", atlas, "--out",
                  tmp_path / "m"]):
        refused(args, tmp_path, words)


def test_case6_atlas_tensor_of_the_wrong_shape_is_one_error(world, tmp_path):
    from safetensors.torch import load_file, save_file

    atlas = copy_atlas(world, tmp_path / "atlas")
    tensors = load_file(str(atlas / "atlas.safetensors"))
    tensors["layers.1.U"] = tensors["layers.1.U"][:, :, :3].contiguous()
    save_file(tensors, str(atlas / "atlas.safetensors"))
    refused(["report", atlas, "--out", tmp_path / "r"], tmp_path, "tensor 'layers.1.U' has shape (4, 24, 3)")
    tensors["layers.1.U"] = torch.full((4, 24, 6), float("nan"))
    save_file(tensors, str(atlas / "atlas.safetensors"))
    refused(["report", atlas, "--out", tmp_path / "r"], tmp_path, "'layers.1.U' holds NaN")


# ----- pixels (cases 4, 6) ---------------------------------------------------------------------------------------
def bomb(path: Path) -> Path:
    from test_trust_images import png_header_only

    path.write_bytes(png_header_only(30000, 30000))
    return path


def test_case6_decompression_bomb_in_maps_and_rank_is_one_error(world, tmp_path):
    image = bomb(tmp_path / "bomb.png")
    for name in ("maps", "rank"):
        args = command_args(name, world, tmp_path / name)
        args[2] = image
        refused(args, tmp_path, "decompression bomb")


def test_case4_16_bit_images_reach_the_model_as_a_gradient(world, tmp_path):
    import numpy as np
    from PIL import Image

    gradient = np.tile(np.linspace(0, 65535, IMAGE_HW[1] * 4).round().astype(np.uint16), (IMAGE_HW[0] * 4, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    ok(["maps", world["model"], tmp_path / "g16.png", "--layer", 0, "--head", 1, "--atlas", world["atlas"],
        "--out", tmp_path / "maps"])
    crop = np.asarray(Image.open(next((tmp_path / "maps").glob("*/crop.png"))))
    assert len(np.unique(crop)) > 50  # not binarised


# ----- generator arguments (case 6) -------------------------------------------------------------------------------
@pytest.mark.parametrize("args,words", [(["--radius", 1000], "--radius 1000 px does not fit"),
                                        (["--radius", -3], "--radius -3 px does not fit"),
                                        (["--noise", -1], "--noise must be")])
def test_case6_oddoneout_arguments(tmp_path, args, words):
    (tmp_path / "keep.txt").write_text("k")
    refused(["oddoneout", "--out", tmp_path / "o", "--n", 2, *args], tmp_path, words)
    assert not (tmp_path / "o").exists()


# ----- resumable (case 9) -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_case9_demo_runs_twice_on_the_same_out(tmp_path):
    args = ["demo", "--quick", "--out", tmp_path / "demo", "--images", 8, "--odd-images", 4]
    ok(args)
    first = tree_hash(tmp_path / "demo")
    (tmp_path / "demo" / "notes.md").write_text("my notes")
    ok(args)
    again = tree_hash(tmp_path / "demo")
    assert again["notes.md"] == hashlib.sha256(b"my notes").hexdigest()
    assert set(first) == set(again) - {"notes.md"}
    assert not list((tmp_path / "demo").rglob(".qkdissect-tmp"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    refused(["demo", "--quick", "--out", tmp_path / "other"], tmp_path / "other", "no qkdissect manifest")


def test_unexpected_tensors_of_the_models_own_kind_are_refused(tmp_path):
    """A checkpoint with a 4th layer for a 3-layer config: its extra attention tensors are not silently dropped."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    deeper = make_hf("bert", seed=1)
    config = deeper.config.to_dict()
    deeper_state = tf.BertModel(tf.BertConfig(**{**config, "num_hidden_layers": 4})).state_dict()
    deeper.save_pretrained(tmp_path / "bert")
    state = load_file(str(tmp_path / "bert" / "model.safetensors"))
    state.update({k: v.contiguous() for k, v in deeper_state.items() if k.startswith("encoder.layer.3.")})
    save_file(state, str(tmp_path / "bert" / "model.safetensors"), metadata={"format": "pt"})
    refused(["dissect", tmp_path / "bert", "--out", tmp_path / "atlas"], tmp_path,
            "encoder.layer.3.attention.self.key.bias")
