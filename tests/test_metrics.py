"""Similarity statistics against dense computations and closed forms; the null's calibration."""

from __future__ import annotations

import math

import pytest
import torch

from qkdissect import factored_svd, gaussian_null
from qkdissect.factored import trace_over_nuclear
from qkdissect.metrics import mode_cosines, symmetric_fraction, weighted_cosine


def random_heads(n, d_head=5, d_model=23, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_head, d_model, generator=generator, dtype=torch.float64),
            torch.randn(n, d_head, d_model, generator=generator, dtype=torch.float64))


def test_weighted_cosine_is_trace_over_nuclear_norm():
    W_q, W_k = random_heads(16)
    U, S, V = factored_svd(W_q, W_k)
    M = W_q.transpose(-1, -2) @ W_k
    dense = torch.einsum("hii->h", M) / torch.linalg.svdvals(M).sum(-1)
    assert torch.allclose(weighted_cosine(S, mode_cosines(U, V)), dense, atol=1e-12)
    assert torch.allclose(trace_over_nuclear(W_q, W_k), dense, atol=1e-12)


def test_weighted_cosine_is_not_divided_by_d_head():
    """The reference notebook's bug (a mean after normalising weights) gives C/d_head; a
    W_k = W_q head must give exactly +1 and W_k = −W_q exactly −1."""
    W_q, _ = random_heads(4)
    for sign in (1.0, -1.0):
        U, S, V = factored_svd(W_q, sign * W_q)
        assert torch.allclose(weighted_cosine(S, mode_cosines(U, V)), torch.full((4,), sign, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(mode_cosines(U, V), torch.full((4, 5), sign, dtype=torch.float64), atol=1e-10)


def test_symmetric_fraction_matches_dense():
    W_q, W_k = random_heads(8, seed=3)
    U, S, V = factored_svd(W_q, W_k)
    M = W_q.transpose(-1, -2) @ W_k
    M_s = (M + M.transpose(-1, -2)) / 2
    dense = torch.linalg.matrix_norm(M_s) ** 2 / torch.linalg.matrix_norm(M) ** 2
    assert torch.allclose(symmetric_fraction(U, S, V), dense, atol=1e-12)
    U, S, V = factored_svd(W_q, W_q)
    assert torch.allclose(symmetric_fraction(U, S, V), torch.ones(8, dtype=torch.float64), atol=1e-12)
    U, S, V = factored_svd(W_q, -W_q)
    assert torch.allclose(symmetric_fraction(U, S, V), torch.ones(8, dtype=torch.float64), atol=1e-12)


def test_null_band_scale_matches_theory():
    """Cosines of random modes ≈ N(0, 1/d): the central 99% band is ≈ ±2.576/√d_model."""
    d_model, d_head = 200, 8
    null = gaussian_null(d_model, d_head, n_samples=400, percentile=99.0, seed=1)
    expected = 2.576 / math.sqrt(d_model)
    assert null.cosine_band[1] == pytest.approx(expected, rel=0.12)
    assert null.cosine_band[0] == pytest.approx(-expected, rel=0.12)
    # the weighted cosine's spread is ≈ 1/√(d_model·d_head) in scale
    assert 0.3 < null.weighted_std * math.sqrt(d_model * d_head) < 3.0


def test_gaussian_heads_fall_inside_the_null_at_the_stated_rate():
    """Fresh Gaussian heads (another seed) fall outside the 95% band ~5% of the time."""
    d_model, d_head, n = 40, 6, 3000
    null = gaussian_null(d_model, d_head, n_samples=3000, percentile=95.0, seed=11)
    W_q, W_k = random_heads(n, d_head, d_model, seed=12)
    U, S, V = factored_svd(W_q, W_k)
    cos = mode_cosines(U, V)
    weighted = weighted_cosine(S, cos)
    lo, hi = null.weighted_band
    outside = float(((weighted < lo) | (weighted > hi)).double().mean())
    sd = math.sqrt(0.05 * 0.95 / n)
    assert abs(outside - 0.05) < 4 * sd + 0.01  # 3000 draws: within sampling error of both null and test
    c_lo, c_hi = null.cosine_band
    outside_modes = float(((cos < c_lo) | (cos > c_hi)).double().mean())
    assert abs(outside_modes - 0.05) < 0.015


def test_null_is_deterministic_and_validates_percentile():
    a = gaussian_null(30, 4, n_samples=100, seed=5)
    b = gaussian_null(30, 4, n_samples=100, seed=5)
    assert a == b
    from qkdissect import QKDissectError

    with pytest.raises(QKDissectError, match="percentile"):
        gaussian_null(30, 4, percentile=100.0)


@pytest.mark.parametrize("d_model, d_head", [(40, 6), (97, 13)])
def test_factored_null_sampler_has_the_dense_distribution(d_model, d_head):
    """The fast sampler (QR factors drawn directly) matches decomposing Gaussian matrices (KS tests)."""
    import numpy as np
    from scipy.stats import ks_2samp

    from qkdissect.metrics import _null_dense, _null_factored

    S_d, cos_d = _null_dense(d_model, d_head, 1500, np.random.default_rng(0))
    S_f, cos_f = _null_factored(d_model, d_head, 1500, np.random.default_rng(1))
    assert ks_2samp(weighted_cosine(S_d, cos_d), weighted_cosine(S_f, cos_f)).pvalue > 0.001
    assert ks_2samp(cos_d[:, 0], cos_f[:, 0]).pvalue > 0.001
    assert ks_2samp(cos_d[:, -1], cos_f[:, -1]).pvalue > 0.001
    for k in (0, d_head // 2, d_head - 1):
        assert ks_2samp(S_d[:, k], S_f[:, k]).pvalue > 0.001
    # a wrong sampler is caught: cosines of a d_model/2 space are visibly wider
    _, cos_small = _null_factored(d_model // 2 + d_head, d_head, 1500, np.random.default_rng(2))
    assert ks_2samp(cos_d.flatten(), cos_small.flatten()).pvalue < 1e-6


def test_null_methods_agree_and_small_models_fall_back():
    from qkdissect import QKDissectError

    dense = gaussian_null(60, 7, n_samples=2000, method="dense", seed=3)
    fast = gaussian_null(60, 7, n_samples=2000, method="factored", seed=3)
    assert fast.method == "factored" and dense.method == "dense"
    assert fast.weighted_band[1] == pytest.approx(dense.weighted_band[1], rel=0.15)
    assert fast.cosine_band[1] == pytest.approx(dense.cosine_band[1], rel=0.1)
    assert gaussian_null(20, 12, n_samples=20).method == "dense"  # d_model < 2·d_head
    with pytest.raises(QKDissectError, match="d_model ≥ 2·d_head"):
        gaussian_null(20, 12, n_samples=20, method="factored")
