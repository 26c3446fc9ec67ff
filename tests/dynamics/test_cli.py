"""The ``qkdissect dynamics`` commands run with small settings and write what they promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkdissect.commands.dynamics import app

runner = CliRunner()


def _run(args: list[str]) -> object:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def _load(out: Path) -> dict:
    data = json.loads((out / "results.json").read_text())
    for name in data["figures"]:
        png = (out / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert {"torch", "numpy", "qkdissect"} <= set(data["versions"])
    return data


def test_saxe_writes_half_times_and_deviations(tmp_path: Path) -> None:
    out = tmp_path / "saxe"
    res = _run(["saxe", "--strengths", "3,2,1", "--a0", "1e-4", "--lr", "1e-2", "--seeds", "2",
                "--out", str(out)])
    assert "analytic" in res.stdout
    data = _load(out)
    assert [m["strength"] for m in data["modes"]] == [3, 2, 1]
    for m in data["modes"]:
        assert m["simulated_half_time"] == pytest.approx(m["analytic_half_time"], rel=0.02)
        assert 0 <= m["max_relative_deviation"] < 0.05  # lr·s up to 0.03 here
        assert m["max_relative_deviation_from_discrete_gd"] < 1e-9
    assert data["parameters"]["tau"] == pytest.approx(100)
    assert data["modes_learned_in_order_of_strength"] is True
    assert len(data["curves"]["steps"]) == len(data["curves"]["theory"])


def test_saxe_random_deep(tmp_path: Path) -> None:
    out = tmp_path / "deep"
    _run(["saxe", "--strengths", "3,2,1", "--depth", "4", "--a0", "1e-3", "--lr", "1e-2",
          "--init", "random", "--seeds", "2", "--out", str(out)])
    data = _load(out)
    assert data["parameters"]["init"] == "random"
    assert all(m["simulated_half_time"] is not None for m in data["modes"])


def test_depth_sweep_command(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    _run(["depth-sweep", "--depths", "2,4", "--init", "orthogonal,gaussian,decoupled",
          "--strengths", "2,1", "--lr", "0.05", "--max-steps", "400", "--seeds", "2",
          "--out", str(out)])
    data = _load(out)
    assert {(r["init"], r["depth"]) for r in data["results"]} == {
        (i, d) for i in ("orthogonal", "gaussian", "decoupled") for d in (2, 4)
    }
    dec = {r["depth"]: r for r in data["results"] if r["init"] == "decoupled"}
    # depth 2 reaches the criterion within 400 steps; simulation and ODE agree within 3%
    assert dec[2]["theory_time"] == pytest.approx(dec[2]["mean_time_reached"], rel=0.03)


def test_generalization_command(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    res = _run(["generalization", "--n-in", "60", "--n-out", "40", "--strengths", "3,1.5",
                "--seeds", "3", "--sweep-seeds", "1", "--out", str(out)])
    assert "t*" in res.stdout
    data = _load(out)
    for key in ("t_opt_theory", "t_opt_sim", "test_error_at_t_opt_theory", "test_error_at_t_opt_sim",
                "shrinkage_test_error", "shrinkage_test_error_theory"):
        assert isinstance(data[key], float), key
    c = data["curves"]
    n = len(c["times"])
    keys = ("train_error_theory", "test_error_theory", "train_error_sim_mean", "test_error_sim_mean")
    assert n > 10 and all(len(c[k]) == n for k in keys)
    assert data["normalisation"]["test_error"].startswith("||W_bar - W(t)||_F^2")
    assert len(data["shrinkage_sweep"]) == 7
    assert {"errors.png", "spectrum.png", "shrinkage.png", "shrinkage_sweep.png"} == set(data["figures"])


def test_transfer_command(tmp_path: Path) -> None:
    out = tmp_path / "transfer"
    _run(["transfer", "--alignment", "0,1", "--snr-source", "3", "--snr-target", "1", "--n-in", "40",
          "--n-out-source", "20", "--n-out-target", "20", "--seeds", "2", "--out", str(out)])
    data = _load(out)
    assert len(data["settings"]) == 2
    assert data["benefit_theory"][0][1] > data["benefit_theory"][0][0]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["saxe", "--strengths", "5,-1"], ["strengths", "positive"]),
        (["saxe", "--strengths", "5,x"], ["comma-separated numbers"]),
        (["saxe", "--a0", "10"], ["a0", "smaller"]),
        (["saxe", "--depth", "0"], ["depth"]),
        (["generalization", "--n-in", "50", "--n-out", "100"], ["N_o/N_i <= 1", "Transpose"]),
        (["transfer", "--alignment", "2"], ["alignment"]),
        (["depth-sweep", "--init", "he"], ["init"]),
    ],
)
def test_bad_parameters_exit_nonzero_without_traceback(
    tmp_path: Path, args: list[str], words: list[str]
) -> None:
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    text = result.output
    assert "error:" in text and "Traceback" not in text
    for w in words:
        assert w in text, (w, text)
