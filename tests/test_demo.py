"""`qkdissect demo --quick` end to end on the embedded model (offline), and its refusal of text models."""

from __future__ import annotations

import json
import time

from typer.testing import CliRunner

from qkdissect.cli import app

runner = CliRunner()


def test_demo_quick_end_to_end(tmp_path):
    started = time.perf_counter()
    result = runner.invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--images", "32", "--odd-images", "16"])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 120
    atlas = json.loads((tmp_path / "atlas" / "atlas.json").read_text())
    assert atlas["model"] == "builtin:oddvit" and atlas["n_layers"] == 6
    assert len(list((tmp_path / "world").glob("*.png"))) == 32
    assert (tmp_path / "mined" / "mined.safetensors").is_file()
    assert any((tmp_path / "mined" / "sheets").rglob("*.png"))
    assert any((tmp_path / "maps").rglob("mode_0.png"))
    assert (tmp_path / "preference" / "preference.json").is_file()
    report = tmp_path / "report" / "index.html"
    assert report.is_file() and "builtin:oddvit" in report.read_text()
    assert "Look at" in result.output


def test_demo_refuses_a_text_model(tmp_path):
    from helpers import make_hf

    make_hf("bert").save_pretrained(tmp_path / "bert")
    result = runner.invoke(app, ["demo", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "needs an image model" in result.output
