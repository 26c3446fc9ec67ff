"""The in-context regression transformer: forward pass vs a dense reference, hand-built models (one GD
step; KQ = ω·I on the x-block), the adapter (atlas reconstructs the model's own attention), spectra."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qkdissect
from qkdissect.decomposition import ModeAtlas
from qkdissect.dynamics.curves import staggering
from qkdissect.dynamics.incontext import make_prior_tasks, sample_episode
from qkdissect.dynamics.incontext.model import ICLBatch, ICLTransformer, icl_batch, icl_mask
from qkdissect.dynamics.incontext.train import (
    checkpoint_schedule,
    cosine_statistics,
    load_checkpoint,
    probe_icl,
    train_icl,
    weight_spectra,
)
from qkdissect.errors import QKDissectError
from qkdissect.projection import capture_attention_inputs, logits_from_modes

# distinct sizes: N_x = 3, N_y = 4 (d_model 7), 3 heads of width 5, context 6, 5 queries
N_X, N_Y, HEADS, D_HEAD, N_CTX = 3, 4, 3, 5, 6
QUERY_K = [0, 1, 3, 6, 2]


def _batch(seed: int = 0, dtype=torch.float64) -> ICLBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, N_CTX, N_X, generator=g, dtype=dtype)
    y = torch.randn(2, N_CTX, N_Y, generator=g, dtype=dtype)
    q = torch.randn(2, len(QUERY_K), N_X, generator=g, dtype=dtype)
    return icl_batch(x, y, q, QUERY_K)


def _model(attention: str, layers: int = 1, seed: int = 1) -> ICLTransformer:
    return ICLTransformer(N_X, N_Y, n_layers=layers, n_heads=HEADS, d_head=D_HEAD, attention=attention,
                          context=N_CTX, init_scale=2.0, seed=seed).double().eval()


def _dense_reference(model: ICLTransformer, batch: ICLBatch) -> torch.Tensor:
    """Independent forward pass with the full (N + Q)² masked attention."""
    z, mask = batch.tokens, icl_mask(batch.n_context, batch.query_k)
    for layer in model.layers:
        q = torch.einsum("btd,hed->bhte", z, layer.W_q)
        k = torch.einsum("btd,hed->bhte", z, layer.W_k)
        v = torch.einsum("btd,hed->bhte", z, layer.W_v)
        logits = q @ k.transpose(-1, -2) / np.sqrt(D_HEAD)
        if model.attention == "softmax":
            a = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        else:
            a = logits * mask / N_CTX
        z = z + torch.einsum("bhts,bhse,hde->btd", a, v, layer.W_o)
    return z


@pytest.mark.parametrize("attention", ["softmax", "linear"])
@pytest.mark.parametrize("layers", [1, 2])
def test_forward_matches_dense_masked_attention(attention: str, layers: int) -> None:
    model, batch = _model(attention, layers), _batch()
    ref = _dense_reference(model, batch)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), ref, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model.predict(batch), ref[:, N_CTX:, N_X:], atol=1e-10, rtol=1e-10)


def test_queries_do_not_see_each_other_or_later_context() -> None:
    model, batch = _model("softmax", layers=2), _batch()
    with torch.no_grad():
        full = model.predict(batch)
        one = model.predict(ICLBatch(batch.tokens[:, : N_CTX + 1], N_CTX, batch.query_k[:1]))
        torch.testing.assert_close(full[:, :1], one)
        changed = batch.tokens.clone()
        changed[:, 3:N_CTX] += 5.0  # context samples 4..6: invisible to queries with k <= 3
        moved = model.predict(ICLBatch(changed, N_CTX, batch.query_k))
    sees = torch.as_tensor(QUERY_K) > 3
    torch.testing.assert_close(moved[:, ~sees], full[:, ~sees])
    assert (moved[:, sees] - full[:, sees]).abs().max() > 1e-3


def _gd_model(a: float, omega_sign: float = 1.0) -> ICLTransformer:
    """One linear-attention head implementing one gradient step: W_Q = a[I 0], W_K = ±a[I 0] (so the
    x–x block of W_QᵀW_K is ±a²·I), W_V copies y, W_O writes it to the y-slot; other heads zero."""
    m = ICLTransformer(N_X, N_Y, n_layers=1, n_heads=HEADS, d_head=D_HEAD, attention="linear", context=N_CTX,
                       init_scale=0.0).double()
    with torch.no_grad():
        layer = m.layers[0]
        layer.W_q[0, :N_X, :N_X] = a * torch.eye(N_X, dtype=torch.float64)
        layer.W_k[0, :N_X, :N_X] = omega_sign * a * torch.eye(N_X, dtype=torch.float64)
        layer.W_v[0, :N_Y, N_X:] = torch.eye(N_Y)
        layer.W_o[0, N_X:, :N_Y] = torch.eye(N_Y)
    return m.eval()


def test_hand_built_gd_step_and_probe() -> None:
    a = 1.3
    model = _gd_model(a)
    task = make_prior_tasks([2.0, 1.0, 0.5], N_X, N_Y, n_tasks=4, seed=2)
    probe = probe_icl(model, task, [0, 2, 6], probe_scale=0.7, seed=3)
    x, y = sample_episode(task, N_CTX, generator=torch.Generator().manual_seed(3))  # the probe's samples
    c = a * a / np.sqrt(D_HEAD) / N_CTX  # scale · a² / N
    for i, k in enumerate([0, 2, 6]):
        expected = c * y[:, :k].transpose(-1, -2) @ x[:, :k]  # Ŵ_k = (a²/(√d N)) Σ_{j<k} y_j x_jᵀ
        np.testing.assert_allclose(probe.W_hat[i], expected.numpy(), atol=1e-6)
    assert np.all(probe.linearity_r2[1:] > 1 - 1e-9)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cosines_of_hand_built_omega_identity_block(sign: float) -> None:
    model = _gd_model(0.9, sign)
    with torch.no_grad():  # make the full matrix differ from ω·I: random y-rows/columns in head 0
        g = torch.Generator().manual_seed(7)
        model.layers[0].W_q[0, :, N_X:] = torch.randn(D_HEAD, N_Y, generator=g, dtype=torch.float64)
        model.layers[0].W_k[0, :, N_X:] = torch.randn(D_HEAD, N_Y, generator=g, dtype=torch.float64)
    stats = cosine_statistics(model, null_samples=50)
    head = stats["heads"][0]
    assert head["xx_weighted_cosine"] == pytest.approx(sign, abs=1e-9)
    assert np.allclose(head["xx_cosines"][:N_X], sign, atol=1e-9)
    assert head["omega"] == pytest.approx(sign * 0.81, abs=1e-12)
    assert head["xx_relative_distance_from_omega_identity"] == pytest.approx(0.0, abs=1e-12)
    M = (model.layers[0].W_q[0].T @ model.layers[0].W_k[0]).detach().numpy()  # dense, independent
    full = np.trace(M) / np.linalg.svd(M, compute_uv=False).sum()
    assert head["full_weighted_cosine"] == pytest.approx(full, abs=1e-9)
    assert abs(head["full_weighted_cosine"] - sign) > 0.1  # reported separately, and different
    assert stats["atlas"].weighted_cosines[0, 0] == pytest.approx(full, abs=1e-9)
    (group,) = stats["sign_groups"]  # the other heads are zero: one group, head 0
    assert group["heads"] == [0] and group["sign"] == sign
    assert group["weighted_cosine"] == pytest.approx(sign, abs=1e-9)
    assert group["relative_distance_from_omega_identity"] == pytest.approx(0.0, abs=1e-12)


def test_heads_that_split_the_x_space_sum_to_omega_identity() -> None:
    model = _gd_model(1.0)
    with torch.no_grad():  # head 0 keeps x-coordinates 0, 1; head 1 takes coordinate 2: M_0 + M_1 = I
        model.layers[0].W_q[0, 2, 2] = 0.0
        model.layers[0].W_k[0, 2, 2] = 0.0
        model.layers[0].W_q[1, 0, 2] = 1.0
        model.layers[0].W_k[1, 0, 2] = 1.0
    stats = cosine_statistics(model, null_samples=20)
    heads = stats["heads"]
    assert heads[0]["xx_relative_distance_from_omega_identity"] > 0.3
    assert heads[1]["xx_relative_distance_from_omega_identity"] > 0.3
    assert heads[0]["xx_weighted_cosine"] == pytest.approx(1.0) and heads[1]["xx_weighted_cosine"] == pytest.approx(1.0)
    (group,) = stats["sign_groups"]
    assert group["heads"] == [0, 1] and group["omega"] == pytest.approx(1.0)
    assert group["relative_distance_from_omega_identity"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_adapter_atlas_reconstructs_the_models_attention(attention: str, tmp_path) -> None:
    model, batch = _model(attention, layers=2), _batch(seed=4)
    loaded = qkdissect.adapters.wrap_model(model)
    assert loaded.family == "icl-transformer" and loaded.adapter.modality == "text"
    atlas = qkdissect.dissect(model, dtype=torch.float64, null_samples=20)
    atlas.save(tmp_path / "atlas")
    atlas = ModeAtlas.load(tmp_path / "atlas")
    assert atlas.meta["family"] == "icl-transformer" and atlas.meta["attention"] == attention
    own = loaded.adapter.attention_probabilities(batch)
    xs = capture_attention_inputs(model, batch, stop_early=False)
    mask = batch.mask
    for l in range(2):
        W = model.layers[l]
        M = torch.einsum("hed,hef->hdf", W.W_q, W.W_k)
        recon = (atlas.layers[l].U * atlas.layers[l].S[:, None, :]) @ atlas.layers[l].V.transpose(-1, -2)
        torch.testing.assert_close(recon, M.detach(), atol=1e-10, rtol=1e-10)
        logits = logits_from_modes(atlas, l, xs[l])
        if attention == "softmax":
            pred = logits.masked_fill(~mask, float("-inf")).softmax(-1)
        else:
            pred = logits * mask / N_CTX
        torch.testing.assert_close(pred, own[l], atol=1e-10, rtol=1e-8)


def test_adapter_reconstructs_a_trained_models_attention(tmp_path) -> None:
    train = make_prior_tasks([2.0, 1.0, 0.5], N_X, N_Y, n_tasks=64, seed=1)
    model = ICLTransformer(N_X, N_Y, n_layers=1, n_heads=HEADS, d_head=D_HEAD, context=N_CTX, seed=0)
    log = train_icl(model, train, train, n_steps=40, batch=8, lr=1e-2, n_checkpoints=4,
                    checkpoint_dir=tmp_path / "ck", seed=2)
    assert log.test_loss[-1] < log.test_loss[0]
    batch = _batch(seed=5, dtype=torch.float32)
    atlas = qkdissect.dissect(model, null_samples=20)
    own = qkdissect.adapters.wrap_model(model).adapter.attention_probabilities(batch)[0]
    x = capture_attention_inputs(model, batch)[0]
    pred = logits_from_modes(atlas, 0, x).masked_fill(~batch.mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(pred, own, atol=1e-5, rtol=1e-4)
    # checkpoints reload to the weights they were written from
    last = tmp_path / "ck" / log.checkpoint_files[-1]
    fresh = load_checkpoint(last, ICLTransformer(N_X, N_Y, n_layers=1, n_heads=HEADS, d_head=D_HEAD,
                                                 context=N_CTX, seed=9))
    for p, q in zip(fresh.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)


def test_weight_spectra_match_dense_svd() -> None:
    model = _model("softmax", layers=2)
    sp = weight_spectra([model, model.state_dict()], N_X)
    assert sp["kq"].shape == (2, 2, HEADS, D_HEAD) and sp["kq_xx"].shape == (2, 2, HEADS, N_X)
    for l, layer in enumerate(model.layers):
        Wq, Wk, Wv, Wo = (w.detach().numpy() for w in (layer.W_q, layer.W_k, layer.W_v, layer.W_o))
        for h in range(HEADS):
            kq = Wq[h].T @ Wk[h]
            ov = Wo[h] @ Wv[h]
            np.testing.assert_allclose(sp["kq"][0, l, h], np.linalg.svd(kq, compute_uv=False)[:D_HEAD], atol=1e-10)
            np.testing.assert_allclose(sp["kq_xx"][1, l, h], np.linalg.svd(kq[:N_X, :N_X], compute_uv=False),
                                       atol=1e-10)
            np.testing.assert_allclose(sp["ov_yy"][0, l, h], np.linalg.svd(ov[N_X:, N_X:], compute_uv=False),
                                       atol=1e-10)
            np.testing.assert_allclose(sp["kq_xx_diag"][0, l, h], np.diag(kq[:N_X, :N_X]), atol=1e-12)


def test_staggering_of_known_sigmoids() -> None:
    steps = np.linspace(0, 1000, 501)
    t_half = np.array([100.0, 300.0, 700.0])
    final = np.array([3.0, 2.0, 1.0])
    vals = final / (1 + np.exp(-(steps[:, None] - t_half) / 20.0))
    st = staggering(steps, vals[:, None, :])  # one group of three
    np.testing.assert_allclose(st["half_times"][0], t_half, atol=1.0)
    assert st["index"][0] == pytest.approx(t_half.std() / t_half.mean(), rel=1e-2)
    assert st["largest_first"] == [True]
    smallest_first = final[::-1] / (1 + np.exp(-(steps[:, None] - t_half) / 20.0))
    assert staggering(steps, smallest_first[:, None, :])["largest_first"] == [False]
    tiny = staggering(steps, vals * np.array([1.0, 1.0, 0.01]))  # below 10% of the largest: left out
    assert np.isnan(tiny["half_times"][2]) and tiny["index"] == pytest.approx(100 / 200, rel=1e-2)


def test_schedule_and_bad_inputs() -> None:
    sched = checkpoint_schedule(1000, 30)
    assert sched[0] == 0 and sched[-1] == 1000 and (np.diff(sched) > 0).all()
    assert (sched <= 250).sum() > (sched > 250).sum()  # denser early
    with pytest.raises(QKDissectError, match="attention"):
        ICLTransformer(2, 2, attention="cosine")
    with pytest.raises(QKDissectError, match="query_k"):
        icl_mask(4, [5])
    model = _model("linear")
    with pytest.raises(QKDissectError, match="N_x"):
        probe_icl(model, make_prior_tasks([1.0], N_X + 1, N_Y, n_tasks=2))
    with pytest.raises(QKDissectError, match="ICLBatch"):
        qkdissect.adapters.wrap_model(model).adapter.forward(torch.zeros(1, 3, N_X + N_Y))
    tasks = make_prior_tasks([1.0], N_X, N_Y, n_tasks=4)
    small = ICLTransformer(N_X, N_Y, n_heads=1, context=4)
    with pytest.raises(QKDissectError, match="optimizer"):
        train_icl(small, tasks, tasks, n_steps=2, optimizer="rmsprop")
    before = small.layers[0].W_q.detach().clone()
    log = train_icl(small, tasks, tasks, n_steps=3, batch=2, lr=0.5, optimizer="sgd", n_checkpoints=2)
    assert log.steps.tolist() == checkpoint_schedule(3, 2).tolist() and not torch.equal(before, small.layers[0].W_q)
