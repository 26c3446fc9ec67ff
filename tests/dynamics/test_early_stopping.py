"""Fair early stopping: the stopping step is chosen on a validation set, never with the teacher; the exact
mode-basis simulation equals the full-matrix one; the finite-size trend."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qkdissect.commands.dynamics import app
from qkdissect.dynamics import (
    LinearTask,
    NoisyTeacher,
    finite_size_trend,
    make_noisy_teacher,
    random_orthogonal,
    simulate_generalization,
    validation_loss,
    validation_loss_from_modes,
    validation_stopping_index,
)
from qkdissect.errors import QKDissectError


def test_stopping_functions_take_only_student_and_validation_data() -> None:
    assert list(inspect.signature(validation_stopping_index).parameters) == ["validation_curves"]
    assert list(inspect.signature(validation_loss).parameters) == ["product", "sigma_validation"]
    assert list(inspect.signature(validation_loss_from_modes).parameters) == [
        "strengths", "projections", "validation_norm"]


def test_validation_choice_never_touches_the_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    task = make_noisy_teacher(30, 20, [3.0], n_seeds=3, seed=1)
    sigma_val = task.teacher.matrix + torch.randn(3, 20, 30, generator=torch.Generator().manual_seed(2)) / 30**0.5
    students = torch.stack([t * task.sigma_hat for t in np.linspace(0.0, 1.0, 9)])  # (T, B, N_o, N_i)

    def refuse(*_args: object) -> None:
        raise AssertionError("the teacher was read")

    for cls, name in ((LinearTask, "matrix"), (LinearTask, "mode_strengths"), (NoisyTeacher, "sigma_hat")):
        monkeypatch.setattr(cls, name, property(refuse) if name != "mode_strengths" else refuse)
    curves = validation_loss(students, sigma_val).numpy()  # (T, B)
    chosen = validation_stopping_index(curves)
    np.testing.assert_array_equal(chosen, np.argmin(curves, axis=0))


def test_validation_loss_is_the_validation_mse_up_to_a_constant() -> None:
    # N_i orthonormal validation inputs X (columns), outputs Y = W̄ X + E: ||Y - W X||² - L_val(W)·||Σ̂_val||² is the
    # same for every student W (Σ̂_val = Y Xᵀ)
    g = torch.Generator().manual_seed(0)
    n_in, n_out = 12, 7
    w_bar = torch.randn(1, n_out, n_in, generator=g, dtype=torch.float64)
    x = random_orthogonal(n_in, batch=1, seed=3)
    y = w_bar @ x + 0.3 * torch.randn(1, n_out, n_in, generator=g, dtype=torch.float64)
    sigma_val = y @ x.transpose(-1, -2)
    gaps = []
    for _ in range(4):
        w = torch.randn(1, n_out, n_in, generator=g, dtype=torch.float64)
        mse = ((y - w @ x) ** 2).sum()
        gaps.append(float(mse - validation_loss(w, sigma_val)[0] * (sigma_val**2).sum()))
    np.testing.assert_allclose(gaps, gaps[0], rtol=1e-10, atol=1e-10)


def test_simulation_reports_validation_choice_and_the_oracle_separately() -> None:
    sim = simulate_generalization([3.0], 50, 50, n_seeds=6, a0=1e-5, lr=1e-2, seed=4)
    i_val = np.argmin(sim.validation_loss, axis=0)
    np.testing.assert_array_equal(sim.t_validation, sim.steps[i_val])
    np.testing.assert_allclose(sim.test_error_at_validation, sim.test_error[i_val, np.arange(6)])
    assert np.all(sim.test_error_at_validation >= sim.best_test_error - 1e-15)  # never beats each seed's oracle
    # chosen near the test minimum, but from noisy data: not the same step for every seed
    assert abs(sim.t_validation.mean() - sim.t_opt) < 0.15 * sim.t_opt and np.unique(sim.t_validation).size > 1


@pytest.mark.parametrize("depth", [2, 3])
def test_mode_basis_simulation_equals_the_full_matrices(depth: int) -> None:
    a = simulate_generalization([3.0, 1.5], 26, 17, n_seeds=3, depth=depth, a0=1e-3, seed=4, method="matrices")
    b = simulate_generalization([3.0, 1.5], 26, 17, n_seeds=3, depth=depth, a0=1e-3, seed=4, method="modes")
    for name in ("train_error", "test_error", "validation_loss", "shrinkage_test_error"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.t_validation, b.t_validation)
    with pytest.raises(QKDissectError, match="decoupled"):
        simulate_generalization([3.0], 30, 30, init="random", method="modes")


def test_finite_size_trend_rows_and_theory() -> None:
    trend = finite_size_trend([3.0], (40, 80), n_seeds=3, a0=1e-8, seed=1)
    assert trend.n_in.tolist() == [40, 80] and trend.n_out.tolist() == [40, 80]
    # the theory at a0 = 1e-8: GD at t* ties with shrinkage, 1 - O² = 1 - (1 - 1/9)² for s̄ = 3, A = 1
    np.testing.assert_allclose(trend.theory_shrinkage, 1 - (8 / 9) ** 2, rtol=1e-9)
    np.testing.assert_allclose(trend.theory_gd, trend.theory_shrinkage, atol=2e-4)
    assert np.all(trend.gd_oracle_per_seed <= trend.gd_oracle + 1e-12)
    assert np.all(np.abs(trend.shrinkage - trend.theory_shrinkage) < 0.1)
    assert np.all(trend.shrinkage_sem > 0) and np.all(trend.seconds > 0)


def test_finite_size_and_generalization_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "fs"
    res = runner.invoke(app, ["finite-size", "--sizes", "30,60", "--seeds", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "results.json").read_text())
    assert [r["n_in"] for r in data["rows"]] == [30, 60] and data["figures"] == ["finite_size.png"]
    assert data["a0"] == 1e-8 and data["parameters"]["seeds"] == 2
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generalization", "--n-in", "40", "--n-out", "30", "--seeds", "3", "--no-sweep",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = json.loads((out / "results.json").read_text())
    assert len(data["t_validation_per_seed"]) == 3 and "validation" in res.stdout
    assert data["normalisation"]["t_validation"].startswith("each student's own argmin")
