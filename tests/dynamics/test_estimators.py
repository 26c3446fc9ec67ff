"""Ideal in-context estimators: closed forms vs Monte Carlo, vs independent solvers, and the recovery index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkdissect.dynamics.incontext import concurrency, half_recovery_points, make_prior_tasks, sample_episode
from qkdissect.dynamics.incontext.estimators import (
    bayes_estimate,
    estimator_recovery,
    min_norm_estimate,
    min_norm_recovery,
    min_norm_recovery_sd,
    prior_row_covariance,
    ridge_estimate,
)
from qkdissect.errors import QKDissectError

# distinct sizes: N_x = 7, N_y = 6, r = 5 modes
S = [3.0, 2.0, 1.2, 0.7, 0.4]
N_X, N_Y = 7, 6


@pytest.fixture(scope="module")
def tasks():
    return make_prior_tasks(S, N_X, N_Y, n_tasks=3000, seed=11)


def test_min_norm_recovery_is_k_over_nx_for_every_mode(tasks) -> None:
    ks = [0, 2, 4, 6, 7, 9]
    rec = estimator_recovery(tasks, ks, ["min_norm"], seed=3)["min_norm"]
    theory = min_norm_recovery(ks, N_X)
    assert theory.tolist() == pytest.approx([0, 2 / 7, 4 / 7, 6 / 7, 1, 1])
    se = min_norm_recovery_sd(ks, N_X) / np.sqrt(tasks.n_tasks)  # exact per-task sd (Beta law) / sqrt(B)
    for i, k in enumerate(ks):
        dev = np.abs(rec.mean[i] - theory[i])
        if se[i] == 0:  # k = 0 and k >= N_x: deterministic
            assert np.all(dev < 1e-9), (k, rec.mean[i])
        else:
            assert np.all(dev < 3 * se[i]), (k, rec.mean[i], theory[i], se[i])
    # the Monte-Carlo spread matches the Beta law's standard deviation
    sd = rec.per_task.std(1)
    assert sd[2] == pytest.approx(np.full(len(S), min_norm_recovery_sd([4], N_X)[0]), rel=0.1)


def test_min_norm_matches_numpy_lstsq() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, N_X, generator=g, dtype=torch.float64)  # k = 4 < N_x: underdetermined
    y = torch.randn(3, 4, N_Y, generator=g, dtype=torch.float64)
    w = min_norm_estimate(x, y)
    for b in range(3):
        ref = np.linalg.lstsq(x[b].numpy(), y[b].numpy(), rcond=None)[0].T  # minimum-norm solution
        np.testing.assert_allclose(w[b].numpy(), ref, atol=1e-10)
    assert torch.equal(min_norm_estimate(x[:, :0], y[:, :0]), torch.zeros(3, N_Y, N_X, dtype=torch.float64))


def test_ridge_matches_augmented_least_squares() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, N_X, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, N_Y, generator=g, dtype=torch.float64)
    lam = 0.7
    w = ridge_estimate(x, y, lam)
    for b in range(2):
        a = np.vstack([x[b].numpy(), np.sqrt(lam) * np.eye(N_X)])
        rhs = np.vstack([y[b].numpy(), np.zeros((N_X, N_Y))])
        np.testing.assert_allclose(w[b].numpy(), np.linalg.lstsq(a, rhs, rcond=None)[0].T, atol=1e-10)


def test_bayes_equals_min_norm_for_rotation_prior_and_ridge_with_noise() -> None:
    task = make_prior_tasks(S, N_X, N_Y, n_tasks=4, seed=2)
    g = torch.Generator().manual_seed(5)
    cov = prior_row_covariance(S, N_X, N_Y, "rotation")
    for k in (3, 7, 10):
        x, y = sample_episode(task, k, generator=g)
        np.testing.assert_allclose(bayes_estimate(x, y, cov).numpy(), min_norm_estimate(x, y).numpy(), atol=1e-8)
    x, y = sample_episode(task, 5, noise=0.3, generator=g)
    lam = 0.3**2 * N_X * N_Y / sum(s * s for s in S)  # σ² / prior variance per entry
    np.testing.assert_allclose(bayes_estimate(x, y, cov, noise=0.3).numpy(), ridge_estimate(x, y, lam).numpy(),
                               atol=1e-10)


def test_exact_posterior_mean_is_min_norm_by_importance_sampling() -> None:
    """The reflection argument of the estimators module, checked against the exact (fixed-spectrum)
    prior: importance-sample W = U diag(s) Vᵀ in 2-D with a small observation noise, one sample."""
    s = [2.0, 0.8]
    truth = make_prior_tasks(s, 2, 2, n_tasks=1, seed=4)
    g = torch.Generator().manual_seed(9)
    x, y = sample_episode(truth, 1, generator=g)
    prior = make_prior_tasks(s, 2, 2, n_tasks=400_000, seed=6)
    sigma = 0.05
    resid = (prior.matrix @ x[0].T).squeeze(-1) - y[0, 0]  # (M, N_y)
    logw = -(resid**2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(logw, 0)
    assert 1.0 / float((w**2).sum()) > 50  # enough effective samples
    post_mean = (w[:, None, None] * prior.matrix).sum(0)
    np.testing.assert_allclose(post_mean.numpy(), min_norm_estimate(x, y)[0].numpy(), atol=0.05)


def test_bayes_aligned_prior_recovers_strong_modes_first() -> None:
    task = make_prior_tasks(S, N_X, N_Y, prior="aligned", n_tasks=800, seed=3)
    assert torch.equal(task.V[0], torch.eye(N_X, len(S), dtype=torch.float64))
    rec = estimator_recovery(task, range(N_X + 1), ["bayes", "min_norm"], prior="aligned", seed=1)
    c = concurrency(rec["bayes"].ks, rec["bayes"].mean, S)
    assert c.order_matches_strengths is True and c.index > 0.2
    assert concurrency(rec["min_norm"].ks, rec["min_norm"].mean, S).index < 0.1


def test_concurrency_index_on_known_curves() -> None:
    steps = np.linspace(0, 100, 401)
    centres = np.array([10.0, 25.0, 60.0])
    curves = 1 / (1 + np.exp(-(steps[:, None] - centres) / 3.0))
    c = concurrency(steps, curves, [3, 2, 1])
    np.testing.assert_allclose(c.half_points, centres, atol=0.05)
    assert c.index == pytest.approx(centres.std() / centres.mean(), rel=1e-3)
    assert c.order_matches_strengths is True and c.censored is False
    assert concurrency(steps, curves, [1, 2, 3]).order_matches_strengths is False
    same = concurrency(steps, np.repeat(curves[:, :1], 3, axis=1), [3, 2, 1])
    assert same.index == pytest.approx(0.0, abs=1e-12)
    plateau = concurrency(steps, np.stack([curves[:, 0], 0.4 * curves[:, 1]], 1), [2, 1])
    assert plateau.censored and np.isnan(plateau.half_points[1]) and plateau.order_matches_strengths is None
    assert plateau.relative_half_points[1] == pytest.approx(25.0, abs=0.05)  # half of its own plateau
    none = concurrency(steps, 0.3 * curves, [3, 2, 1])
    assert np.isnan(none.index)


def test_bad_inputs() -> None:
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    with pytest.raises(QKDissectError, match="lambda"):
        ridge_estimate(x, torch.zeros(2, 3, 2, dtype=torch.float64), 0.0)
    with pytest.raises(QKDissectError, match="same B and k"):
        min_norm_estimate(x, torch.zeros(2, 4, 2, dtype=torch.float64))
    with pytest.raises(QKDissectError, match="prior"):
        make_prior_tasks(S, N_X, N_Y, prior="diagonal")
    with pytest.raises(QKDissectError, match="modes need"):
        make_prior_tasks(S, 3, N_Y, prior="aligned")
    task = make_prior_tasks(S, N_X, N_Y, n_tasks=2)
    with pytest.raises(QKDissectError, match="estimator"):
        estimator_recovery(task, [1, 2], ["oracle"])
    with pytest.raises(QKDissectError, match="recovery"):
        half_recovery_points([0, 1, 2], np.zeros((2, 3)))
