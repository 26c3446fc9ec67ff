"""Random-matrix facts of spec §2, checked on sampled matrices (>= 200 × 400, >= 5 seeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkdissect.dynamics import (
    detection_threshold,
    inverse_spike,
    make_noisy_teacher,
    marchenko_pastur_density,
    marchenko_pastur_edges,
    marchenko_pastur_expectation,
    optimal_shrinkage,
    spike_overlap,
    spike_overlaps,
    spike_singular_value,
)

N_OUT, N_IN, SEEDS = 200, 400, 6
A = N_OUT / N_IN


def _sample(
    s_bar: float, seed: int = 0, n_seeds: int = SEEDS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    task = make_noisy_teacher(N_IN, N_OUT, [s_bar], n_seeds=n_seeds, seed=seed)
    u, s, vh = torch.linalg.svd(task.sigma_hat)
    ou = torch.einsum("bo,bo->b", u[..., 0], task.teacher.U[..., 0])
    ov = torch.einsum("bi,bi->b", vh[:, 0, :], task.teacher.V[..., 0])
    return s.numpy(), ou.numpy(), ov.numpy(), (ou * ov).numpy()


def test_mp_density_is_normalised_and_has_the_stated_edges() -> None:
    for a in (0.1, 0.5, 1.0):
        lo, hi = marchenko_pastur_edges(a)
        assert (lo, hi) == pytest.approx((1 - np.sqrt(a), 1 + np.sqrt(a)))
        grid = np.linspace(0, 3, 300001)
        mass = np.trapezoid(marchenko_pastur_density(grid, a), grid)
        assert mass == pytest.approx(1.0, abs=2e-3)
        assert marchenko_pastur_expectation(lambda x: np.ones_like(x), a) == pytest.approx(1.0)
        # second moment of the singular values = mean eigenvalue of Z Zᵀ = 1
        assert marchenko_pastur_expectation(lambda x: x**2, a) == pytest.approx(1.0, rel=1e-10)
        assert marchenko_pastur_density(np.array([hi + 1e-3, max(lo - 1e-3, -1)]), a).max() == 0


def test_noise_spectrum_follows_marchenko_pastur() -> None:
    z = torch.randn(SEEDS, N_OUT, N_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sv = torch.linalg.svdvals(z / np.sqrt(N_IN)).numpy().ravel()
    lo, hi = marchenko_pastur_edges(A)
    assert sv.max() == pytest.approx(hi, abs=0.05)
    assert sv.min() == pytest.approx(lo, abs=0.05)
    # empirical CDF vs the density's CDF at a few points (Kolmogorov distance)
    grid = np.linspace(lo, hi, 20001)
    cdf = np.cumsum(marchenko_pastur_density(grid, A)) * (grid[1] - grid[0])
    emp = np.searchsorted(np.sort(sv), grid) / sv.size
    assert np.max(np.abs(emp - cdf)) < 0.02


@pytest.mark.parametrize("s_bar", [1.5, 2.0, 3.0])
def test_spike_value_and_overlap_within_3_percent_above_threshold(s_bar: float) -> None:
    assert s_bar > detection_threshold(A)
    s, ou, ov, o = _sample(s_bar)
    pred_s = float(spike_singular_value(s_bar, A))
    pred_ou, pred_ov = (float(x) for x in spike_overlaps(s_bar, A))
    assert abs(s[:, 0].mean() / pred_s - 1) < 0.03
    # the product (ū·û)(v̄·v̂) is invariant to the SVD's joint sign flip
    assert abs(o.mean() / float(spike_overlap(s_bar, A)) - 1) < 0.03
    assert abs(np.abs(ou).mean() / pred_ou - 1) < 0.03
    assert abs(np.abs(ov).mean() / pred_ov - 1) < 0.03


def test_overlap_near_threshold_agrees_within_sampling_error() -> None:
    # At s̄ = 1.2 (threshold 0.84) one 200×400 draw's overlap scatters by ~±20%, so a 3% test
    # of a few-seed mean would test the noise; instead: |mean − O(s̄)| < 3 standard errors.
    s_bar = 1.2
    s, _, _, o = _sample(s_bar, seed=11, n_seeds=40)
    se = o.std(ddof=1) / np.sqrt(o.size)
    assert abs(o.mean() - float(spike_overlap(s_bar, A))) < 3 * se
    assert abs(s[:, 0].mean() / float(spike_singular_value(s_bar, A)) - 1) < 0.03


def test_weak_modes_are_lost_in_the_bulk() -> None:
    s_bar = 0.6  # threshold A^{1/4} = 0.84
    s, _, _, o = _sample(s_bar, seed=1)
    assert float(spike_singular_value(s_bar, A)) == pytest.approx(1 + np.sqrt(A))
    assert float(spike_overlap(s_bar, A)) == 0.0
    assert s[:, 0].mean() == pytest.approx(1 + np.sqrt(A), abs=0.06)
    assert np.abs(o).mean() < 0.15


def test_spike_map_is_continuous_at_threshold_and_inverse_round_trips() -> None:
    for a in (0.25, 0.5, 1.0):
        c = detection_threshold(a)
        assert float(spike_singular_value(c * (1 + 1e-9), a)) == pytest.approx(1 + np.sqrt(a), rel=1e-6)
        sb = np.linspace(c * 1.001, 10, 50)
        np.testing.assert_allclose(inverse_spike(spike_singular_value(sb, a), a), sb, rtol=1e-9)
        assert float(inverse_spike(1 + np.sqrt(a), a)) == 0.0


def test_optimal_shrinkage_equals_gavish_donoho_closed_form() -> None:
    for a in (0.2, 0.5, 1.0):
        y = np.linspace(0.1, 6, 300)
        gd = np.where(
            y > 1 + np.sqrt(a), np.sqrt(np.clip((y**2 - a - 1) ** 2 - 4 * a, 0, None)) / y, 0.0
        )
        np.testing.assert_allclose(optimal_shrinkage(y, a), gd, atol=1e-12)
        assert np.all(optimal_shrinkage(np.array([0.5, 1.0]), a) == 0)  # all inside the bulk


def test_optimal_shrinkage_predicts_the_oracle_singular_value() -> None:
    # η(ŝ) should match û_1ᵀ W̄ v̂_1 = s̄ (ū·û)(v̄·v̂) on sampled matrices
    task = make_noisy_teacher(N_IN, N_OUT, [2.0], n_seeds=SEEDS, seed=4)
    u, s, vh = torch.linalg.svd(task.sigma_hat)
    oracle = torch.einsum("bo,boi,bi->b", u[..., 0], task.teacher.matrix, vh[:, 0, :]).numpy()
    eta = optimal_shrinkage(s[:, 0].numpy(), A)
    assert abs(eta.mean() / oracle.mean() - 1) < 0.03
