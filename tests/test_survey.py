"""`qkdissect survey` and the by-name loading path it rests on, offline: models are read from a Hugging Face cache
folder laid out as the hub lays it out (tests/hub_cache.py), a name that is not there fails fast with one line;
the early-vs-late trend against closed forms; resume, failures, bad input, the report's comparison page."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_timm_vit
from hub_cache import add_hf_model, add_timm_model
from typer.testing import CliRunner

from qkdissect import QKDissectError, dissect, load_model
from qkdissect.adapters import wrap_model
from qkdissect.cli import app
from qkdissect.comparison import compare, depth_trend
from qkdissect.decomposition import ModeAtlas
from qkdissect.model_survey import DEFAULT_MODELS, load_survey, read_model_list, survey

SRC = Path(__file__).resolve().parents[1] / "src"
PRESENT = ("test_vit.r160_in1k", "test_vit2.r160_in1k")  # real timm pretrained names of tiny architectures
ABSENT = "timm:test_vit3.r160_in1k"
runner = CliRunner()


def scrambled(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.3 if v.is_floating_point() else v
            for k, v in state.items()}


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with timm/test_vit.r160_in1k, timm/test_vit2.r160_in1k (timm's hub format) and tinyorg/tiny-vit
    (a transformers ViTModel: d_model 24, 4 heads, 3 layers)."""
    import transformers as tf

    home = tmp_path_factory.mktemp("hf_home")
    states = {name: add_timm_model(home, name, seed=index + 1, scramble=scrambled)
              for index, name in enumerate(PRESENT)}
    vit = tf.ViTModel(tf.ViTConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                                   image_size=40, patch_size=8))
    states["tinyorg/tiny-vit"] = add_hf_model(home, "tinyorg/tiny-vit", vit)
    return home, states


