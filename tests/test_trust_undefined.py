"""Undefined is not a number: modes with σ_k ≤ ε·σ_1 get no cosine, no map and no place in the statistics; a head of
rank 0 (W_q = 0) is flagged in the atlas, the CLI table and the report (issue 14, case 8)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from helpers import D_HEAD, D_MODEL, N_HEADS, make_timm_vit, save_timm_folder
from typer.testing import CliRunner

from qkdissect import ModeAtlas, dissect
from qkdissect.cli import app

runner = CliRunner()
RANK0, PARTIAL = (1, 2), (0, 1)  # (layer, head): W_q = 0; W_q of rank 3


def deficient_vit():
    vit = make_timm_vit(seed=3)
    with torch.no_grad():
        layer, head = RANK0
        vit.blocks[layer].attn.qkv.weight[head * D_HEAD:(head + 1) * D_HEAD] = 0
        layer, head = PARTIAL
        vit.blocks[layer].attn.qkv.weight[head * D_HEAD + 3:(head + 1) * D_HEAD] = 0
    return vit


@pytest.fixture(scope="module")
def atlas():
    return dissect(deficient_vit(), null_samples=60)


def dense_weighted_cosine(vit, layer: int, head: int) -> float:
    """tr(M)/‖M‖_* from the dense M = W_qᵀW_k (numpy float64), independent of the factored SVD."""
    weight = vit.blocks[layer].attn.qkv.weight.detach().double().numpy()
    W_q = weight[head * D_HEAD:(head + 1) * D_HEAD]
    W_k = weight[D_MODEL + head * D_HEAD:D_MODEL + (head + 1) * D_HEAD]
    M = W_q.T @ W_k
    return float(np.trace(M) / np.linalg.svd(M, compute_uv=False).sum())


def test_undefined_modes_have_no_cosine_and_rank0_heads_no_statistics(atlas):
    assert atlas.rank0_heads() == [RANK0]
    assert int(atlas.head_ranks[RANK0]) == 0 and int(atlas.head_ranks[PARTIAL]) == 3
    assert torch.isnan(atlas.cosines[RANK0]).all() and math.isnan(float(atlas.weighted_cosines[RANK0]))
    assert math.isnan(float(atlas.symmetric_fractions[RANK0]))
    assert torch.isnan(atlas.cosines[PARTIAL][3:]).all() and torch.isfinite(atlas.cosines[PARTIAL][:3]).all()
    assert (atlas.head_ranks.sum() == atlas.n_layers * N_HEADS * D_HEAD - D_HEAD - 3)
    head = atlas.head(*RANK0)
    assert head.n_defined == 0 and not head.above_null and not head.below_null
    assert not atlas.degenerate[RANK0].any()  # σ = 0 = 0 is not a "near-degenerate pair"


def test_layer_statistics_leave_undefined_out(atlas):
    vit = deficient_vit()
    lo, hi = atlas.null.weighted_band
    for layer, row in enumerate(atlas.layer_summary()):
        heads = [h for h in range(N_HEADS) if (layer, h) != RANK0]
        dense = np.array([dense_weighted_cosine(vit, layer, h) for h in heads])
        np.testing.assert_allclose(row["mean_weighted_cosine"], dense.mean(), atol=2e-5)
        assert row["share_heads_above_null"] == pytest.approx(float(np.mean(dense > hi)))
        assert row["share_heads_below_null"] == pytest.approx(float(np.mean(dense < lo)))
        assert row["n_rank0_heads"] == (1 if layer == RANK0[0] else 0)
        n_modes = (N_HEADS * D_HEAD - (D_HEAD if layer == RANK0[0] else 0) - (3 if layer == PARTIAL[0] else 0))
        cos = atlas.cosines[layer]
        assert row["share_modes_above_null"] == pytest.approx(
            float((cos > atlas.null.cosine_band[1]).sum()) / n_modes)


def test_json_writes_null_and_the_flag_and_round_trips(atlas, tmp_path):
    atlas.save(tmp_path / "a")
    text = (tmp_path / "a" / "atlas.json").read_text()
    doc = json.loads(text)
    assert "NaN" not in text and doc["rank0_heads"] == [list(RANK0)]
    record = doc["heads"][RANK0[0] * N_HEADS + RANK0[1]]
    assert record["rank0"] is True and record["weighted_cosine"] is None and record["cosines"] == [None] * D_HEAD
    partial = doc["heads"][PARTIAL[0] * N_HEADS + PARTIAL[1]]
    assert partial["n_defined_modes"] == 3 and partial["cosines"][3:] == [None] * 3
    back = ModeAtlas.load(tmp_path / "a")
    assert back.undefined_tolerance == atlas.undefined_tolerance
    assert torch.equal(torch.isnan(back.cosines), torch.isnan(atlas.cosines))


def test_cli_flags_rank0_refuses_its_maps_and_the_report_says_so(tmp_path, natural_image_folder):
    folder = save_timm_folder(deficient_vit(), tmp_path / "model")
    result = runner.invoke(app, ["dissect", str(folder), "--out", str(tmp_path / "atlas"), "--null-samples", "60"])
    assert result.exit_code == 0, result.output
    assert "rank 0" in result.output and "layer 1 head 2" in result.output
    image = str(sorted(natural_image_folder.iterdir())[0])
    for head, modes, words in ((RANK0, "0-1", "rank 0"), (PARTIAL, "0-5", "modes [3, 4, 5]")):
        result = runner.invoke(app, ["maps", str(folder), image, "--layer", str(head[0]), "--head", str(head[1]),
                                     "--modes", modes, "--atlas", str(tmp_path / "atlas"),
                                     "--out", str(tmp_path / f"maps{head[0]}")])
        assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
        assert result.output.count("error:") == 1
    rank = runner.invoke(app, ["rank", str(folder), image, "--layer", "0-2", "--atlas", str(tmp_path / "atlas"),
                               "--out", str(tmp_path / "rank")])
    assert rank.exit_code == 0, rank.output
    rows = (tmp_path / "rank" / "rank.csv").read_text().splitlines()
    assert len(rows) == 1 + int(ModeAtlas.load(tmp_path / "atlas").head_ranks.sum())
    report = runner.invoke(app, ["report", str(tmp_path / "atlas"), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    index = (tmp_path / "report" / "index.html").read_text()
    page = (tmp_path / "report" / "heads" / "layer01_head02.html").read_text()
    assert "rank 0" in index and not re.search(r"[+-]?\bnan\b", index)
    assert "rank 0 (W_qᵀW_k = 0)" in page and "undefined" in page
