"""Generalisation dynamics: RMT theory of train/test error vs batched simulations (spec §2)."""

from __future__ import annotations

import numpy as np
import pytest

from qkdissect.dynamics import (
    generalization_theory,
    shrinkage_sweep,
    simulate_generalization,
)


@pytest.fixture(scope="module")
def acceptance() -> tuple[object, object]:
    # spec acceptance: N_i = N_o = 100, rank-1 teacher s̄ = 3, >= 10 seeds
    sim = simulate_generalization([3.0], 100, 100, n_seeds=10, a0=1e-5, lr=1e-2, seed=0)
    th = generalization_theory([3.0], 100, 100, sim.steps.astype(float), a0=1e-5, lr=1e-2)
    return th, sim


def test_optimal_stopping_time_theory_vs_simulation_within_10_percent(acceptance) -> None:
    th, sim = acceptance
    assert 0 < th.t_opt < sim.steps[-1]
    assert abs(sim.t_opt / th.t_opt - 1) < 0.10  # measured: 2.3%


def test_test_error_curve_within_5_percent_of_its_range(acceptance) -> None:
    th, sim = acceptance
    rng = th.test_error.max() - th.test_error.min()
    dev = np.abs(sim.test_error.mean(1) - th.test_error)
    assert dev.max() < 0.05 * rng  # measured: 1.4%
    # and the train curve too
    rng_tr = th.train_error.max() - th.train_error.min()
    assert np.abs(sim.train_error.mean(1) - th.train_error).max() < 0.05 * rng_tr


def test_train_falls_monotonically_and_test_falls_then_rises(acceptance) -> None:
    th, sim = acceptance
    for train in (th.train_error, sim.train_error.mean(1)):
        assert np.all(np.diff(train) <= 1e-12)
    for test in (th.test_error, sim.test_error.mean(1)):
        i = int(np.argmin(test))
        assert 0 < i < test.size - 1
        assert test[0] > 2 * test[i] and test[-1] > 10 * test[i]


def test_spike_and_overlap_seen_in_the_simulation(acceptance) -> None:
    th, sim = acceptance
    assert abs(sim.s_hat[:, 0].mean() / th.s_hat[0] - 1) < 0.03
    assert abs(sim.overlap[:, 0].mean() / th.overlap[0] - 1) < 0.03


def test_shrinkage_beats_early_stopped_gd_in_the_acceptance_setting(acceptance) -> None:
    th, sim = acceptance
    assert th.shrinkage_test_error <= th.test_error_opt
    assert sim.shrinkage_test_error.mean() <= sim.test_error_opt
    # closed form of the shrinkage error: s̄²(1 − O²) / s̄²
    assert th.shrinkage_test_error == pytest.approx(1 - th.overlap[0] ** 2)


SETTINGS = [
    (100, 100, [3.0]),
    (100, 100, [1.5]),
    (100, 100, [1.2]),
    (100, 100, [4.0, 2.0]),
    (100, 50, [2.0]),
    (100, 25, [5.0, 1.0]),
    (100, 50, [0.7]),  # below threshold 0.84
    (80, 40, [8.0, 3.0, 0.5]),
]


@pytest.mark.parametrize("depth", [2, 3])
def test_shrinkage_not_worse_than_gd_at_t_opt_in_theory_for_every_setting(depth: int) -> None:
    for n_in, n_out, s in SETTINGS:
        th = generalization_theory(s, n_in, n_out, a0=1e-4, depth=depth, lr=1e-2)
        assert th.shrinkage_test_error <= th.test_error_opt + 1e-12, (n_in, n_out, s)


def test_shrinkage_not_worse_than_gd_at_t_opt_in_simulation() -> None:
    # Settings whose simulated margin GD(t*) − shrinkage is >= 3 standard errors of a 10-seed
    # mean (measured: 0.057 ± 0.014, 0.016 ± 0.002, 0.022 ± 0.007). The acceptance setting
    # (s̄ = 3, theoretical margin only 0.0005) is checked above with its own seeds.
    settings = [(100, 100, [1.5]), (60, 60, [4.0, 2.0]), (60, 30, [2.0])]
    res = shrinkage_sweep(settings, n_seeds=10, a0=1e-5, lr=1e-2, seed=3)
    assert np.all(res.gd_opt_theory > res.shrinkage_theory)
    assert np.all(res.shrinkage_sim <= res.gd_opt_sim), (res.shrinkage_sim, res.gd_opt_sim)


@pytest.mark.slow
def test_gd_never_significantly_beats_shrinkage_in_simulation_above_threshold() -> None:
    # Near threshold (e.g. s̄ = 1.2 at A = 1, N = 100) the per-seed difference scatters by ~0.06
    # while the expected gap is ~0.01, so a plain "mean shrinkage <= mean GD" over a few dozen
    # seeds flips sign by chance (it did, for one seed choice). Test instead that GD at the
    # simulated t* (chosen with the test error, so favourable to GD) is never better than
    # shrinkage by more than 2 standard errors of the paired difference, over 40 seeds.
    # Below threshold (s̄ = 0.7, A = 0.5) shrinkage is *worse* at N = 100 (0.99 vs 0.97: the top
    # noise singular value pokes out of the bulk); that setting is excluded and reported.
    above = [st for st in SETTINGS if min(st[2]) > (st[1] / st[0]) ** 0.25]
    for i, (n_in, n_out, s) in enumerate(above):
        sim = simulate_generalization(s, n_in, n_out, n_seeds=40, a0=1e-5, lr=1e-2, seed=21 + i)
        d = sim.shrinkage_test_error - sim.test_error_at_t_opt
        assert d.mean() < 2 * d.std(ddof=1) / np.sqrt(d.size), (n_in, n_out, s, d.mean())


def test_small_random_student_init_follows_theory_with_effective_a0() -> None:
    # depth 2, hidden = N_o: the effective initial strength is a0 (1 + h/N_i) / 4 (see simulate)
    sim = simulate_generalization([3.0], 60, 60, n_seeds=10, a0=1e-5, lr=1e-2, init="random", seed=5)
    th = generalization_theory([3.0], 60, 60, sim.steps.astype(float), a0=1e-5 * 2 / 4, lr=1e-2)
    assert abs(sim.t_opt / th.t_opt - 1) < 0.10
    rng = th.test_error.max() - th.test_error.min()
    assert np.abs(sim.test_error.mean(1) - th.test_error).max() < 0.1 * rng
