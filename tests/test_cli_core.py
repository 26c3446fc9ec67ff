"""`qkdissect dissect` / `compare` end to end on saved tiny models; errors exit non-zero without a traceback."""

from __future__ import annotations

import json

import pytest
from helpers import make_hf
from typer.testing import CliRunner

from qkdissect.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for family in ("vit", "bert"):
        make_hf(family, seed=1).save_pretrained(root / family)
    return root


def test_dissect_writes_atlas_and_figures(model_folders, tmp_path):
    out = tmp_path / "atlas"
    result = runner.invoke(app, ["dissect", str(model_folders / "vit"), "--out", str(out), "--dtype", "float64",
                                 "--null-samples", "100"])
    assert result.exit_code == 0, result.output
    assert "mean C" in result.output and "heads > null" in result.output
    for name in ("atlas.safetensors", "atlas.json", "layer_similarity.png", "mode_cosines.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "atlas.json").read_text())
    assert doc["family"] == "hf-vit" and doc["dtype"] == "float64" and doc["null"]["n_samples"] == 100


def test_compare_two_models(model_folders, tmp_path):
    for family in ("vit", "bert"):
        assert runner.invoke(app, ["dissect", str(model_folders / family), "--out", str(tmp_path / family),
                                   "--null-samples", "50"]).exit_code == 0
    result = runner.invoke(app, ["compare", str(tmp_path / "vit"), str(tmp_path / "bert"), "--out",
                                 str(tmp_path / "cmp"), "--labels", "vision,text"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.png").is_file()
    doc = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [m["label"] for m in doc["models"]] == ["vision", "text"]


@pytest.mark.parametrize("args, message", [
    (["dissect", "timm:no_such_model_xyz"], "timm has no model"),
    (["dissect", "timm:vit_tiny_patch16_224", "--checkpoint", "/nonexistent/w.safetensors"], "not found"),
    (["dissect", "weird:spec"], "prefix 'weird'"),
    (["compare", "/nonexistent_a", "/nonexistent_b"], "not an atlas folder"),
])
def test_errors_exit_nonzero_with_message_and_no_traceback(args, message):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_dissect_bad_dtype(model_folders, tmp_path):
    result = runner.invoke(app, ["dissect", str(model_folders / "vit"), "--dtype", "float16", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "dtype must be one of" in result.output


def test_help_explains():
    result = runner.invoke(app, ["dissect", "--help"])
    assert result.exit_code == 0 and "--fold-ln" in result.output and "timm:NAME" in result.output
