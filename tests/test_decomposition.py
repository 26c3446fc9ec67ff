"""The factored SVD against dense linear algebra and the models' own attention."""

from __future__ import annotations

import pytest
import torch
from helpers import D_HEAD, D_MODEL, N_HEADS, N_LAYERS, image_batch, make_timm_vit, text_batch

from qkdissect import dissect, factored_svd
from qkdissect.adapters import AttentionLayer, wrap_model
from qkdissect.decomposition import fold_layer_norm, near_degenerate
from qkdissect.projection import attention_from_modes, capture_attention_inputs, logits_from_modes


def dense_M(layer: AttentionLayer) -> torch.Tensor:
    """(heads, d_model, d_model) = W_qᵀ W_k per head, dense, float64."""
    expanded = layer.expanded()
    return expanded.W_q.double().transpose(-1, -2) @ expanded.W_k.double()


def inputs_for(loaded):
    return text_batch() if loaded.adapter.modality == "text" else image_batch(hw=(40, 40) if loaded.family.startswith("hf") else (40, 56))


def check_atlas_against_dense(loaded):
    atlas = dissect(loaded, dtype="float64", null_samples=50)
    assert (atlas.n_layers, atlas.n_heads, atlas.d_model, atlas.rank) == (N_LAYERS, N_HEADS, D_MODEL, D_HEAD)
    eye = torch.eye(D_HEAD, dtype=torch.float64)
    for index, layer in enumerate(loaded.adapter.attention_layers()):
        modes = atlas.layers[index]
        M = dense_M(layer)
        rebuilt = (modes.U * modes.S[:, None, :]) @ modes.V.transpose(-1, -2)
        assert (torch.linalg.matrix_norm(rebuilt - M) / torch.linalg.matrix_norm(M)).max() < 1e-5
        assert torch.allclose(modes.U.transpose(-1, -2) @ modes.U, eye.expand(N_HEADS, -1, -1), atol=1e-10)
        assert torch.allclose(modes.V.transpose(-1, -2) @ modes.V, eye.expand(N_HEADS, -1, -1), atol=1e-10)
        assert (modes.S[:, :-1] >= modes.S[:, 1:]).all()
        assert torch.allclose(modes.S, torch.linalg.svdvals(M)[:, :D_HEAD], rtol=1e-9, atol=1e-12)
        # sign rule: the largest-magnitude entry of each u_k is positive
        pivots = modes.U.gather(1, modes.U.abs().argmax(dim=1, keepdim=True))
        assert (pivots > 0).all()
        # key bias W_kᵀ b_q
        expected_bias = torch.einsum("hd,hdm->hm", layer.b_q.double(), layer.expanded().W_k.double())
        assert torch.allclose(modes.key_bias, expected_bias, atol=1e-12)
    return atlas


def check_reconstruction(loaded, atlas, fold_ln=False):
    inputs = inputs_for(loaded)
    captured = capture_attention_inputs(loaded, inputs)
    own = loaded.adapter.attention_probabilities(inputs)
    key_mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    for index in range(atlas.n_layers):
        rebuilt = attention_from_modes(atlas, index, captured[index].double(), key_mask=key_mask)
        assert rebuilt.shape == own[index].shape
        assert (rebuilt - own[index].double()).abs().max() < 1e-5
    # attention is far from uniform, so the comparison is not vacuous
    assert max(float(p.max()) * p.shape[-1] for p in own) > 5.0


def test_timm_dense_and_reconstruction(timm_vit):
    atlas = check_atlas_against_dense(timm_vit)
    check_reconstruction(timm_vit, atlas)
    assert atlas.meta["prefix_tokens"] == ["cls", "register", "register"]


def test_hf_dense_and_reconstruction(hf_model):
    atlas = check_atlas_against_dense(hf_model)
    check_reconstruction(hf_model, atlas)


