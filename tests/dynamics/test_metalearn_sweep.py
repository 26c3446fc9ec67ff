"""The LSTM meta-learner's gap to Bayes (sweeps) and its outer loop per mode under two priors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qkdissect.commands.dynamics import app
from qkdissect.dynamics import (
    LSTMMetaLearner,
    checkpoint_schedule,
    estimator_prediction_errors,
    make_prior_tasks,
    meta_train,
    sample_episode,
)
from qkdissect.dynamics.runs.common import outer_loop_concurrency
from qkdissect.dynamics.runs.configs import MetalearnSweepConfig
from qkdissect.dynamics.runs.metalearn_sweep import load_metalearn_sweep, sweep_points


def test_min_norm_next_sample_error_is_one_minus_k_over_n_x() -> None:
    tasks = make_prior_tasks([3.0, 2.0, 1.0, 0.5], 5, 4, n_tasks=3000, seed=2)
    x, y = sample_episode(tasks, 9, generator=torch.Generator().manual_seed(5))
    err = estimator_prediction_errors(tasks, x, y, ("min_norm", "bayes"))
    expected = np.maximum(0.0, 1.0 - np.arange(9) / 5)
    np.testing.assert_allclose(err["min_norm"], expected, atol=0.03)
    np.testing.assert_allclose(err["bayes"], err["min_norm"], atol=1e-8)  # rotation prior, no noise: Bayes = min-norm


def test_meta_train_probes_at_the_requested_steps() -> None:
    tasks = make_prior_tasks([2.0, 1.0], 3, 2, n_tasks=50, seed=0)
    model = LSTMMetaLearner(3, 2, hidden=6)
    seen: list[int] = []
    steps = checkpoint_schedule(30, 6)
    log = meta_train(model, tasks, tasks, n_steps=30, batch=4, episode_length=5, eval_steps=steps,
                     on_eval=lambda step, m: seen.append(step) if not m.training else None)
    assert seen == log.steps.tolist() == steps.tolist()


def test_sweep_points_share_the_common_point_and_record_the_outer_loop_once_per_prior() -> None:
    c = MetalearnSweepConfig(hidden=(32, 128), steps_for_hidden=400, meta_steps=(100, 400), hidden_for_steps=128)
    assert sweep_points(c) == [("rotation", 32, 400, False), ("rotation", 128, 400, True),
                               ("rotation", 128, 100, False), ("aligned", 128, 400, True)]


def test_metalearn_sweep_quick(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    res = CliRunner().invoke(app, ["metalearn-sweep", "--quick", "--seeds", "0,1", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    data = load_metalearn_sweep(out)
    c = MetalearnSweepConfig().quick()
    assert len(data["points"]) == 2 * len(sweep_points(c))  # two seeds per point
    assert {p["seed"] for p in data["points"]} == {0, 1}
    for p in data["points"]:
        assert len(p["error_per_position"]) == c.episode_length
        assert p["gap_to_bayes"] == pytest.approx(p["error"] - p["bayes_error"])
        assert p["error"] == pytest.approx(np.mean(p["error_per_position"]))
    ref = data["references"]["rotation"]["min_norm"]["error_per_position"]
    expected = np.maximum(0.0, 1 - np.arange(c.episode_length) / c.n_x)  # 32 held-out tasks: Monte-Carlo noise
    np.testing.assert_allclose(ref, expected, atol=0.15)
    assert np.mean(ref) == pytest.approx(np.mean(expected), abs=0.06) and np.all(np.abs(ref[c.n_x:]) < 1e-9)
    assert set(data["outer_loop"]) == {"rotation", "aligned"}
    for ol in data["outer_loop"].values():
        m = np.asarray(ol["recovery_full_context"], dtype=float)
        assert m.shape == (len(ol["steps"]), len(c.strengths)) and ol["k"] == c.episode_length - 1
        assert ol["steps"] == checkpoint_schedule(ol["meta_steps"], c.checkpoints).tolist()
        assert "index" in ol["concurrency"]
    assert data["figures"] == ["metalearn_sweep.png"] and (out / "metalearn_sweep.png").stat().st_size > 10_000


def test_outer_loop_half_steps_of_the_learned_modes_only() -> None:
    steps = np.arange(0.0, 101.0)
    # modes learned at steps 20 and 60 (logistic rises), a third never learned
    m = np.stack([1 / (1 + np.exp(-(steps - 20))), 0.8 / (1 + np.exp(-(steps - 60))), 0.01 * np.ones_like(steps)], 1)
    whole = outer_loop_concurrency(steps, m, np.array([3.0, 2.0, 1.0]))
    assert whole["index"] is None and whole["not_learned"].tolist() == [1.0]
    part = outer_loop_concurrency(steps, m, np.array([3.0, 2.0, 1.0]), partial=True)
    np.testing.assert_allclose(part["half_points"][:2], [20.0, 60.0], atol=0.05)
    assert np.isnan(part["half_points"][2]) and part["order_matches_strengths"] is True
    assert part["index"] == pytest.approx(np.std([20.0, 60.0]) / 40.0, rel=1e-3)
