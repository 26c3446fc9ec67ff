"""Depth sweep with three initialisations: the exact Saxe regime (decoupled, a₀ = 1) converges with depth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkdissect.commands.dynamics import app
from qkdissect.dynamics import depth_sweep
from qkdissect.dynamics.curves import censored_quantiles

STRENGTHS = (4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5)


def test_decoupled_a0_one_learning_time_converges_with_depth_under_the_1_over_n_scaling() -> None:
    sw = depth_sweep((8, 16, 32), ("decoupled",), STRENGTHS, lr=1e-2, lr_scaling="1/N", a0=1.0, n_seeds=2,
                     max_steps=2000)
    times = sw.times[0]  # (depths, seeds)
    assert np.all(np.isfinite(times))
    median = np.median(times, axis=1)
    assert median.max() / median.min() < 1.10  # depths 8, 16, 32 within 10 % of one another
    np.testing.assert_allclose(sw.lrs, [1e-2 * 2 / 8, 1e-2 * 2 / 16, 1e-2 * 2 / 32])
    # the simulation follows the mode ODE (discrete steps lr·s <= 0.01 here: within 2 %)
    np.testing.assert_allclose(median, sw.theory_times[0], rtol=0.02)


def test_decoupled_small_a0_keeps_slowing_with_depth() -> None:
    # the same scaling from a0 = 1e-3: a^(-2/N) is large at the start, so times grow with depth (no plateau yet)
    sw = depth_sweep((2, 4, 8), ("decoupled",), (3.0, 1.0), lr=5e-2, a0=1e-3, n_seeds=1, max_steps=20_000)
    t = sw.times[0, :, 0]
    assert t[1] > 3 * t[0] and t[2] > 2 * t[1]


def test_modes_starting_above_their_target_decay_to_it() -> None:
    # a0 = 1 > s = 0.5: the mode shrinks to its target; the ODE (closed form at depth 2) says the same
    sw = depth_sweep((2,), ("decoupled",), (0.5,), lr=1e-2, a0=1.0, n_seeds=1, max_steps=5000)
    t = float(sw.times[0, 0, 0])
    # loss (0.5 - a)^2 / 0.25 < 0.01 <=> a < 0.55; depth-2 closed form with a0 = 1, s = 0.5, tau = 100
    s, a0, tau = 0.5, 1.0, 100.0
    expected = tau / (2 * s) * np.log((s / a0 - 1.0) / (s / 0.55 - 1.0))
    assert t == pytest.approx(expected, rel=0.02)


def test_censored_quantiles_count_unreached_seeds_as_infinite() -> None:
    t = np.array([[10.0, 20.0, 30.0, 40.0], [10.0, 20.0, np.nan, np.nan]])
    q = censored_quantiles(t, (0.25, 0.5, 0.75), axis=1)
    np.testing.assert_allclose(q[:, 0], np.quantile(t[0], [0.25, 0.5, 0.75]))
    assert q[0, 1] == pytest.approx(17.5) and np.isinf(q[1, 1]) and np.isinf(q[2, 1])


def test_depth_sweep_command_three_inits_with_a0_one(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["depth-sweep", "--depths", "2,4", "--strengths", "2,1.5", "--lr", "0.05",
                                      "--max-steps", "300", "--seeds", "3", "--a0", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((out / "results.json").read_text())
    assert data["parameters"]["init"] == ["gaussian", "orthogonal", "decoupled"]  # the default, side by side
    assert data["parameters"]["a0"] == 1.0 and data["parameters"]["seeds"] == 3
    assert "lr_N = lr * 2/N" in data["normalisation"]["lr"]
    rows = {(r["init"], r["depth"]): r for r in data["results"]}
    for r in rows.values():
        done = [t for t in r["times_per_seed"] if t is not None]
        if len(done) == 3:
            assert r["q25_time"] <= r["median_time"] <= r["q75_time"]
            assert r["median_time"] == pytest.approx(float(np.median(done)))
    dec = rows[("decoupled", 4)]
    assert dec["median_over_shallowest"] == pytest.approx(dec["median_time"] / rows[("decoupled", 2)]["median_time"])
    assert "lr_N = lr·2/N" in result.stdout  # the learning-rate scaling is stated where the result is printed