def check_folded(loaded):
    plain = dissect(loaded, dtype="float64", null_samples=20)
    folded = dissect(loaded, dtype="float64", fold_ln=True, null_samples=20)
    assert folded.meta["ln_folded"] and not plain.meta["ln_folded"]
    check_reconstruction(loaded, folded)
    layer = loaded.adapter.attention_layers()[1]
    gamma = layer.ln_weight.double()
    M_folded = (folded.layers[1].U * folded.layers[1].S[:, None, :]) @ folded.layers[1].V.transpose(-1, -2)
    assert torch.allclose(M_folded, gamma[:, None] * dense_M(layer) * gamma[None, :], atol=1e-9)


def test_folded_layernorm_timm(timm_vit):
    check_folded(timm_vit)


def test_folded_layernorm_hf(hf_model):
    check_folded(hf_model)


def test_fold_layer_norm_formula():
    generator = torch.Generator().manual_seed(0)
    W_q, W_k = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    b_q, b_k = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    gamma, beta = torch.randn(5, generator=generator), torch.randn(5, generator=generator)
    layer = AttentionLayer(W_q, W_k, b_q, b_k, 0.5, gamma, beta)
    folded = fold_layer_norm(layer)
    n = torch.randn(7, 5, generator=generator)
    x = gamma * n + beta
    for W, b, Wf, bf in ((W_q, b_q, folded.W_q, folded.b_q), (W_k, b_k, folded.W_k, folded.b_k)):
        assert torch.allclose(torch.einsum("hdm,nm->hnd", W, x) + b[:, None], torch.einsum("hdm,nm->hnd", Wf, n) + bf[:, None], atol=1e-5)
    assert folded.ln_weight is None and folded.ln_bias is None


def test_logits_equal_model_logits_up_to_row_constants(timm_vit):
    """Without the softmax: mode logits minus the model's q·k logits is constant along keys."""
    atlas = dissect(timm_vit, dtype="float64", null_samples=10)
    x = capture_attention_inputs(timm_vit, image_batch())[2].double()
    layer = timm_vit.adapter.attention_layers()[2]
    q = torch.einsum("bnd,hed->bhne", x, layer.W_q.double()) + layer.b_q.double()[None, :, None]
    k = torch.einsum("bnd,hed->bhne", x, layer.W_k.double()) + layer.b_k.double()[None, :, None]
    direct = layer.scale * q @ k.transpose(-1, -2)
    difference = logits_from_modes(atlas, 2, x) - direct
    assert (difference - difference[..., :1]).abs().max() < 1e-9


def test_factored_svd_batches_and_matches_dense_with_distinct_shapes():
    generator = torch.Generator().manual_seed(1)
    W_q = torch.randn(3, 2, 7, 19, generator=generator, dtype=torch.float64)
    W_k = torch.randn(3, 2, 7, 19, generator=generator, dtype=torch.float64)
    U, S, V = factored_svd(W_q, W_k)
    assert U.shape == (3, 2, 19, 7) and S.shape == (3, 2, 7) and V.shape == (3, 2, 19, 7)
    M = W_q.transpose(-1, -2) @ W_k
    assert torch.allclose((U * S.unsqueeze(-2)) @ V.transpose(-1, -2), M, atol=1e-10)
    # V holds right singular vectors as columns: M v_k = σ_k u_k and Mᵀ u_k = σ_k v_k
    assert torch.allclose(M @ V, U * S.unsqueeze(-2), atol=1e-10)
    assert torch.allclose(M.transpose(-1, -2) @ U, V * S.unsqueeze(-2), atol=1e-10)


