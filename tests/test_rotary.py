"""Rotary and QK-norm maths against brute force: dense M(Δ) for every token pair built with timm's own
rotation code, the model's own q̃·k̃, the model's own QK-norm inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from form_models import D_HEAD, N_HEADS, make, perturb

from qkdissect import dissect
from qkdissect.adapters import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.forms import AttentionForm
from qkdissect.positional import offset_modes, parse_offset
from qkdissect.projection import attention_from_modes, capture_attention_inputs, logits_from_modes, qk_norm_factors

LAYER = 1


def _eva(rotate_half: bool, seed: int = 3, **extra):
    from timm.models.eva import Eva

    model = Eva(img_size=(24, 40), patch_size=8, embed_dim=N_HEADS * D_HEAD, depth=2, num_heads=N_HEADS,
                num_classes=0, use_rot_pos_emb=True, use_abs_pos_emb=False, attn_type="rope", qkv_bias=True,
                rope_rotate_half=rotate_half, rope_temperature=30.0, **extra)
    return wrap_model(perturb(model, seed))


def _rope(loaded):
    """The rotary tensor the blocks receive, (N_patch, 2·d_head) or (depth, H, N, 2·d_head)."""
    model = loaded.model
    with torch.no_grad():
        return model._pos_embed(model.patch_embed(torch.zeros(1, 3, 24, 40, dtype=torch.float64)))[1]


def _dense_rotations(loaded, layer: int) -> torch.Tensor:
    """R_t (H or 1, T, d_head, d_head) with R_t a = timm.apply_rot_embed_cat(a, rope_t); identity for prefix tokens."""
    from timm.layers import apply_rot_embed_cat

    rope = _rope(loaded)
    rope = rope[layer] if rope.dim() == 4 else rope[None]
    attn = loaded.model.blocks[layer].attn
    eye = torch.eye(D_HEAD, dtype=torch.float64)
    rotated = apply_rot_embed_cat(eye[None, None, :, :].expand(rope.shape[0], rope.shape[1], -1, -1),
                                  rope[:, :, None, :], half=attn.rotate_half)  # row a = R e_a
    R = rotated.transpose(-1, -2)  # column a = R e_a
    prefix = torch.eye(D_HEAD, dtype=torch.float64).expand(R.shape[0], loaded.model.num_prefix_tokens, -1, -1)
    return torch.cat([prefix, R], dim=1)


def _dense_pair_forms(loaded, layer: int) -> torch.Tensor:
    """M_ij = W_qᵀ R_iᵀ R_j W_k for every ordered pair, (H, T, T, d_model, d_model)."""
    raw = loaded.adapter.attention_layers()[layer].expanded()
    R = _dense_rotations(loaded, layer).expand(N_HEADS, -1, -1, -1)
    A = torch.einsum("htab,hbd->htad", R, raw.W_q)  # R_i W_q (rows: rotated head coordinates)
    B = torch.einsum("htab,hbd->htad", R, raw.W_k)
    return torch.einsum("hiam,hjan->hijmn", A, B)


@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "half"])
def test_pairing_convention_matches_the_models_own_qk(rotate_half):
    from timm.layers import apply_rot_embed_cat

    loaded = _eva(rotate_half)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    assert atlas.layers[LAYER].form.rotary.layout == ("half" if rotate_half else "interleaved")
    x = torch.randn(2, 3, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    captured = capture_attention_inputs(loaded, x, [LAYER])[LAYER]
    attn = loaded.model.blocks[LAYER].attn
    qkv = attn.qkv(captured).reshape(2, captured.shape[1], 3, N_HEADS, D_HEAD).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    n_prefix = loaded.model.num_prefix_tokens
    rope = _rope(loaded)
    q = torch.cat([q[:, :, :n_prefix], apply_rot_embed_cat(q[:, :, n_prefix:], rope, half=rotate_half)], dim=2)
    k = torch.cat([k[:, :, :n_prefix], apply_rot_embed_cat(k[:, :, n_prefix:], rope, half=rotate_half)], dim=2)
    own = (attn.scale * q @ k.transpose(-1, -2)).detach()
    torch.testing.assert_close(logits_from_modes(atlas, LAYER, captured), own, rtol=1e-10, atol=1e-10)
    # the other pairing gives different logits: the check above can fail
    modes = atlas.layers[LAYER]
    wrong = dataclasses.replace(modes.form.rotary, layout="interleaved" if rotate_half else "half")
    bad = dataclasses.replace(atlas, layers=tuple(dataclasses.replace(m, form=dataclasses.replace(m.form, rotary=wrong))
                                                  for m in atlas.layers))
    assert float((logits_from_modes(bad, LAYER, captured) - own.detach()).abs().max()) > 1e-3


def test_offset_average_distance_curve_and_content_share_equal_brute_force():
    loaded = _eva(False, rope_type="mixed")  # per-head learned frequencies
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    M = _dense_pair_forms(loaded, LAYER)  # (H, T, T, d, d)
    stats = atlas.layers[LAYER].positional
    # M̄ = E over all ordered token pairs (prefix tokens at θ = 0)
    M_bar = M.mean(dim=(1, 2))
    rebuilt = stats.U_bar @ torch.diag_embed(stats.S_bar) @ stats.V_bar.transpose(-1, -2)
    torch.testing.assert_close(rebuilt, M_bar, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.S_bar, torch.linalg.svdvals(M_bar)[:, :D_HEAD], rtol=1e-9, atol=1e-9)
    # content share = ‖M̄‖² / E‖M(Δ)‖²
    expected_share = (M_bar ** 2).sum((-1, -2)) / (M ** 2).sum((-1, -2)).mean(dim=(1, 2))
    torch.testing.assert_close(stats.content_share, expected_share, rtol=1e-9, atol=1e-12)
    assert bool(((stats.content_share > 0) & (stats.content_share < 1)).all())
    # C_h(d): average over patch pairs whose rounded distance is d
    n_prefix = loaded.model.num_prefix_tokens
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], -1).double()
    distance = torch.cdist(pos, pos).round()
    patches = M[:, n_prefix:, n_prefix:]
    for b, d in enumerate(stats.distances.round().long().tolist()):
        chosen = distance == d
        assert int(chosen.sum()) == int(stats.distance_pairs[b])
        avg = patches[:, chosen].mean(dim=1)
        expected = torch.diagonal(avg, dim1=-2, dim2=-1).sum(-1) / torch.linalg.svdvals(avg).sum(-1)
        torch.testing.assert_close(stats.distance_cosine[:, b], expected, rtol=1e-8, atol=1e-10)


def test_modes_at_an_offset_equal_the_dense_form_of_that_offset():
    loaded = _eva(True)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    M = _dense_pair_forms(loaded, LAYER)
    n_prefix = loaded.model.num_prefix_tokens
    # offset (2, 2): queries at grid (0, c), keys at (2, c + 2), c = 0..2, on the 3 × 5 grid
    at = offset_modes(atlas, LAYER, parse_offset("2,2"))
    assert at.pairs == 3
    pairs = [M[:, n_prefix + c, n_prefix + 10 + c + 2] for c in range(3)]
    rebuilt = at.U @ torch.diag_embed(at.S) @ at.V.transpose(-1, -2)
    torch.testing.assert_close(rebuilt, sum(pairs) / 3, rtol=1e-9, atol=1e-9)
    # the model's angles are linear in position: every pair at that offset has the same form (float32 tables)
    torch.testing.assert_close(rebuilt, pairs[1], rtol=0, atol=1e-6)
    zero = offset_modes(atlas, LAYER, (0.0, 0.0))  # |z|² = cos² + sin² of float32 tables: 1 to ~1e-7
    torch.testing.assert_close(zero.S, atlas.layers[LAYER].S, rtol=1e-6, atol=1e-10)
    with pytest.raises(QKDissectError, match="no pair of tokens"):
        offset_modes(atlas, LAYER, (5.0, 0.0))
    with pytest.raises(QKDissectError, match="coordinates"):
        offset_modes(atlas, LAYER, (1.0,))
    with pytest.raises(QKDissectError, match="numbers separated by commas"):
        parse_offset("up")


def test_rope_head_with_equal_query_and_key_weights_has_cosine_one():
    loaded = _eva(False, seed=5)
    attn = loaded.model.blocks[LAYER].attn
    width = N_HEADS * D_HEAD
    with torch.no_grad():
        attn.qkv.weight[width:2 * width] = attn.qkv.weight[:width]
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    assert torch.allclose(atlas.weighted_cosines[LAYER], torch.ones(N_HEADS, dtype=torch.float64), atol=1e-12)
    stats = atlas.layers[LAYER].positional
    assert float(stats.distances[0]) == 0.0
    assert torch.allclose(stats.distance_cosine[:, 0], torch.ones(N_HEADS, dtype=torch.float64), atol=1e-12)
    assert bool((stats.distance_cosine[:, -1] < 1 - 1e-6).all())  # rotation makes far pairs less similar


def test_text_rope_offsets_and_causal_average():
    loaded, inputs, mask = make("hf-llama")
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    table = atlas.layers[0].form.rotary
    assert table.pairs == "causal" and table.variable_length and table.layout == "half"
    # M̄ over causal pairs of the recorded context = Σ_d (L − d) M(−d) / Σ_d (L − d): key d tokens before the query
    L = table.n_tokens
    dense = lambda o: o.U @ torch.diag_embed(o.S) @ o.V.transpose(-1, -2)  # noqa: E731
    weights = torch.arange(L, 0, -1, dtype=torch.float64)
    total = sum(weights[d] * dense(offset_modes(atlas, 0, (-float(d),))) for d in range(L))
    torch.testing.assert_close(dense(offset_modes(atlas, 0, None)), total / weights.sum(), rtol=1e-8, atol=1e-10)
    with pytest.raises(QKDissectError, match="keys never after"):
        offset_modes(atlas, 0, (1.0,))
    stats = atlas.layers[0].positional
    assert int(stats.distance_pairs.sum()) == L * (L + 1) // 2  # every causal pair in exactly one bin


@pytest.mark.parametrize("kind", ["timm-vit-qknorm", "hf-qwen3", "timm-swinv2"])
def test_qk_norm_factors_equal_the_models_own(kind):
    loaded, inputs, _ = make(kind)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    captured = capture_attention_inputs(loaded, inputs, [LAYER])[LAYER]
    module = loaded.adapter.attention_modules()[LAYER]
    rho_q, rho_k = qk_norm_factors(atlas, LAYER, captured)
    if kind == "timm-swinv2":  # cosine attention: ρ = ‖q‖ of the raw q (qkv with q_bias)
        layer = loaded.adapter.attention_layers()[LAYER]
        q = torch.einsum("bnd,hed->bhne", captured, layer.W_q) + layer.b_q[None, :, None, :]
        torch.testing.assert_close(rho_q, q.norm(dim=-1), rtol=1e-10, atol=1e-12)
        return
    store = {}
    norm = module.q_norm
    handle = norm.register_forward_hook(lambda _m, args, _out: store.__setitem__("z", args[0].detach()))
    with torch.no_grad():
        loaded.adapter.forward(inputs)
    handle.remove()
    z = store["z"]
    if kind == "hf-qwen3":  # (B, N, H, d) RMSNorm input
        expected = torch.sqrt(z.pow(2).mean(-1) + norm.variance_epsilon).transpose(1, 2)
    else:  # (B, H, N, d) LayerNorm input
        expected = torch.sqrt(z.var(-1, unbiased=False) + norm.eps)
    torch.testing.assert_close(rho_q, expected, rtol=1e-10, atol=1e-12)
    assert rho_k.shape == rho_q.shape


def test_plain_layers_are_their_own_offset_modes_and_v1_atlases_load(tmp_path, timm_vit):
    import json

    atlas = dissect(timm_vit, null_samples=10)
    same = offset_modes(atlas, 0, (3.0, -2.0))
    assert torch.equal(same.U, atlas.layers[0].U)
    assert AttentionForm().is_plain and atlas.layers[0].form is None
    atlas.save(tmp_path)
    document = json.loads((tmp_path / "atlas.json").read_text())
    document["format_version"] = 1
    del document["layer_forms"]
    (tmp_path / "atlas.json").write_text(json.dumps(document))
    from qkdissect.atlas import ModeAtlas

    old = ModeAtlas.load(tmp_path)
    assert old.layers[0].form is None and torch.equal(old.layers[2].U, atlas.layers[2].U)
    x = capture_attention_inputs(timm_vit, torch.randn(1, 3, 40, 56), [2])[2]
    torch.testing.assert_close(attention_from_modes(old, 2, x), attention_from_modes(atlas, 2, x))


@pytest.mark.parametrize("shape, pairs, prefix", [((3, 5), "all", 2), ((17,), "causal", 0), ((30,), "all", 1)])
def test_distance_sums_by_correlation_equal_the_pairwise_sums(shape, pairs, prefix):
    """Arbitrary (not linear in position, not unit-modulus) token rotations: the FFT cross-correlation over the
    grid gives the same per-bin sums as visiting every pair."""
    from qkdissect.forms import RotaryTable
    from qkdissect.forms.rotary import distance_average, distance_edges, pairwise_distance_average, rotations

    generator = torch.Generator().manual_seed(0)
    T = int(torch.tensor(shape).prod())
    angles = torch.randn(2, T, 3, generator=generator, dtype=torch.float64) * 2
    cos = torch.cat([torch.ones(2, prefix, 3, dtype=torch.float64), 1.1 * angles.cos()], 1)
    sin = torch.cat([torch.zeros(2, prefix, 3, dtype=torch.float64), 1.1 * angles.sin()], 1)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    positions = torch.cat([torch.full((prefix, len(shape)), float("nan"), dtype=torch.float64),
                           grid.reshape(T, -1)])
    table = RotaryTable(cos=cos, sin=sin, layout="half", rotary_dim=6, positions=positions, pairs=pairs)
    z = rotations(table, table.n_tokens, 6)
    edges = distance_edges(table.positions)
    for fast, slow in zip(distance_average(z, table, edges), pairwise_distance_average(z, table, edges)):
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["timm-rope-mixed-ape", "timm-beit"])
def test_positional_statistics_in_parallel_threads_equal_one_thread(kind):
    """Layers' rotary / bias statistics run in parallel threads when torch has several: the same numbers as
    computed one layer after the other."""
    import qkdissect.decomposition as decomposition

    loaded, _, _ = make(kind, seed=5)
    threads = torch.get_num_threads()
    calls = []
    original = decomposition.thread_map
    try:
        torch.set_num_threads(1)
        serial = dissect(loaded, dtype="float64", null_samples=20)
        torch.set_num_threads(3)
        decomposition.thread_map = lambda fn, items, workers: calls.append(workers) or original(fn, items, workers)
        parallel = dissect(loaded, dtype="float64", null_samples=20)
    finally:
        decomposition.thread_map = original
        torch.set_num_threads(threads)
    assert calls and max(calls) >= 2  # the parallel path ran
    checked = 0
    for a, b in zip(serial.layers, parallel.layers):
        assert a.positional is not None and b.positional is not None
        for name, value in a.positional.__dict__.items():
            other = getattr(b.positional, name)
            assert (value is None) == (other is None), name
            if value is not None:
                assert torch.allclose(value.double(), other.double(), atol=1e-9), name
                checked += 1
    assert checked >= 2 * len(serial.layers)