@pytest.fixture
def cache(hf_home, monkeypatch):
    """The cache of ``hf_home`` for in-process loading (huggingface_hub reads HF_HOME at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home[0] / "hub"))
    return hf_home


def cli(args: list[str], home: Path, cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m qkdissect ARGS`` in a fresh process with HF_HOME=home and HF_HUB_OFFLINE=1; (result, seconds)."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC),
           "COLUMNS": "200", "MPLBACKEND": "Agg"}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(name, None)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "qkdissect", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    return result, time.perf_counter() - started


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ----- the early-vs-late trend ------------------------------------------------------------------------------------
def test_depth_trend_slope_is_the_least_squares_slope_of_layer_means():
    rng = np.random.default_rng(3)
    weighted = rng.normal(size=(7, 5)) * 0.2 + np.linspace(0.4, -0.3, 7)[:, None]
    trend = depth_trend(weighted, samples=500)
    depth = np.arange(7) / 6
    assert trend.slope == pytest.approx(np.polyfit(depth, weighted.mean(axis=1), 1)[0], abs=1e-12)
    assert trend.low <= trend.slope <= trend.high
    assert trend.early == pytest.approx(weighted[depth <= 1 / 3].mean())
    assert trend.late == pytest.approx(weighted[depth >= 2 / 3].mean())
    assert depth_trend(weighted, samples=500) == trend  # seeded: reproducible
    assert depth_trend(weighted, samples=500, seed=1) != trend


def test_depth_trend_of_a_line_with_equal_heads_has_a_point_interval():
    weighted = np.repeat((0.5 - 0.8 * np.arange(4) / 3)[:, None], 6, axis=1)  # C = 0.5 − 0.8 x for every head
    trend = depth_trend(weighted, samples=200)
    assert trend.slope == pytest.approx(-0.8) and trend.low == pytest.approx(-0.8) and trend.high == pytest.approx(-0.8)
    # first third: x = 0, 1/3; last third: x = 2/3, 1
    assert trend.direction == "falls" and trend.early == pytest.approx(0.5 - 0.8 / 6)
    assert trend.late == pytest.approx(0.5 - 0.8 * 5 / 6)
    assert depth_trend(-weighted).direction == "rises"


def test_depth_trend_interval_matches_the_analytic_bootstrap_error():
    """The slope Σ_l w_l m_l of independent per-layer bootstrap means has variance Σ_l w_l² σ_l² / H (σ_l: the
    layer's head spread, ddof 0); with 60 heads the percentile interval is ± 1.96 of that (normal limit)."""
    rng = np.random.default_rng(0)
    weighted = rng.normal(size=(5, 60)) * np.array([0.1, 0.3, 0.2, 0.05, 0.4])[:, None]
    trend = depth_trend(weighted, samples=20000, level=0.95)
    depth = np.arange(5) / 4
    w = (depth - depth.mean()) / ((depth - depth.mean()) ** 2).sum()
    se = np.sqrt((w ** 2 * weighted.var(axis=1) / 60).sum())
    assert (trend.high - trend.low) / 2 == pytest.approx(1.96 * se, rel=0.05)


def test_depth_trend_undefined_and_bad_input():
    one = depth_trend(np.full((1, 3), 0.2))
    assert np.isnan(one.slope) and one.direction == "?" and one.to_json()["slope"] is None
    for bad in (np.zeros((3,)), np.zeros((0, 3)), np.array([[0.1, np.nan], [0.2, 0.3]])):
        with pytest.raises(QKDissectError):
            depth_trend(bad)
    with pytest.raises(QKDissectError, match="level"):
        depth_trend(np.zeros((3, 2)), level=1.5)


def test_compare_command_prints_the_trend(tmp_path):
    for index in range(2):
        dissect(wrap_model(make_timm_vit(seed=index, depth=3 + index)), null_samples=20).save(tmp_path / f"a{index}")
    result = runner.invoke(app, ["compare", str(tmp_path / "a0"), str(tmp_path / "a1"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "early-vs-late trend" in result.output and "95% CI" in result.output
    slope = compare([tmp_path / "a0", tmp_path / "a1"]).models[1].trend().slope
    assert f"{slope:+.3f}" in result.output


# ----- by-name loading from the hub cache, offline -------------------------------------------------------------
def test_timm_name_loads_the_cached_weights(cache):
    _, states = cache
    for name in PRESENT:
        loaded = load_model(f"timm:{name}")
        assert loaded.info["weights"].startswith(str(cache[0])) and loaded.family == "timm-vit"
        own = loaded.model.state_dict()
        assert own.keys() == states[name].keys()
        assert all(torch.equal(own[k], states[name][k]) for k in own)
    bare = load_model(PRESENT[0])  # a bare timm name takes the same path
    assert torch.equal(bare.model.blocks[1].attn.qkv.weight, states[PRESENT[0]]["blocks.1.attn.qkv.weight"])


def test_hf_ids_load_from_the_cache(cache):
    _, states = cache
    timm_repo = load_model(f"hf:timm/{PRESENT[1]}")  # a timm-format hub repo, read with timm
    assert torch.equal(timm_repo.model.blocks[7].attn.qkv.weight, states[PRESENT[1]]["blocks.7.attn.qkv.weight"])
    vit = load_model("hf:tinyorg/tiny-vit")
    assert vit.family == "hf-vit" and vit.adapter.n_layers == 3
    own = vit.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in states["tinyorg/tiny-vit"].items())
    assert load_model("hf:tinyorg/tiny-vit", random_init=True).adapter.n_layers == 3


@pytest.mark.parametrize("spec", [ABSENT, "vit_tiny_patch16_224", "hf:tinyorg/absent", "hf:timm/absent"])
def test_absent_names_fail_fast_offline_with_one_line(cache, spec):
    started = time.perf_counter()
    with pytest.raises(QKDissectError) as caught:
        load_model(spec)
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "--checkpoint" in message and "--random-init" in message and "not in the local Hugging Face cache" in message


def test_absent_name_fails_fast_when_the_hub_is_unreachable(cache, monkeypatch):
    """Offline mode off, but nothing answers at the hub's address: one connection attempt, then the error."""
    from huggingface_hub import constants

    from qkdissect.adapters.hub import probe_hub

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    probe_hub.cache_clear()
    try:
        started = time.perf_counter()
        with pytest.raises(QKDissectError, match=r"cannot be reached \(127\.0\.0\.1:9"):
            load_model(ABSENT)
        assert time.perf_counter() - started < 10
        assert load_model(f"timm:{PRESENT[0]}").family == "timm-vit"  # cached names need no hub
    finally:
        probe_hub.cache_clear()


def test_bad_names(cache):
    with pytest.raises(QKDissectError, match="no pretrained weights 'test_vit.nosuchtag'"):
        load_model("timm:test_vit.nosuchtag")
    with pytest.raises(QKDissectError, match="neither a folder nor a hub id"):
        load_model("hf:a/b/c")


# ----- the survey through the real by-name path (fresh processes, HF_HOME + HF_HUB_OFFLINE=1) --------------------
def test_survey_cli_offline_two_done_one_failed_then_resume(hf_home, tmp_path):
    home, states = hf_home
    specs = [f"timm:{PRESENT[0]}", ABSENT, f"timm:{PRESENT[1]}"]
    result, _ = cli(["survey", *specs, "--out", "s", "--null-samples", "50"], home, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    document = load_survey(tmp_path / "s")
    assert [(m["spec"], m["status"]) for m in document["models"]] == [(specs[0], "done"), (ABSENT, "failed"),
                                                                       (specs[2], "done")]
    failed = document["models"][1]
    assert "not in the local Hugging Face cache" in failed["reason"] and failed["atlas"] == ""
    assert "failed" in result.stdout and "test_vit3.r160_in1k" in result.stdout
    for entry, name in zip((document["models"][0], document["models"][2]), PRESENT):
        atlas = ModeAtlas.load(tmp_path / "s" / entry["atlas"])  # the weights of the cache, nothing else
        model = make_reference(name, states[name])
        expected = dissect(wrap_model(model), null_samples=50)
        assert torch.allclose(atlas.weighted_cosines, expected.weighted_cosines, atol=1e-5)
        assert (tmp_path / "s" / entry["atlas"] / "layer_similarity.png").is_file()
    assert (tmp_path / "s" / "compare" / "compare.png").stat().st_size > 1000
    compared = json.loads((tmp_path / "s" / "compare" / "compare.json").read_text())
    assert [m["n_layers"] for m in compared["models"]] == [6, 8]
    rows = list(csv.DictReader((tmp_path / "s" / "trends.csv").open()))
    assert [row["spec"] for row in rows] == [specs[0], specs[2]]
    for row, entry in zip(rows, (document["models"][0], document["models"][2])):
        weighted = ModeAtlas.load(tmp_path / "s" / entry["atlas"]).weighted_cosines.double().numpy()
        assert float(row["slope"]) == pytest.approx(depth_trend(weighted).slope, abs=1e-6)

    stamps = {e["atlas"]: (tmp_path / "s" / e["atlas"] / "atlas.safetensors").stat().st_mtime_ns
              for e in document["models"] if e["atlas"]}
    again, _ = cli(["survey", "--out", "s", "--null-samples", "50"], home, tmp_path)  # no MODEL: its own list
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("resumed") == 2
    redo = load_survey(tmp_path / "s")
    assert [m["status"] for m in redo["models"]] == ["done", "failed", "done"]
    assert {a: (tmp_path / "s" / a / "atlas.safetensors").stat().st_mtime_ns for a in stamps} == stamps


def make_reference(name: str, state: dict[str, torch.Tensor]):
    import timm

    model = timm.create_model(name.split(".")[0], pretrained=False)
    model.load_state_dict(state)
    return model.eval()


def test_dissect_of_an_absent_name_is_one_line_and_fast(hf_home, tmp_path):
    """The failing name costs no more than a name that fails before any hub access (same imports; the startup of
    a process dominates both on a loaded machine)."""
    home, _ = hf_home
    baseline, base_seconds = cli(["dissect", "timm:vit_enormous_patch3", "--out", "a"], home, tmp_path)
    absent, seconds = cli(["dissect", ABSENT, "--out", "a"], home, tmp_path)
    assert absent.returncode == 2 and baseline.returncode == 2
    lines = absent.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and lines[0].endswith("random weights."), lines
    assert absent.stdout == "" and not (tmp_path / "a").exists()
    assert seconds - base_seconds < 5 and seconds < 60, (seconds, base_seconds)


# ----- the library: failures, labels, progress, bad input ---------------------------------------------------------
def tiny_loader(calls: list[str]):
    """``load_model`` stand-in: tiny timm ViTs of 3, 4, 5 layers by spec; "boom" crashes; else load_model."""
    def load(spec: str, random_init: bool = False):
        calls.append(spec)
        if spec == "boom":
            raise RuntimeError("simulated crash")
        if spec.startswith("tiny"):
            return wrap_model(make_timm_vit(seed=len(spec), depth=int(spec[-1])), spec=spec)
        return load_model(spec, random_init=random_init)
    return load


def test_survey_library_isolates_failures_and_reports_progress(tmp_path):
    calls, events = [], []
    result = survey(["tiny3", "boom", "tiny5", "builtin:nonexistent"], tmp_path / "s", null_samples=20,
                    trend_samples=100, loader=tiny_loader(calls), progress=lambda *e: events.append(e))
    assert [e.status for e in result.entries] == ["done", "failed", "done", "failed"]
    assert result.entries[1].reason == "unexpected RuntimeError: simulated crash"
    assert "unknown built-in model" in result.entries[3].reason
    assert [m.n_layers for m in result.comparison.models] == [3, 5]
    assert set(result.trends) == {"tiny3", "tiny5"}
    assert ("models", 4, 4) in events and ("tiny3", 3, 3) in events and ("tiny5", 1, 3) in events
    assert (tmp_path / "s" / "compare" / "compare.json").is_file()
    # one more model joins the survey; the done ones are not loaded again, the failed ones are tried again
    calls.clear()
    more = survey(["tiny4"], tmp_path / "s", null_samples=20, trend_samples=100, loader=tiny_loader(calls))
    assert calls == ["boom", "builtin:nonexistent", "tiny4"]
    assert [e.spec for e in more.entries] == ["tiny3", "boom", "tiny5", "builtin:nonexistent", "tiny4"]
    assert set(more.skipped) == {"tiny3", "tiny5"} and len(more.comparison.models) == 3


def test_interrupted_survey_resumes_its_own_list_and_keeps_the_users_files(tmp_path):
    """A run stopped inside its second model (Ctrl-C, or a kill) resumes with no MODEL argument: the list is in
    survey.json from the start, the done model is not loaded again, and files the user put there stay."""
    calls: list[str] = []
    inner = tiny_loader(calls)

    def interrupted(spec: str, random_init: bool = False):
        if spec == "tiny5":
            raise KeyboardInterrupt
        return inner(spec, random_init)

    with pytest.raises(KeyboardInterrupt):
        survey(["tiny3", "tiny5", "tiny4"], tmp_path / "s", null_samples=20, trend_samples=50, loader=interrupted)
    assert [m["spec"] for m in load_survey(tmp_path / "s")["planned"]] == ["tiny3", "tiny5", "tiny4"]
    (tmp_path / "s" / "notes.txt").write_text("mine")
    calls.clear()
    result = survey(None, tmp_path / "s", null_samples=20, trend_samples=50, loader=tiny_loader(calls))
    assert calls == ["tiny5", "tiny4"] and result.skipped == ("tiny3",)
    assert [e.status for e in result.entries] == ["done"] * 3
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".qkdissect-tmp"))


def test_survey_with_one_model_done_and_none_done(tmp_path):
    one = survey(["tiny4", "boom"], tmp_path / "one", null_samples=20, trend_samples=50, loader=tiny_loader([]))
    assert len(one.comparison.models) == 1 and (tmp_path / "one" / "compare" / "compare.png").is_file()
    with pytest.raises(QKDissectError, match=r"none of the 2 models could be surveyed.*simulated crash"):
        survey(["boom", "builtin:nonexistent"], tmp_path / "none", loader=tiny_loader([]))
    assert [m["status"] for m in load_survey(tmp_path / "none")["models"]] == ["failed", "failed"]


def test_survey_cli_none_done_is_one_error_line(tmp_path):
    result = runner.invoke(app, ["survey", "builtin:nonexistent", "timm:vit_enormous_patch3", "--out",
                                 str(tmp_path / "s")])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1 and "none of the 2 models" in result.output


def test_survey_refuses_foreign_folders_and_other_options(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "ch1.tex").write_text("t")
    with pytest.raises(QKDissectError, match=r"holds no qkdissect manifest \(survey.json"):
        survey(["tiny3"], foreign, loader=tiny_loader([]))
    assert [p.name for p in foreign.iterdir()] == ["ch1.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(QKDissectError, match="is a file"):
        survey(["tiny3"], tmp_path / "file", loader=tiny_loader([]))
    survey(["tiny3"], tmp_path / "s", null_samples=20, trend_samples=50, loader=tiny_loader([]))
    with pytest.raises(QKDissectError, match=r"other options \(null_samples=20\)"):
        survey(["tiny3"], tmp_path / "s", null_samples=30, loader=tiny_loader([]))
    for bad in ({"dtype": "float16"}, {"null_samples": 0}, {"trend_samples": 0}, {"null_percentile": 100}):
        with pytest.raises(QKDissectError):
            survey(["tiny3"], tmp_path / "s", loader=tiny_loader([]), **bad)
    index = tmp_path / "s" / "survey.json"
    document = json.loads(index.read_text())
    document["models"][0]["atlas"] = "../../victim"
    index.write_text(json.dumps(document))
    with pytest.raises(QKDissectError, match="not a folder under atlases/"):
        survey(None, tmp_path / "s", null_samples=20, loader=tiny_loader([]))
    index.write_text(json.dumps({"format": "qkdissect-survey", "format_version": 1, "files": [], "options": {},
                                 "models": [{}]}))
    with pytest.raises(QKDissectError, match=r"models\[0\]\.spec"):
        survey(None, tmp_path / "s", loader=tiny_loader([]))


def test_model_list_file(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("# the paper's models\ntimm:vit_base_patch16_224.dino   # DINO\n\n  hf:org/name\n#hf:skipped\n")
    assert read_model_list(path) == ["timm:vit_base_patch16_224.dino", "hf:org/name"]
    path.write_text("# nothing\n")
    with pytest.raises(QKDissectError, match="lists no model"):
        read_model_list(path)
    with pytest.raises(QKDissectError, match="not found"):
        read_model_list(tmp_path / "nope.txt")
    result = runner.invoke(app, ["survey", "--models", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "s")])
    assert result.exit_code == 2 and len(error_lines(result.output)) == 1


def test_default_list_names_exist_in_timm():
    import timm

    assert len(DEFAULT_MODELS) == 12 and len({m.label for m in DEFAULT_MODELS}) == 12
    for model in DEFAULT_MODELS:
        assert model.spec.startswith("timm:")
        name = model.spec[5:]
        assert name in timm.list_pretrained(name), name
    result = runner.invoke(app, ["survey", "--list"])
    assert result.exit_code == 0 and "DINOv3" in result.output


def test_report_reads_a_survey_folder(tmp_path):
    from qkdissect.report import build_report

    survey(["tiny3", "tiny5"], tmp_path / "s", null_samples=20, trend_samples=50, loader=tiny_loader([]))
    atlas = tmp_path / "s" / "atlases" / "tiny3"
    report = build_report(atlas, tmp_path / "r", compare=[tmp_path / "s"])
    text = (tmp_path / "r" / "compare.html").read_text()
    assert "compare" in report.sections and "slope over depth" in text
    slope = depth_trend(ModeAtlas.load(tmp_path / "s" / "atlases" / "tiny5").weighted_cosines.double().numpy()).slope
    assert f"{slope:+.3f}" in text
    (tmp_path / "empty_survey").mkdir()
    (tmp_path / "empty_survey" / "survey.json").write_text("{}")
    with pytest.raises(QKDissectError, match="no comparison yet"):
        build_report(atlas, tmp_path / "r2", compare=[tmp_path / "empty_survey"])
