"""Attention preference: recomputed attention rows, shares, bootstrap, hand-built similarity model, CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from helpers import IMAGE_HW, image_batch, make_hf, make_timm_vit

from qkdissect import dissect
from qkdissect.adapters import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.preference import (
    CATEGORIES,
    QUERIES,
    VARIANTS,
    attention_rows,
    attention_rows_from_modes,
    attention_shares,
    bootstrap_mean,
    load_preference,
    run_preference,
    save_preference,
)
from qkdissect.projection import attention_from_modes, capture_attention_inputs
from qkdissect.synthetic.oddoneout import generate_oddoneout


# ----- a hand-built model whose heads have W_qᵀW_k = c·I ----------------------------------------------------
def make_similarity_vit(cs=(20.0, -20.0), hw=(96, 112), patch=8, d_model=8):
    """One head per layer with d_head = d_model and W_q = √|c|·I, W_k = sign(c)·√|c|·I, so M = c·I.

    The patch embedding writes the patch's mean colour (r, g, b, −r, −g, −b, 0, 0): zero mean over
    d_model, so LayerNorm (γ = 1, β = 0) only rescales it and x̃_i·x̃_j = d_model·cos(colour_i, colour_j).
    Value, output and MLP weights are zero: every block passes the embedding on unchanged.
    """
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=hw, patch_size=patch,
                              embed_dim=d_model, depth=len(cs), num_heads=1, mlp_ratio=1.0, qkv_bias=True,
                              num_classes=0)
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        weight = model.patch_embed.proj.weight  # (d_model, 3, patch, patch)
        for channel in range(3):
            weight[channel, channel] = 1.0 / patch**2
            weight[channel + 3, channel] = -1.0 / patch**2
        eye = torch.eye(d_model)
        for block, c in zip(model.blocks, cs):
            block.attn.qkv.weight[:d_model] = math.sqrt(abs(c)) * eye
            block.attn.qkv.weight[d_model : 2 * d_model] = math.copysign(math.sqrt(abs(c)), c) * eye
    return wrap_model(model.eval(), spec="test:similarity-vit")


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("colour")
    generate_oddoneout(root, 24, (96, 112), seed=0, feature="colour", objects=4)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Odd-one-out images at the size of the conftest models (40×56, 5×7 patches of 8 px)."""
    root = tmp_path_factory.mktemp("tiny")
    generate_oddoneout(root, 14, IMAGE_HW, seed=5, feature="mix", objects=3, radius=6.0)
    return root


def test_similar_tokens_head_prefers_the_same_object(colour_data):
    loaded = make_similarity_vit()
    atlas = dissect(loaded, null_samples=10)
    M = atlas.head(0, 0).M
    torch.testing.assert_close(M, 20.0 * torch.eye(8), atol=1e-4, rtol=1e-5)  # the model is what we claim
    result = run_preference(loaded, colour_data, atlas=atlas, n_boot=200)
    assert result.n_images("target") >= 20
    same_plus = result.curve("target", "measured", "raw", "same").mean[0]
    other_plus = result.curve("target", "measured", "raw", "other").mean[0]
    same_minus = result.curve("target", "measured", "raw", "same").mean[1]
    assert same_plus > 3 * other_plus and same_plus > 0.4
    assert same_minus < 0.05 * same_plus
    # per unit area the +c·I head prefers its own object; the −c·I head avoids it
    assert result.curve("target", "measured", "area", "same").mean[0] > 10
    assert result.curve("target", "measured", "area", "same").mean[1] < 0.2
    # excluding the query token itself does not remove the preference
    noself = result.curve("target", "measured", "noself", "same").mean
    assert noself[0] > 3 * result.curve("target", "measured", "noself", "other").mean[0] and noself[1] < 0.05
    # distractor queries of +c·I look at the identical distractors too ("other" includes them)
    assert result.curve("distractor", "measured", "raw", "same").mean[0] > \
        result.curve("distractor", "measured", "raw", "same").mean[1]
    # one mode of M = c·I explains little; all modes explain everything
    modes = result.curve("target", "modes", "raw", "same").mean
    np.testing.assert_allclose(modes, result.curve("target", "measured", "raw", "same").mean, atol=1e-4)
    assert result.curve("target", "top1", "raw", "same").mean[0] < 0.8 * same_plus


# ----- attention rows -----------------------------------------------------------------------------------
def _image_families():
    return [("timm", lambda: make_timm_vit()), ("dinov2", lambda: make_hf("dinov2")), ("clip", lambda: make_hf("clip")),
            ("deit", lambda: make_hf("deit"))]