def test_factored_svd_in_parallel_chunks_equals_each_head_alone(monkeypatch):
    """A large CPU batch is split over threads; every head (rank-deficient ones included) must come out as it
    does decomposed on its own, in any batch shape."""
    import qkdissect.factored as factored

    generator = torch.Generator().manual_seed(2)
    W_q = torch.randn(5, 9, 6, 23, generator=generator, dtype=torch.float64)  # 45 heads: 2–3 chunks
    W_k = torch.randn(5, 9, 6, 23, generator=generator, dtype=torch.float64)
    W_q[1, 3] = 0.0  # rank 0
    W_k[4, 8, 2:] = 0.0  # rank 2
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        chunks = []
        monkeypatch.setattr(factored, "_factored_svd",
                            lambda a, b, real=factored._factored_svd: chunks.append(a.shape[0]) or real(a, b))
        U, S, V = factored_svd(W_q, W_k)
    finally:
        torch.set_num_threads(threads)
    assert len(chunks) == 2 and sum(chunks) == 45  # min(3 threads, 45 // 16) chunks
    assert U.shape == (5, 9, 23, 6) and S.shape == (5, 9, 6) and V.shape == (5, 9, 23, 6)
    for layer in range(5):
        for head in range(9):
            U1, S1, V1 = factored._factored_svd(W_q[layer, head], W_k[layer, head])
            assert torch.allclose(S[layer, head], S1, atol=1e-12)
            rank = int((S1 > 1e-9 * max(float(S1[0]), 1e-300)).sum())
            assert torch.allclose(U[layer, head, :, :rank], U1[:, :rank], atol=1e-10)
            assert torch.allclose(V[layer, head, :, :rank], V1[:, :rank], atol=1e-10)
    M = W_q.transpose(-1, -2) @ W_k
    assert torch.allclose((U * S.unsqueeze(-2)) @ V.transpose(-1, -2), M, atol=1e-10)
    assert float(S[1, 3].abs().max()) == 0.0 and float(S[4, 8, 2:].max()) < 1e-10


def test_float32_default_and_float64_agree(timm_vit):
    a32 = dissect(timm_vit, null_samples=10)
    a64 = dissect(timm_vit, dtype="float64", null_samples=10)
    assert a32.layers[0].U.dtype == torch.float32 and a32.meta["dtype"] == "float32"
    assert torch.allclose(a32.weighted_cosines.double(), a64.weighted_cosines, atol=1e-5)
    assert torch.allclose(a32.singular_values.double(), a64.singular_values, rtol=1e-4)


def test_near_degenerate_singular_values_are_reported():
    S = torch.tensor([[3.0, 2.0, 2.0 + 1e-6, 1.0], [4.0, 3.0, 2.0, 1.0]])
    mask = near_degenerate(S, 1e-3)
    assert mask.tolist() == [[False, True, False], [False, False, False]]


def test_identity_head_has_degenerate_modes_listed():
    model = make_timm_vit(seed=5, depth=1)
    with torch.no_grad():
        width = N_HEADS * D_HEAD
        W_q = model.blocks[0].attn.qkv.weight[:width]
        model.blocks[0].attn.qkv.weight[width : 2 * width] = W_q.clone()  # W_k = W_q: M = W_qᵀW_q
        model.blocks[0].attn.qkv.weight[:D_HEAD] = torch.eye(D_HEAD, D_MODEL)  # head 0: W_q = [I 0]
        model.blocks[0].attn.qkv.weight[width : width + D_HEAD] = torch.eye(D_HEAD, D_MODEL)
    atlas = dissect(wrap_model(model), dtype="float64", null_samples=10)
    head = atlas.head(0, 0)
    assert head.near_degenerate == tuple(range(D_HEAD - 1))
    assert head.weighted_cosine == pytest.approx(1.0, abs=1e-12)


def test_plain_module_and_gqa_expansion():
    layer = AttentionLayer(torch.randn(4, 3, 10), torch.randn(2, 3, 10), None, None, 1.0, kv_head_of=(0, 0, 1, 1))
    expanded = layer.expanded()
    assert expanded.W_k.shape == (4, 3, 10)
    assert torch.equal(expanded.W_k[1], layer.W_k[0]) and torch.equal(expanded.W_k[2], layer.W_k[1])
