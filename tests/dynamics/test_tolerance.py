"""Tolerance statements: where a simulation exceeds the stated tolerance because of the step size, say so and
offer a step size that meets it (checked here against a full-matrix simulation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkdissect.commands.dynamics import app
from qkdissect.dynamics import (
    discrete_mode_strength,
    discretisation_deviation,
    learning_rate_for_tolerance,
    mode_strength,
    simulate_modes,
)

S = [6.0, 4.0, 2.0]


def test_discretisation_deviation_is_what_the_simulation_shows() -> None:
    lr, a0 = 2e-3, 1e-6
    dev = discretisation_deviation(S, a0, lr)
    sim = simulate_modes(S, a0=a0, lr=lr, n_steps=3700, n_seeds=1, hidden=4)  # 2 × the slowest half-time
    flow = mode_strength(S, a0, sim.steps, tau=1 / lr)
    sim_dev = (np.abs(sim.strengths[:, 0] - flow) / S).max(0)
    np.testing.assert_allclose(sim_dev, dev, rtol=1e-6)
    assert dev[0] > 0.01 > dev[2]  # the s = 6 mode exceeds 1 % at this step size, the s = 2 mode does not
    assert dev[0] / dev[1] == pytest.approx(6 / 4, rel=0.1)  # ≈ proportional to lr·s


def test_offered_learning_rate_meets_the_tolerance_in_a_full_matrix_simulation() -> None:
    lr_ok, dev_ok = learning_rate_for_tolerance(S, 1e-6, 0.01, 2e-3)
    assert 4e-4 < lr_ok < 2e-3 and dev_ok.max() <= 0.01
    assert float(f"{lr_ok:.2g}") == lr_ok  # stated to two significant digits
    n = int(2.2 / (2 * 2.0 * lr_ok) * np.log(2.0 / 1e-6))  # past the slowest mode's half-time
    sim = simulate_modes(S, a0=1e-6, lr=lr_ok, n_steps=n, n_seeds=1, hidden=4)
    flow = mode_strength(S, 1e-6, sim.steps, tau=1 / lr_ok)
    assert (np.abs(sim.strengths[:, 0] - flow) / S).max() <= 0.01
    exact = discrete_mode_strength(S, 1e-6, n, lr=lr_ok)
    np.testing.assert_allclose(sim.strengths[:, 0], exact[sim.steps], rtol=1e-8, atol=1e-12)


def test_saxe_says_which_mode_exceeds_why_and_what_meets_it(tmp_path: Path) -> None:
    out = tmp_path / "saxe"
    res = CliRunner().invoke(app, ["saxe", "--strengths", "6,4,2", "--lr", "2e-3", "--seeds", "1", "--hidden", "4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    tol = json.loads((out / "results.json").read_text())["tolerance"]
    assert not tol["within"] and tol["modes_over_tolerance"] == [6.0, 4.0]
    assert "because of the step size" in tol["statement"] and f"--lr {tol['learning_rate_meeting_tolerance']:g}" in \
        tol["statement"]
    assert "because of the step size" in " ".join(res.stdout.split())
    out = tmp_path / "fine"
    res = CliRunner().invoke(app, ["saxe", "--strengths", "6,4,2", "--lr", "2e-3", "--tolerance", "0.03", "--seeds",
                                   "1", "--hidden", "4", "--out", str(out)])
    tol = json.loads((out / "results.json").read_text())["tolerance"]
    assert tol["within"] and tol["statement"].startswith("every mode within the 3.00% tolerance")