@pytest.mark.parametrize("family, factory", _image_families(), ids=[f for f, _ in _image_families()])
def test_recomputed_rows_equal_the_models_own_attention(family, factory):
    loaded = wrap_model(factory())
    adapter = loaded.adapter
    hw = (IMAGE_HW if family == "timm" else (40, 40))
    pixels = image_batch(3, seed=1, hw=hw)
    own = adapter.attention_probabilities(pixels)
    captured = capture_attention_inputs(loaded, pixels, stop_early=False)
    atlas, folded = dissect(loaded, null_samples=10), dissect(loaded, null_samples=10, fold_ln=True)
    n_tokens = own[0].shape[-1]
    tokens = torch.tensor([[0, n_tokens - 1], [5, 3], [n_tokens // 2, 1]])
    for index, layer in enumerate(adapter.attention_layers()):
        x = captured[index]
        measured = attention_rows(layer, x, tokens)
        expected = torch.stack([own[index][b, :, tokens[b]] for b in range(3)])
        torch.testing.assert_close(measured, expected, atol=2e-5, rtol=1e-4)
        modes = attention_rows_from_modes(atlas, index, x, tokens, (None, atlas.rank, 10**6))
        for predicted in modes:
            torch.testing.assert_close(predicted, measured, atol=2e-5, rtol=1e-4)
        full = attention_from_modes(atlas, index, x)
        torch.testing.assert_close(modes[0], torch.stack([full[b, :, tokens[b]] for b in range(3)]))
        torch.testing.assert_close(attention_rows_from_modes(folded, index, x, tokens)[0], measured,
                                   atol=2e-5, rtol=1e-4)


def test_top_modes_rows_use_only_the_leading_modes(timm_vit):
    pixels = image_batch(2, seed=2)
    x = capture_attention_inputs(timm_vit, pixels, layers=[1])[1]
    atlas = dissect(timm_vit, null_samples=10)
    tokens = torch.tensor([[4, 9], [7, 2]])
    top0, top2 = attention_rows_from_modes(atlas, 1, x, tokens, (0, 2))
    modes = atlas.layers[1]
    # independent dense computation: M_2 = Σ_{k<2} σ_k u_k v_kᵀ, key bias kept
    M2 = torch.einsum("hdr,hr,her->hde", modes.U[:, :, :2], modes.S[:, :2], modes.V[:, :, :2])
    x_q = torch.stack([x[b, tokens[b]] for b in range(2)])
    logits = torch.einsum("bqd,hde,bne->bhqn", x_q, M2, x) + torch.einsum("bnd,hd->bhn", x, modes.key_bias)[:, :, None]
    torch.testing.assert_close(top2, (atlas.scale * logits).softmax(-1), atol=1e-5, rtol=1e-4)
    salience = atlas.scale * torch.einsum("bnd,hd->bhn", x, modes.key_bias)[:, :, None].expand_as(logits)
    torch.testing.assert_close(top0, salience.softmax(-1), atol=1e-6, rtol=1e-5)


# ----- shares -------------------------------------------------------------------------------------------
def test_shares_against_a_loop_and_their_ranges():
    generator = torch.Generator().manual_seed(0)
    B, H, Q, n_prefix, P = 3, 4, 2, 2, 11
    rows = torch.randn(B, H, Q, n_prefix + P, generator=generator).mul(2).softmax(-1).double()
    maps = torch.distributions.Dirichlet(torch.ones(3)).sample((B, Q, P)).permute(0, 1, 3, 2).double()
    maps[0, 0, 2] = 0.0  # image 0, target query: a category ...
    maps[0, 0, :, :] /= maps[0, 0].sum(0, keepdim=True)  # ... with zero area
    query = torch.tensor([[3, 0], [10, -1], [5, 7]])
    shares, prefix = attention_shares(rows, n_prefix, maps, query)
    assert shares.shape == (B, H, Q, 3, 3) and prefix.shape == (B, H, Q)
    for b in range(B):
        for h in range(H):
            for q in range(Q):
                if query[b, q] < 0:
                    assert torch.isnan(shares[b, h, q]).all() and torch.isnan(prefix[b, h, q])
                    continue
                a = rows[b, h, q, n_prefix:].numpy()
                f = maps[b, q].numpy()
                assert prefix[b, h, q].item() == pytest.approx(rows[b, h, q, :n_prefix].sum().item())
                a = a / a.sum()
                raw = np.array([sum(a[p] * f[c, p] for p in range(P)) for c in range(3)])
                mask = np.ones(P, dtype=bool)
                mask[query[b, q]] = False
                noself = np.array([(a[mask] * f[c, mask]).sum() / a[mask].sum() for c in range(3)])
                area = f.mean(axis=1)
                np.testing.assert_allclose(shares[b, h, q, 0].numpy(), raw, atol=1e-12)
                np.testing.assert_allclose(shares[b, h, q, 2].numpy(), noself, atol=1e-12)
                with np.errstate(divide="ignore", invalid="ignore"):
                    np.testing.assert_allclose(shares[b, h, q, 1].numpy(), np.where(area > 0, raw / area, np.nan))
    valid = shares.permute(0, 2, 1, 3, 4)[query >= 0]  # (n, H, V, C)
    for variant in (0, 2):
        values = valid[:, :, variant]
        assert ((values >= 0) & (values <= 1)).all()
        torch.testing.assert_close(values.sum(-1), torch.ones_like(values.sum(-1)))


def test_shares_refuse_a_grid_that_does_not_match_the_tokens():
    with pytest.raises(QKDissectError, match="patch grid"):
        attention_shares(torch.rand(1, 1, 2, 10), 1, torch.rand(1, 2, 3, 8), torch.zeros(1, 2, dtype=torch.long))


# ----- bootstrap ----------------------------------------------------------------------------------------
def test_bootstrap_contains_the_mean_and_shrinks_with_more_images():
    rng = np.random.default_rng(0)
    small, large = rng.exponential(size=(25, 3)), rng.exponential(size=(400, 3))
    a, b = bootstrap_mean(small, 1000, 0.95, seed=1), bootstrap_mean(large, 1000, 0.95, seed=1)
    for interval, values in ((a, small), (b, large)):
        np.testing.assert_allclose(interval.mean, values.mean(axis=0))
        assert (interval.lo < interval.mean).all() and (interval.mean < interval.hi).all()
    assert ((b.hi - b.lo) < 0.5 * (a.hi - a.lo)).all()  # ~√16 = 4× narrower
    # against an independent brute-force bootstrap (index resampling), up to Monte-Carlo error
    draws = rng.integers(0, 25, size=(4000, 25))
    brute = np.percentile(small[draws].mean(axis=1), [2.5, 97.5], axis=0)
    width = a.hi - a.lo
    assert (np.abs(a.lo - brute[0]) < 0.12 * width).all() and (np.abs(a.hi - brute[1]) < 0.12 * width).all()
    # a 50% interval is inside the 95% one
    c = bootstrap_mean(small, 1000, 0.5, seed=1)
    assert (c.lo > a.lo).all() and (c.hi < a.hi).all()


def test_bootstrap_ignores_missing_values_and_small_samples():
    values = np.array([[1.0, np.nan], [2.0, 4.0], [3.0, np.nan], [6.0, 8.0]])
    interval = bootstrap_mean(values, 500, 0.9, seed=0)
    np.testing.assert_allclose(interval.mean, [3.0, 6.0])
    assert 4.0 <= interval.lo[1] <= interval.hi[1] <= 8.0
    one = bootstrap_mean(np.array([[0.3]]), 100)
    assert one.mean[0] == one.lo[0] == one.hi[0] == pytest.approx(0.3)
    empty = bootstrap_mean(np.zeros((0, 2)), 100)
    assert np.isnan(empty.mean).all() and np.isnan(empty.lo).all()
    with pytest.raises(QKDissectError, match="confidence"):
        bootstrap_mean(values, 10, confidence=1.5)


# ----- running, files -----------------------------------------------------------------------------------
def test_run_save_load_roundtrip(timm_vit, tiny_data, tmp_path):
    result = run_preference(timm_vit, tiny_data, top_modes=(0, 2), n_boot=100, batch_size=4, threshold=0.25)
    meta = result.meta
    n_used = len(result.names)
    assert meta["n_images"]["listed"] == 14 and n_used == meta["n_images"]["used"] > 5
    assert n_used + sum(result.skipped.values()) == 14
    for entry in meta["images"]:
        assert entry["own_fraction"][0] >= 0.25 and entry["query_patch"][0] >= 0 and "feature" in entry
    assert result.sources == ("measured", "modes", "top0", "top2")
    assert result.shares.shape == (n_used, 3, 4, 2, 4, 3, 3) and result.prefix.shape == (n_used, 3, 4, 2, 4)
    assert max(meta["agreement"]["max_abs_diff_modes_vs_measured"]) < 1e-4
    by_feature = meta["by_feature"]  # generated data: per-feature means, weighted they give the overall mean
    assert sum(v["n"] for v in by_feature.values()) == n_used and len(by_feature) >= 2
    pooled = sum(v["n"] * np.array(v["target"]["raw"]["same"]) for v in by_feature.values()) / n_used
    np.testing.assert_allclose(pooled, result.curve("target", "measured", "raw", "same").mean, atol=1e-5)
    raw = result.shares[:, :, :, 0, :, VARIANTS.index("raw")]
    assert np.nanmin(raw) >= 0 and np.nanmax(raw) <= 1 + 1e-6
    np.testing.assert_allclose(raw.sum(-1), 1.0, atol=1e-5)
    # the layer statistic is the mean over images of the head mean
    np.testing.assert_allclose(result.layer.mean, np.nanmean(result.shares.astype(np.float64).mean(axis=2), axis=0),
                               atol=1e-6)
    written = save_preference(result, tmp_path)
    assert {p.name for p in written} >= {"preference.json", "preference.safetensors", "preference_layers.csv",
                                         "preference_heads.csv", "problems.csv", "preference.png",
                                         "preference_modes.png"}
    back = load_preference(tmp_path)
    assert back.layers == result.layers and back.sources == result.sources and back.names == result.names
    np.testing.assert_array_equal(back.shares, result.shares)
    np.testing.assert_allclose(back.head.lo, result.head.lo, rtol=1e-6)
    np.testing.assert_allclose(back.curve("distractor", "top2", "noself", "other").hi,
                               result.curve("distractor", "top2", "noself", "other").hi, rtol=1e-6)
    assert back.meta["patch_grid"] == [5, 7] and back.skipped == result.skipped
    with open(tmp_path / "preference_layers.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 2 * 4 * 3 * 3 + 3 * 2 * 4
    row = next(r for r in rows if (r["layer"], r["query"], r["source"], r["variant"], r["category"])
               == ("2", "target", "measured", "area", "background"))
    li, qi, ci = 2, 0, CATEGORIES.index("background")
    assert float(row["mean"]) == pytest.approx(result.layer.mean[li, qi, 0, 1, ci], rel=1e-5)
    document = json.loads((tmp_path / "preference.json").read_text())
    assert document["layers"][1]["target"]["measured"]["raw"]["same"]["mean"] == pytest.approx(
        result.layer.mean[1, 0, 0, 0, 0], abs=1e-6)
    assert set(QUERIES) <= set(document["layers"][0]) and "torch" in document["versions"]


def test_per_image_shares_match_the_models_own_attention(timm_vit, tiny_data):
    """End to end against an independent path: the model's eager attention probabilities, the
    query token at n_prefix + query patch, prefix dropped, renormalised, dotted with the maps."""
    from qkdissect.synthetic.oddoneout import load_sample, patch_geometry, query_maps, read_o3_folder

    result = run_preference(timm_vit, tiny_data, top_modes=(), n_boot=10, limit=5)
    adapter, preprocessing = timm_vit.adapter, timm_vit.preprocessing
    n_prefix = len(adapter.prefix_tokens)
    items = {item.name: item for item in read_o3_folder(tiny_data).items}
    for position, name in enumerate(result.names):
        sample = load_sample(items[name])
        maps = query_maps(sample, patch_geometry(preprocessing, sample.target.shape, (5, 7)))
        own = adapter.attention_probabilities(preprocessing(sample.image)[None])
        for layer in range(3):
            for q, patch in enumerate(maps.query_patch):
                if patch < 0:
                    assert np.isnan(result.shares[position, layer, :, q]).all()
                    continue
                row = own[layer][0, :, n_prefix + patch, n_prefix:].double().numpy()  # (H, P)
                row = row / row.sum(axis=1, keepdims=True)
                expected = row @ maps.maps[q].T  # (H, C)
                np.testing.assert_allclose(result.shares[position, layer, :, q, 0, 0], expected, atol=2e-5)
                np.testing.assert_allclose(result.prefix[position, layer, :, q, 0],
                                           own[layer][0, :, n_prefix + patch, :n_prefix].sum(-1).numpy(), atol=2e-5)


def test_folded_atlas_and_layer_subset_give_the_same_attention(timm_vit, tiny_data):
    common = dict(top_modes=(1,), n_boot=50, limit=6)
    plain = run_preference(timm_vit, tiny_data, **common)
    folded = run_preference(timm_vit, tiny_data, atlas=dissect(timm_vit, fold_ln=True, null_samples=10),
                            layers=[2], **common)
    assert folded.layers == (2,)
    # measured and all-mode predictions agree; top-m differ (folding changes which modes lead)
    np.testing.assert_allclose(folded.shares[:, 0, :, :, :2], plain.shares[:, 2, :, :, :2], atol=1e-5)
    assert not np.allclose(folded.shares[:, 0, :, :, 2], plain.shares[:, 2, :, :, 2], atol=1e-3)


def test_broken_images_are_skipped_and_counted(timm_vit, tiny_data, tmp_path):
    import shutil

    from PIL import Image

    root = tmp_path / "broken"
    shutil.copytree(tiny_data, root)
    (root / "images" / "00002.png").write_bytes(b"garbage")
    Image.new("L", (9, 9)).save(root / "dist_images" / "00004.png")
    (root / "targ_images" / "00006.png").unlink()
    result = run_preference(timm_vit, root, top_modes=(1,), n_boot=20)
    assert result.skipped["unreadable image"] == 1 and result.skipped["mask size differs from image"] == 1
    assert result.skipped["missing mask"] == 1
    assert len(result.names) + sum(result.skipped.values()) == 14
    assert not {"00002", "00004", "00006"} & set(result.names)
    # nothing usable: an empty, well-formed result (no figures), not a crash
    for path in (root / "images").iterdir():
        path.write_bytes(b"")
    empty = run_preference(timm_vit, root, top_modes=(1,), n_boot=20)
    assert empty.names == () and empty.shares.shape[0] == 0 and np.isnan(empty.layer.mean).all()
    written = save_preference(empty, tmp_path / "out")
    assert not any(p.suffix == ".png" for p in written)
    assert len(load_preference(tmp_path / "out").problems) == 14


def test_bad_requests(timm_vit, tiny_data, tmp_path):
    with pytest.raises(QKDissectError, match="image model"):
        run_preference(wrap_model(make_hf("bert")), tiny_data)
    with pytest.raises(QKDissectError, match="layers must be"):
        run_preference(timm_vit, tiny_data, layers=[7])
    with pytest.raises(QKDissectError, match="threshold"):
        run_preference(timm_vit, tiny_data, threshold=0)
    other = dissect(wrap_model(make_timm_vit(depth=2)), null_samples=10)
    with pytest.raises(QKDissectError, match="does not belong"):
        run_preference(timm_vit, tiny_data, atlas=other)
    with pytest.raises(QKDissectError, match="not a preference folder"):
        load_preference(tmp_path)


# ----- command line -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_tiny_vit(tmp_path_factory):
    """The conftest timm ViT saved as a timm folder (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tinyvit")
    model = make_timm_vit()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "num_classes": 5,
        "model_args": {"img_size": list(IMAGE_HW), "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 4,
                       "qkv_bias": True, "reg_tokens": 2, "mlp_ratio": 1.5}}))
    return folder


def test_cli_generates_and_measures(tmp_path, saved_tiny_vit):
    from typer.testing import CliRunner

    from qkdissect.cli import app

    runner = CliRunner()
    data, out = tmp_path / "odd", tmp_path / "pref"
    result = runner.invoke(app, ["oddoneout", "--n", "10", "--size", "40x56", "--seed", "1", "--objects", "3",
                                 "--radius", "6", "--out", str(data)])
    assert result.exit_code == 0, result.output
    assert len(list((data / "images").iterdir())) == 10 and "10 images of 40×56" in result.output
    (data / "targ_images" / "00003.png").unlink()  # a broken item: reported, not fatal
    result = runner.invoke(app, ["preference", str(saved_tiny_vit), "--data", str(data), "--out", str(out),
                                 "--bootstrap", "50", "--top-modes", "1,3", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "target queries" in result.output and "max |difference|" in result.output
    loaded = load_preference(out)
    assert loaded.sources == ("measured", "modes", "top1", "top3")
    assert any(p.name == "00003" and p.kind == "missing mask" for p in loaded.problems)
    assert "00003" in (out / "problems.csv").read_text()
    result = runner.invoke(app, ["preference", str(saved_tiny_vit), "--data", str(tmp_path / "none")])
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(app, ["oddoneout", "--n", "2", "--size", "4x", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "could not read size" in result.output
