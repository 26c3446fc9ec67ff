"""``qkdissect dynamics metalearn --quick`` and ``icl --quick``: run, write the stated fields, refuse bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkdissect.commands.dynamics import app
from qkdissect.decomposition import ModeAtlas
from qkdissect.dynamics.runs.icl import load_icl
from qkdissect.dynamics.runs.metalearn import load_metalearn
from qkdissect.errors import QKDissectError

runner = CliRunner()


def _figures(out: Path, data: dict) -> None:
    for name in data["figures"]:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert {"torch", "numpy", "qkdissect"} <= set(data["versions"])


def test_metalearn_quick(tmp_path: Path) -> None:
    out = tmp_path / "meta"
    started = time.perf_counter()
    res = runner.invoke(app, ["metalearn", "--quick", "--strengths", "3,1.5,0.8,0.4", "--n-x", "5", "--n-y", "4",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert time.perf_counter() - started < 60
    assert "concurrency index" in res.stdout
    data = load_metalearn(out)
    _figures(out, data)
    assert (out / "lstm.safetensors").is_file()
    assert set(data["systems"]) == {"learner", "min_norm", "ridge", "bayes", "lstm"}
    for name, system in data["systems"].items():
        mean = np.asarray(system["mean"], dtype=float)
        assert mean.shape == (len(system["x"]), 4), name
        assert np.asarray(system["sem"], dtype=float).shape == mean.shape
        assert {"index", "half_points", "censored", "relative_index", "order_matches_strengths"} <= set(
            system["concurrency"])
        assert set(data["concurrency_summary"][name]) >= {"concurrency_index", "censored"}
    k = np.asarray(data["systems"]["min_norm"]["x"])
    assert data["systems"]["min_norm"]["closed_form"] == pytest.approx(np.minimum(k, 5) / 5)
    lstm = data["systems"]["lstm"]
    assert {"linearity_r2", "meta_training", "model"} <= set(lstm)
    assert lstm["model"]["hidden"] == data["parameters"]["hidden"]
    p = data["parameters"]
    assert p["n_x"] == 5 and p["n_y"] == 4 and p["strengths"] == [3, 1.5, 0.8, 0.4]
    assert set(p["derived_seeds"]) >= {"train_tasks", "test_tasks", "lstm_init"}
    assert data["load_average"]["start"] and data["timings_seconds"]["total"] > 0
    assert "findings" in data and "choices" in data


def test_icl_quick(tmp_path: Path) -> None:
    out = tmp_path / "icl"
    started = time.perf_counter()
    res = runner.invoke(app, ["icl", "--quick", "--n-x", "3", "--n-y", "2", "--strengths", "2,1", "--heads", "2",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert time.perf_counter() - started < 60
    data = load_icl(out)
    _figures(out, data)
    names = [v["name"] for v in data["variants"]]
    assert names == ["softmax-rotation", "linear-rotation", "softmax-aligned", "linear-aligned"]
    for v in data["variants"]:
        ol, ic, cos = v["outer_loop"], v["in_context"], v["cosines"]
        c = len(ol["steps"])
        assert np.asarray(ol["singular_values"]["kq"]).shape == (c, 1, 2, 5)
        assert np.asarray(ol["singular_values"]["kq_xx"]).shape == (c, 1, 2, 3)
        assert np.asarray(ol["singular_values"]["ov_yy"]).shape == (c, 1, 2, 2)
        assert np.asarray(ol["m_full_context"]).shape == (c, 2)
        assert np.asarray(ic["mean"]).shape == (len(ic["x"]), 2)
        assert set(ic["estimators"]) == {"min_norm", "ridge", "bayes"}
        assert len(cos["heads"]) == 2 and {"xx_weighted_cosine", "full_weighted_cosine", "omega"} <= set(
            cos["heads"][0])
        assert len(v["checkpoints"]) == c and all((out / f).is_file() for f in v["checkpoints"])
        atlas = ModeAtlas.load(out / v["atlas"])
        assert atlas.meta["family"] == "icl-transformer" and atlas.n_heads == 2 and atlas.d_model == 5
        assert atlas.meta["model"] == f"icl-transformer:{v['name']}"
        assert atlas.weighted_cosines[0].tolist() == pytest.approx(
            [h["full_weighted_cosine"] for h in cos["heads"]], abs=1e-6)
        assert set(data["summary"][v["name"]]) >= {"in_context_index", "mean_xx_weighted_cosine",
                                                   "outer_loop_m_full_context_index"}


def test_bad_options_exit_2_with_a_message(tmp_path: Path) -> None:
    res = runner.invoke(app, ["metalearn", "--quick", "--prior", "diagonal", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2 and "prior" in res.output
    res = runner.invoke(app, ["icl", "--quick", "--attention", "softmax,cosine", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "attention" in res.output
    res = runner.invoke(app, ["metalearn", "--quick", "--strengths", "3,2,1", "--n-x", "2", "--out",
                              str(tmp_path / "c")])
    assert res.exit_code == 2 and "modes need" in res.output
    with pytest.raises(QKDissectError, match="not a"):
        load_icl(tmp_path)
    (tmp_path / "results.json").write_text(json.dumps({"command": "saxe"}))
    with pytest.raises(QKDissectError, match="saxe"):
        load_metalearn(tmp_path)
