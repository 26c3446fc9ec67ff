"""Maps, ranking, mining, preference and the report on models with today's attention forms: they use the
exact logits (rotation, QK-norm factors, relative bias, causal masks); window attention is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from form_models import make
from PIL import Image

from qkdissect import dissect
from qkdissect.errors import QKDissectError
from qkdissect.preference.attention import attention_rows, attention_rows_from_modes
from qkdissect.projection import capture_attention_inputs, mode_contributions, project, qk_norm_factors
from qkdissect.views import prepare_view
from qkdissect.views.maps import run_maps
from qkdissect.views.rank import run_rank


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    return folder


def _float32(kind):
    loaded, inputs, mask = make(kind)
    loaded.model.float()
    return loaded


@pytest.mark.parametrize("kind", ["timm-rope-axial", "timm-vit-qknorm", "hf-beit"])
def test_maps_and_rank_use_the_exact_form(kind, photos, tmp_path):
    ctx = prepare_view(_float32(kind))
    result = run_maps(ctx, tmp_path / "maps", layer=1, head=2, modes=[0, 3], images=sorted(photos.glob("*.png")))
    tensors = result.items[0].tensors
    n = tensors["contributions"].shape[-1]
    assert "residual_logits" in tensors and tensors["residual_logits"].shape == (n, n)
    assert "key_bias_logits" not in tensors
    if kind == "timm-vit-qknorm":  # the per-token factors are reported, and the maps are divided by them
        assert tensors["rho"].shape == (2, n) and bool((tensors["rho"] > 0).all())
    rank = run_rank(ctx, tmp_path / "rank", layers=[1], images=sorted(photos.glob("*.png"))[:1])
    rows = [r for r in rank.rows if r["head"] == 2]
    assert abs(sum(r["share"] for r in rows) + rows[0]["head_bias_share"] - 1.0) < 1e-6
    if kind == "hf-beit":
        assert all(np.isfinite(r["head_relative_bias_share"]) for r in rows)
    meta = json.loads((tmp_path / "rank" / "rank.json").read_text())
    assert meta["attention_forms"] == ctx.atlas.meta["attention_forms"]


@pytest.mark.parametrize("kind", ["timm-swin", "hf-swinv2"])
def test_window_maps_are_on_the_layers_grid_and_shares_sum_over_windows(kind, photos, tmp_path):
    """Layer 1 is the second stage: a 4 × 6 grid in 4 × 4 windows (padded to 4 × 8), shifted for timm."""
    from qkdissect.projection import logit_variance_shares, logits_from_modes, valid_pairs

    ctx = prepare_view(_float32(kind))
    images = sorted(photos.glob("*.png"))
    result = run_maps(ctx, tmp_path / "maps", layer=1, head=4, modes=[0, 2], images=images[:2])
    tensors = result.items[0].tensors
    assert tensors["q"].shape == (2, 4, 6) and result.meta["grid"] == [4, 6]
    assert tensors["contributions"].shape == (2, 2, 16, 16) and tensors["window_index"].shape == (2, 16)
    # the grid maps are the projections of the layer's own grid tokens (window partition undone)
    from qkdissect.views.context import forward_input, iter_inputs

    item = next(iter_inputs(ctx, images[:1], [], []))
    pixels, _ = forward_input(item)
    layer = ctx.loaded.adapter.attention_layers()[1]
    store = {}
    block = ctx.loaded.adapter.blocks[1] if kind.startswith("timm") else ctx.loaded.adapter.layers[1]
    hook = block.register_forward_pre_hook(lambda _m, args: store.__setitem__("x", args[0]))
    with torch.no_grad():
        ctx.loaded.adapter.forward(pixels)
    hook.remove()
    x = store["x"].reshape(1, 24, -1)
    if kind.startswith("timm"):
        x = block.norm1(x)  # Swin v1: pre-norm; Swinv2: post-norm, x̃ is the block input
    expected = x.double() @ ctx.atlas.layers[1].U[4][:, [0, 2]].double()
    if layer.form.qk_norm is not None:
        from qkdissect.projection import qk_norm_factors

        captured = capture_attention_inputs(ctx.loaded, pixels, [1])[1]
        from qkdissect.projection import windows_to_grid

        rho = windows_to_grid(qk_norm_factors(ctx.atlas, 1, captured)[0][:, 4:5], layer.form.windows)
        expected = expected / rho.transpose(1, 2)
    torch.testing.assert_close(tensors["q"].reshape(2, -1).double(), expected[0].T, rtol=1e-4, atol=1e-5)
    # shares over an image's windows sum to 1; the logit variance is the mean over every query row
    captured = capture_attention_inputs(ctx.loaded, pixels, [1])[1].double()
    shares = logit_variance_shares(ctx.atlas, 1, captured)
    torch.testing.assert_close(shares.mode_shares.sum(-1) + shares.bias_share, torch.ones_like(shares.bias_share))
    logits = logits_from_modes(ctx.atlas, 1, captured)
    allowed = valid_pairs(ctx.atlas, 1, captured)
    pairs = torch.ones_like(logits[:, 0], dtype=torch.bool) if allowed is None else allowed.expand_as(logits[:, 0])
    w = pairs[:, None].double()
    centred = (logits - (logits * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)) * w
    per_row = (centred ** 2).sum(-1) / w.sum(-1)
    torch.testing.assert_close(shares.logit_variance[0], per_row.permute(1, 0, 2).reshape(per_row.shape[1], -1).mean(-1))
    rank = run_rank(ctx, tmp_path / "rank", layers=[1], images=images[:1])
    assert len(rank.rows) == 6 * ctx.atlas.rank


def test_window_layers_are_refused_by_mining_and_preference(photos, tmp_path):
    ctx = prepare_view(_float32("timm-swin"))
    from qkdissect.mining import mine

    with pytest.raises(QKDissectError, match="windows"):
        mine(ctx.loaded, photos, tmp_path / "mined", atlas=ctx.atlas, layers=[0], sheets=False)


def test_mining_a_qk_norm_model_uses_the_normalised_maps(photos, tmp_path):
    from qkdissect.mining import mine

    loaded = _float32("timm-vit-qknorm")
    atlas = dissect(loaded, null_samples=20)
    result = mine(loaded, photos, tmp_path / "mined", top_k=2, batch_size=2, atlas=atlas, sheets=False,
                  sheet_modes=())
    assert result.meta["routes"] == ["x", "x"]
    preprocessing = loaded.preprocessing
    pixels = torch.stack([preprocessing(Image.open(p)) for p in sorted(photos.glob("*.png"))])
    n_prefix = len(loaded.adapter.prefix_tokens)
    best = {}
    for layer in range(2):
        x = capture_attention_inputs(loaded, pixels, [layer])[layer]
        q, k = project(atlas, layer, x)  # already divided by ρ
        q, k = q[:, :, n_prefix:], k[:, :, n_prefix:]
        best[layer] = (q.amax(2).clamp_min(0) * k.amax(2).clamp_min(0))  # (B, H, r), sign +
    for layer in range(2):
        expected = best[layer].amax(0)  # top-1 over images
        torch.testing.assert_close(result.topk.scores[layer, :, :, 0, 0], expected, rtol=1e-4, atol=1e-6)
    rho_q, _ = qk_norm_factors(atlas, 1, capture_attention_inputs(loaded, pixels, [1])[1])
    assert float(rho_q.std()) > 0  # the factors differ between tokens: dividing by them matters


@pytest.mark.parametrize("kind", ["timm-rope-mixed-ape", "timm-eva-gqa-qknorm", "timm-beit", "hf-llama"])
def test_preference_rows_are_the_models_own_and_modes_reproduce_them(kind):
    loaded, inputs, key_mask = make(kind)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    own = loaded.adapter.attention_probabilities(inputs)[1]
    x = capture_attention_inputs(loaded, inputs, [1])[1]
    tokens = torch.tensor([[1, 4, x.shape[1] - 1]] * x.shape[0])
    measured = attention_rows(loaded.adapter.attention_layers()[1], x, tokens)
    expected = torch.gather(own, 2, tokens[:, None, :, None].expand(-1, own.shape[1], -1, own.shape[-1]))
    if key_mask is not None:  # attention_rows sees no padding: compare the unpadded sequence
        measured, expected = measured[:1], expected[:1]
    torch.testing.assert_close(measured, expected.double(), rtol=1e-6, atol=1e-7)
    predicted = attention_rows_from_modes(atlas, 1, x, tokens, (None, 2))
    torch.testing.assert_close(predicted[0][:measured.shape[0]], measured, rtol=1e-6, atol=1e-7)
    assert float((predicted[1] - predicted[0]).abs().max()) > 1e-4  # two modes do not reproduce everything
    assert torch.allclose(predicted[1].sum(-1), torch.ones_like(predicted[1].sum(-1)))
    parts = mode_contributions(atlas, 1, x, 0)
    assert parts.shape == (x.shape[0], atlas.rank, x.shape[1], x.shape[1])


def test_report_shows_distance_curve_content_split_and_bias_share(tmp_path):
    from qkdissect.report import build_report

    for kind, expect in (("timm-rope-axial", ('id="content-share"', 'class="chart distance"')),
                         ("hf-beit", ('id="bias-share"',)), ("timm-swinv2", ('id="bias-share"',))):
        loaded, _, _ = make(kind)
        atlas = dissect(loaded, null_samples=20)
        atlas.save(tmp_path / f"atlas-{kind}")
        build_report(tmp_path / f"atlas-{kind}", out=tmp_path / f"report-{kind}")
        pages = sorted((tmp_path / f"report-{kind}" / "heads").glob("*.html"))
        assert len(pages) == sum(atlas.heads_in(i) for i in range(atlas.n_layers))
        html = pages[-1].read_text()
        for needle in expect:
            assert needle in html, (kind, needle)
        layer, head = atlas.n_layers - 1, atlas.heads_in(atlas.n_layers - 1) - 1
        info = atlas.head(layer, head).positional
        if "content_share" in info:
            assert f'id="content-share">{100 * info["content_share"]:.1f}%' in html
        if "bias_share" in info:
            assert f'id="bias-share">{100 * info["bias_share"]:.1f}%' in html
