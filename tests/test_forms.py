"""Every attention form of issue 13, rebuilt from the atlas, against the model's own eager attention
probabilities (float64, all token pairs, every parameter perturbed away from its initial value)."""

from __future__ import annotations

import pytest
import torch
from form_models import FAMILIES, make

from qkdissect import dissect
from qkdissect.atlas import ModeAtlas
from qkdissect.forms.io import same_form
from qkdissect.projection import attention_from_modes, capture_attention_inputs, logits_from_modes

EXPECTED_FORMS = {
    "timm-vit-qknorm": "qk-layer", "timm-siglip": "plain", "timm-naflex": "plain", "timm-eva02": "rope",
    "timm-rope-axial": "rope", "timm-rope-mixed-ape": "rope", "timm-dinov3": "rope",
    "timm-eva-gqa-qknorm": "rope+qk-layer", "timm-beit": "relative-bias", "timm-swin": "relative-bias+windows",
    "timm-swinv2": "qk-l2+relative-bias+windows", "hf-siglip": "plain", "hf-siglip2": "plain", "hf-mae": "plain",
    "hf-dinov3": "rope", "hf-beit": "relative-bias", "hf-data2vec": "relative-bias",
    "hf-swin": "relative-bias+windows", "hf-swinv2": "qk-l2+relative-bias+windows", "hf-gpt2": "causal",
    "hf-llama": "rope+causal", "hf-qwen2": "rope+causal", "hf-qwen3": "rope+qk-rms+causal",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    loaded, inputs, key_mask = make(request.param)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    return request.param, loaded, inputs, key_mask, atlas


def test_rebuilt_attention_equals_the_models_own(family):
    kind, loaded, inputs, key_mask, atlas = family
    assert atlas.meta["attention_forms"] == [EXPECTED_FORMS[kind]]
    captured = capture_attention_inputs(loaded, inputs)
    own = loaded.adapter.attention_probabilities(inputs)
    assert len(own) == atlas.n_layers
    for layer in range(atlas.n_layers):
        rebuilt = attention_from_modes(atlas, layer, captured[layer], key_mask=key_mask)
        assert rebuilt.shape == own[layer].shape
        assert float((rebuilt - own[layer].double()).abs().max()) < 1e-5, (kind, layer)
    # attention is far from uniform in some head, so the comparison is not vacuous
    assert max(float(p.max()) * p.shape[-1] for p in own) > 4.0


def test_logits_match_the_models_own_up_to_row_constants(family):
    """log p_ij − log p_ik = logit_ij − logit_ik: rebuilt logits, centred per query row, equal the
    model's (for rotary and QK-norm layers the rebuilt logits are the model's exact q̃·k̃)."""
    kind, loaded, inputs, key_mask, atlas = family
    captured = capture_attention_inputs(loaded, inputs)
    own = loaded.adapter.attention_probabilities(inputs)
    for layer in range(atlas.n_layers):
        logits = logits_from_modes(atlas, layer, captured[layer])
        p = own[layer].double()
        valid = p > 1e-30  # masked pairs (causal, padding, Swin's −100 shift mask) have p ≈ 0
        if key_mask is not None:
            valid &= key_mask[:, None, None, :]
        log_p = torch.where(valid, p.clamp_min(1e-300).log(), 0.0)
        rebuilt = torch.where(valid, logits, 0.0)
        count = valid.sum(-1, keepdim=True).clamp_min(1)
        centred = lambda t, valid=valid, count=count: torch.where(valid, t - t.sum(-1, keepdim=True) / count, 0.0)  # noqa: E731
        assert float((centred(rebuilt) - centred(log_p)).abs().max()) < 1e-5 * max(1.0, float(logits[valid].abs().max()))


def test_atlas_round_trip_keeps_every_form(family, tmp_path):
    kind, loaded, inputs, key_mask, atlas = family
    atlas.save(tmp_path)
    again = ModeAtlas.load(tmp_path)
    assert again.n_layers == atlas.n_layers and again.d_models == atlas.d_models
    for a, b in zip(atlas.layers, again.layers):
        assert same_form(a.form, b.form)
        for name in ("U", "S", "V", "key_bias", "G_q", "G_k", "head_b_q", "head_b_k"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y), name
        assert (a.positional is None) == (b.positional is None)
        if a.positional is not None:
            for name, value in a.positional.__dict__.items():
                other = getattr(b.positional, name)
                assert (value is None and other is None) or torch.equal(value, other), name
        assert a.scale == b.scale
    captured = capture_attention_inputs(loaded, inputs, [atlas.n_layers - 1])[atlas.n_layers - 1]
    torch.testing.assert_close(attention_from_modes(again, atlas.n_layers - 1, captured, key_mask=key_mask),
                               attention_from_modes(atlas, atlas.n_layers - 1, captured, key_mask=key_mask))
    document = __import__("json").loads((tmp_path / "atlas.json").read_text())
    assert document["format_version"] == 2
    assert [entry["kind"] for entry in document["layer_forms"]] == [EXPECTED_FORMS[kind]] * atlas.n_layers
    assert all(entry["exact"] for entry in document["layer_forms"])


def test_mode_contributions_and_residual_sum_to_the_logits(family):
    """Σ_k C_k + residual = the head's logits at every valid pair; the variance shares sum to 1 and the
    logit variance is that of the rebuilt logits centred over the valid keys of each query."""
    from qkdissect.projection import (
        logit_variance_shares,
        mode_contributions,
        project,
        qk_norm_factors,
        residual_logits,
        valid_pairs,
    )

    kind, loaded, inputs, key_mask, atlas = family
    layer = atlas.n_layers - 1
    x = capture_attention_inputs(loaded, inputs, [layer])[layer][:2]
    logits = logits_from_modes(atlas, layer, x)
    allowed = valid_pairs(atlas, layer, x)
    pairs = torch.ones(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool) if allowed is None else \
        allowed.expand(x.shape[0], -1, -1).clone()
    token_mask = None if key_mask is None else key_mask[:x.shape[0]]
    if token_mask is not None:
        pairs &= token_mask[:, :, None] & token_mask[:, None, :]
    for head in (0, atlas.heads_in(layer) - 1):
        total = mode_contributions(atlas, layer, x, head).sum(dim=1) + residual_logits(atlas, layer, x, head)
        assert float((total - logits[:, head])[pairs].abs().max()) < 1e-8 * max(1.0, float(logits[:, head][pairs].abs().max()))
    shares = logit_variance_shares(atlas, layer, x, token_mask)
    torch.testing.assert_close(shares.mode_shares.sum(-1) + shares.bias_share, torch.ones_like(shares.bias_share))
    w = pairs.double()[:, None]
    rows = w.sum(-1)
    centred = (logits - (torch.where(pairs[:, None], logits, 0.0)).sum(-1, keepdim=True) / rows.clamp_min(1)[..., None])
    per_row = (torch.where(pairs[:, None], centred, 0.0) ** 2).sum(-1) / rows.clamp_min(1)
    form = atlas.layers[layer].form
    group = 1 if form is None or form.windows is None else form.windows.n_windows  # windows of one image
    live = [per_row[b][:, rows[b, 0] > 0] for b in range(x.shape[0])]
    expected = torch.stack([torch.cat(live[i:i + group], dim=-1).mean(-1) for i in range(0, x.shape[0], group)])
    torch.testing.assert_close(shares.logit_variance, expected, rtol=1e-8, atol=1e-12)
    if form is not None and form.bias is not None:
        assert shares.relative_bias_share is not None and bool((shares.relative_bias_share.abs() > 0).any())
    if form is not None and form.qk_norm is not None:  # the maps are divided by the per-token factors
        q, _ = project(atlas, layer, x)
        rho_q, _ = qk_norm_factors(atlas, layer, x)
        from qkdissect.projection import atlas_input

        content = torch.einsum("bnd,hdr->bhnr", atlas_input(atlas, layer, x), atlas.layers[layer].U)
        torch.testing.assert_close(q, content / rho_q[..., None])
