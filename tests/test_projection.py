"""Query/key maps, mode contributions and logit-variance shares against dense computations and
the model's own q, k and attention."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import IMAGE_HW, N_HEADS, PATCH, image_batch, text_batch

from qkdissect import dissect
from qkdissect.adapters import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.projection import (
    capture_attention_inputs,
    key_bias_logits,
    logit_variance_shares,
    mode_contributions,
    split_tokens,
)
from qkdissect.views import scores_from_maps

LAYER = 1


def _double(loaded):
    return wrap_model(copy.deepcopy(loaded.model).double(), spec=loaded.spec + "-f64")


def _inputs(loaded, dtype=torch.float64):
    if loaded.adapter.modality == "text":
        batch = text_batch(batch=2, tokens=9)
        return batch, batch["attention_mask"].bool()
    return image_batch(2, hw=loaded.preprocessing.image_size).to(dtype), None


def _model_qk(loaded, layer, inputs):
    """The model's own per-head q and k at ``layer`` (B, H, N, d_head), read from its Linear outputs."""
    module = loaded.adapter.attention_modules()[layer]
    store = {}
    if hasattr(module, "qkv"):  # timm: one fused Linear, order q, k, v
        handle = module.qkv.register_forward_hook(lambda _m, _i, out: store.__setitem__("qkv", out))
        handles = [handle]
    else:
        from qkdissect.adapters.hf import find_qk

        _, q_linear, k_linear = find_qk(module)
        handles = [q_linear.register_forward_hook(lambda _m, _i, out: store.__setitem__("q", out)),
                   k_linear.register_forward_hook(lambda _m, _i, out: store.__setitem__("k", out))]
    try:
        with torch.no_grad():
            loaded.adapter.forward(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if "qkv" in store:
        width = store["qkv"].shape[-1] // 3
        store["q"], store["k"] = store["qkv"][..., :width], store["qkv"][..., width:2 * width]
    B, N, width = store["q"].shape
    split = lambda t: t.reshape(B, N, N_HEADS, width // N_HEADS).transpose(1, 2)  # noqa: E731
    return split(store["q"]), split(store["k"])


def _centre(logits, key_mask):
    """Subtract each query row's mean over valid keys; zero out invalid keys."""
    if key_mask is None:
        return logits - logits.mean(dim=-1, keepdim=True)
    w = key_mask[:, None, None, :].double()
    mean = (logits * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True)
    return (logits - mean) * w


def _check_mode_sum(loaded):
    loaded = _double(loaded)
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    inputs, mask = _inputs(loaded)
    x = capture_attention_inputs(loaded, inputs, [LAYER])[LAYER]
    q, k = _model_qk(loaded, LAYER, inputs)
    model_logits = atlas.scale * torch.einsum("bhpe,bhqe->bhpq", q, k)
    for head in range(N_HEADS):
        from_modes = mode_contributions(atlas, LAYER, x, head).sum(dim=1) + key_bias_logits(atlas, LAYER, x, head)[:, None, :]
        expected = _centre(model_logits[:, head:head + 1], mask)[:, 0]
        got = _centre(from_modes[:, None], mask)[:, 0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    # and the softmax of the mode sum is the model's own attention
    probabilities = loaded.adapter.attention_probabilities(inputs)[LAYER]
    logits = torch.stack([mode_contributions(atlas, LAYER, x, h).sum(1) + key_bias_logits(atlas, LAYER, x, h)[:, None]
                          for h in range(N_HEADS)], dim=1)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(logits.softmax(-1), probabilities, rtol=1e-5, atol=1e-7)


def test_mode_sum_reproduces_timm_logits(timm_vit):
    _check_mode_sum(timm_vit)


def test_mode_sum_reproduces_hf_logits(hf_model):
    _check_mode_sum(hf_model)


def test_mode_sum_with_folded_layer_norm(timm_vit):
    loaded = _double(timm_vit)
    folded = dissect(loaded, fold_ln=True, dtype="float64", null_samples=10)
    plain = dissect(loaded, dtype="float64", null_samples=10)
    x = capture_attention_inputs(loaded, image_batch(1).double(), [LAYER])[LAYER]
    for head in (0, 3):
        a = mode_contributions(folded, LAYER, x, head).sum(1) + key_bias_logits(folded, LAYER, x, head)[:, None]
        b = mode_contributions(plain, LAYER, x, head).sum(1) + key_bias_logits(plain, LAYER, x, head)[:, None]
        torch.testing.assert_close(a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True), rtol=1e-6, atol=1e-8)


def test_split_tokens_grid_and_errors():
    rows, cols = IMAGE_HW[0] // PATCH, IMAGE_HW[1] // PATCH  # 5 × 7, not square
    values = torch.arange(2 * 3 * (3 + rows * cols)).reshape(2, 3, 3 + rows * cols)
    prefix, grid = split_tokens(values, 3, (rows, cols))
    assert prefix.shape == (2, 3, 3) and grid.shape == (2, 3, rows, cols)
    assert grid[1, 2, 2, 4] == values[1, 2, 3 + 2 * cols + 4]  # row-major
    with pytest.raises(QKDissectError, match="do not fill"):
        split_tokens(values, 2, (rows, cols))
    with pytest.raises(QKDissectError, match="prefix"):
        split_tokens(values, 99)


def _brute_force_shares(atlas, layer, x, mask):
    """Dense: every mode's N×N contribution, centred over valid keys, inner products with the total."""
    B, N, _ = x.shape
    w = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    shares = torch.zeros(B, atlas.n_heads, atlas.rank, dtype=torch.float64)
    bias_share = torch.zeros(B, atlas.n_heads, dtype=torch.float64)
    variance = torch.zeros(B, atlas.n_heads, dtype=torch.float64)
    for b in range(B):
        valid = w[b]
        xb = x[b:b + 1, valid]
        for head in range(atlas.n_heads):
            parts = mode_contributions(atlas, layer, xb, head)[0]  # (r, n, n)
            bias = key_bias_logits(atlas, layer, xb, head)[0][None, :].expand(parts.shape[1], -1)
            parts = torch.cat([parts, bias[None]])
            parts = parts - parts.mean(dim=-1, keepdim=True)
            total = parts.sum(0)
            inner = (parts * total).sum(dim=(1, 2)) / (total * total).sum()
            shares[b, head], bias_share[b, head] = inner[:-1], inner[-1]
            variance[b, head] = (total * total).mean()
    return shares, bias_share, variance


@pytest.mark.parametrize("kind", ["image", "image-patches", "text"])
def test_logit_variance_shares_match_dense(kind, timm_vit):
    from helpers import make_hf

    loaded = timm_vit if kind.startswith("image") else wrap_model(make_hf("bert", seed=3))
    atlas = dissect(loaded, dtype="float64", null_samples=10)
    inputs = image_batch(2) if kind.startswith("image") else text_batch(2, 11)
    x = capture_attention_inputs(loaded, inputs, [LAYER])[LAYER]
    mask = None
    if kind == "text":
        mask = inputs["attention_mask"].bool()
    elif kind == "image-patches":
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        mask[:, :3] = False
    got = logit_variance_shares(atlas, LAYER, x, mask)
    shares, bias_share, variance = _brute_force_shares(atlas, LAYER, x.double(), mask)
    torch.testing.assert_close(got.mode_shares, shares, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.bias_share, bias_share, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got.logit_variance, variance, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.mode_shares.sum(-1) + got.bias_share, torch.ones_like(got.bias_share))


def test_logit_variance_needs_two_tokens(timm_vit):
    atlas = dissect(timm_vit, null_samples=10)
    x = torch.randn(1, 4, atlas.d_model)
    mask = torch.tensor([[True, False, False, False]])
    with pytest.raises(QKDissectError, match="two valid tokens"):
        logit_variance_shares(atlas, 0, x, mask)


def test_scores_from_maps_brute_force():
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 5, 13, generator=generator), torch.randn(3, 5, 13, generator=generator)
    q[0, 0] = -q[0, 0].abs()  # sign + absent for the query side: score+ must be 0
    mask = torch.rand(3, 5, 13, generator=generator) > 0.3
    scores, q_arg, k_arg = scores_from_maps(q, k, mask)
    for b in range(3):
        for m in range(5):
            valid = mask[b, m].nonzero().flatten().tolist()
            for s, sign in enumerate((1, -1)):
                qv = {p: sign * float(q[b, m, p]) for p in valid}
                kv = {p: sign * float(k[b, m, p]) for p in valid}
                best_q, best_k = max(qv, key=qv.get), max(kv, key=kv.get)
                assert int(q_arg[b, m, s]) == best_q and int(k_arg[b, m, s]) == best_k
                expected = max(qv[best_q], 0.0) * max(kv[best_k], 0.0)
                assert float(scores[b, m, s]) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert float(scores[0, 0, 0]) == 0.0
