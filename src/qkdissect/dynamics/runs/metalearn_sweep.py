"""``qkdissect dynamics metalearn-sweep``: does the LSTM meta-learner's gap to Bayes close, and is its
outer loop staggered?

For each sweep point (LSTM hidden size × meta-training steps, rotation prior) the meta-trained LSTM and
the ideal estimators are scored on the *same* held-out episodes: the error of predicting sample k + 1
from the first k, ‖ŷ − y‖² / Σ s², averaged over the episode (min-norm = Bayes here: 1 − k/N_x for
k < N_x, then 0), and the in-context mode recovery m_α(k) (half-recovery point k½; min-norm: N_x/2 for
every mode). The gap is LSTM error − Bayes error.

Outer loop: for each prior in ``outer_priors`` one run also probes m_α(k) with the full context at
checkpoints of meta-training (3/4 geometric). Under the *aligned* prior mode α always reads input axis α,
so the LSTM's weights can tie the strong directions to their strengths, and a strong mode's recovery can
rise before a weak one's (Saxe-like staggering of the outer loop). Under the *rotation* prior no direction
is tied to a strength: the task distribution is unchanged by rotating input and output space, so nothing
in the meta-training signal can favour the direction a mode takes in a given task. The outer loop learns
one in-context algorithm applied to every direction alike, and all modes improve together. If that
algorithm is linear in the data, as min-norm and Bayes are here, every mode has the same expected
recovery whatever its strength (min-norm: E m_α(k) = k/N_x); what differs between modes is what the
LSTM's nonlinearity adds.

Output folder: ``results.json`` (``points``: one row per LSTM; ``outer_loop``: per prior) and
``metalearn_sweep.png``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.incontext.estimators import estimator_prediction_errors, estimator_recovery
from qkdissect.dynamics.incontext.metalearn import (
    LSTMMetaLearner,
    episode_loss,
    lstm_inputs,
    meta_train,
    probe_lstm,
)
from qkdissect.dynamics.incontext.setting import (
    PRIORS,
    checkpoint_schedule,
    make_prior_tasks,
    sample_episode,
    task_subset,
)
from qkdissect.dynamics.linear.tasks import make_generator
from qkdissect.dynamics.plots.incontext import plot_metalearn_sweep
from qkdissect.dynamics.runs.common import (
    RunClock,
    config_dict,
    derive_seeds,
    load_results,
    outer_loop_concurrency,
    output_folder,
    recovery_curve,
    write_results,
)
from qkdissect.dynamics.runs.configs import MetalearnSweepConfig
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, report

__all__ = ["load_metalearn_sweep", "run_metalearn_sweep", "sweep_points"]


def sweep_points(c: MetalearnSweepConfig) -> list[tuple[str, int, int, bool]]:
    """(prior, hidden, meta-steps, records the outer loop) of every LSTM to train, without repeats."""
    points: list[tuple[str, int, int, bool]] = []
    base = (c.hidden_for_steps, c.steps_for_hidden)
    wanted = [("rotation", h, c.steps_for_hidden) for h in c.hidden]
    wanted += [("rotation", c.hidden_for_steps, n) for n in c.meta_steps]
    wanted += [(p, *base) for p in c.outer_priors]
    for prior, h, n in wanted:
        outer = prior in c.outer_priors and (h, n) == base
        if not any(p == prior and (ph, pn) == (h, n) for p, ph, pn, _ in points):
            points.append((prior, h, n, outer))
    return points


def _check(c: MetalearnSweepConfig) -> None:
    for p in c.outer_priors:
        if p not in PRIORS:
            raise QKDissectError(f"--outer-priors: expected a comma list of {', '.join(PRIORS)}, got {p!r}.")
    for h in (*c.hidden, c.hidden_for_steps):
        checks.count(h, "hidden")
    for n in (*c.meta_steps, c.steps_for_hidden):
        checks.count(n, "meta steps")
    if not c.seeds:
        raise QKDissectError("--seeds: give at least one LSTM seed.")


def _reference(c: MetalearnSweepConfig, s: np.ndarray, prior: str) -> dict[str, Any]:
    """The prior's tasks, the shared held-out episodes and the estimators' scores on them."""
    seeds = derive_seeds(c.seed + PRIORS.index(prior), ["train_tasks", "test_tasks", "episodes", "estimators"])
    train = make_prior_tasks(s, c.n_x, c.n_y, prior=prior, n_tasks=c.train_tasks, seed=seeds["train_tasks"])
    test = make_prior_tasks(s, c.n_x, c.n_y, prior=prior, n_tasks=c.test_tasks, seed=seeds["test_tasks"])
    x, y = sample_episode(test, c.episode_length, generator=make_generator(seeds["episodes"]))
    errors = estimator_prediction_errors(test, x, y, ("min_norm", "bayes"), prior=prior)
    ks = np.arange(c.episode_length)
    rec = estimator_recovery(test, ks, ("min_norm", "bayes"), prior=prior, seed=seeds["estimators"])
    return {"train": train, "test": test, "x": x, "y": y, "seeds": seeds,
            "estimators": {name: {"error_per_position": errors[name], "error": float(errors[name].mean()),
                                  "recovery": recovery_curve(ks, rec[name].per_task, s)} for name in errors}}


def _train_point(c: MetalearnSweepConfig, s: np.ndarray, ref: dict[str, Any], hidden: int, steps: int, seed: int,
                 outer: bool, progress: ProgressFn | None) -> dict[str, Any]:
    """Meta-train one LSTM and score it on the shared held-out episodes (and its outer loop if asked)."""
    started = time.perf_counter()
    seeds = derive_seeds(seed, ["lstm_init", "meta_train", "probe", "outer"])
    with torch.random.fork_rng():
        torch.manual_seed(seeds["lstm_init"])
        model = LSTMMetaLearner(c.n_x, c.n_y, hidden=hidden)
    outer_tasks = task_subset(ref["test"], slice(0, min(c.outer_tasks, ref["test"].n_tasks)))
    recorded: list[np.ndarray] = []

    def on_eval(_step: int, m: LSTMMetaLearner) -> None:
        probe = probe_lstm(m, outer_tasks, episode_length=c.episode_length, n_random=1, seed=seeds["outer"])
        recorded.append(probe.recovery[-1].mean(0))  # full context: m_α(T − 1), mean over tasks

    log = meta_train(model, ref["train"], ref["test"], n_steps=steps, batch=c.batch, episode_length=c.episode_length,
                     lr=c.meta_lr, eval_steps=checkpoint_schedule(steps, c.checkpoints) if outer else None,
                     on_eval=on_eval if outer else None, seed=seeds["meta_train"], progress=progress,
                     stage=f"LSTM {hidden} units × {steps} steps")
    with torch.no_grad():
        pred, _ = model(lstm_inputs(ref["x"], ref["y"]).float())
    norm = float((s**2).sum())
    error = episode_loss(pred.double(), ref["y"], norm).numpy()
    probe = probe_lstm(model, ref["test"], episode_length=c.episode_length, seed=seeds["probe"])
    rec = recovery_curve(probe.ks, probe.recovery, s)
    bayes = ref["estimators"]["bayes"]
    row = {
        "hidden": hidden, "meta_steps": steps, "seed": seed, "n_parameters": model.describe()["n_parameters"],
        "error": float(error.mean()), "error_per_position": error, "bayes_error": bayes["error"],
        "gap_to_bayes": float(error.mean()) - bayes["error"],
        "train_loss_final": float(log.train_loss[-1]), "held_out_loss_final": float(log.test_loss[-1]),
        "half_points": rec["concurrency"]["half_points"],
        "mean_half_point": (float(np.nanmean(rec["concurrency"]["half_points"]))
                            if np.isfinite(rec["concurrency"]["half_points"]).any() else None),
        "concurrency_index": rec["concurrency"]["index"], "censored": rec["concurrency"]["censored"],
        "recovery_at_n_x": rec["mean"][min(c.n_x, c.episode_length - 1)],
        "recovery_mean": rec["mean"], "linearity_r2_min": float(np.nanmin(probe.linearity_r2[1:])),
        "seconds": time.perf_counter() - started,
    }
    if outer:
        m = np.stack(recorded)  # (C, r)
        row["outer_loop"] = {"steps": log.steps, "recovery_full_context": m, "k": c.episode_length - 1,
                             "held_out_loss": log.test_loss,
                             "concurrency": outer_loop_concurrency(log.steps.astype(np.float64), m, s, partial=True)}
    return row


def run_metalearn_sweep(out: str | Path, config: MetalearnSweepConfig | None = None, *,
                        progress: ProgressFn | None = None) -> dict[str, Any]:
    """Sweep the LSTM's hidden size and meta-training steps; record its outer loop per prior (module docstring)."""
    c = config or MetalearnSweepConfig()
    s = checks.strengths(c.strengths)
    _check(c)
    outdir = output_folder(out)
    clock = RunClock()
    points = sweep_points(c)
    refs: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    total = len(points) * len(c.seeds)
    for prior, hidden, steps, outer in points:
        if prior not in refs:
            refs[prior] = _reference(c, s, prior)
        for seed in c.seeds:
            with clock.part(f"{prior} {hidden}x{steps} seed {seed}"):
                row = _train_point(c, s, refs[prior], hidden, steps, c.seed * 1000 + seed, outer, progress)
            rows.append({"prior": prior, **row})
            report(progress, "sweep points", len(rows), total)
    f_sweep = plot_metalearn_sweep(outdir / "metalearn_sweep.png", s, rows, c, {p: r["estimators"] for p, r in
                                                                               refs.items()})
    results = {
        "parameters": {**config_dict(c), "strengths": s, "derived_seeds": {p: r["seeds"] for p, r in refs.items()}},
        "definitions": {
            "error": "mean over positions k = 0..T-1 of ||y_hat_{k+1} - y_{k+1}||^2 / sum(s^2) on the shared held-out "
                     "episodes (1 = predicting 0)",
            "gap_to_bayes": "LSTM error - Bayes error on the same episodes (Bayes = min-norm for the rotation prior)",
            "half_points": "first k where the task-mean m_alpha(k) reaches 0.5 (min-norm: N_x/2 for every mode)",
            "outer_loop": "m_alpha(T-1) (full context) of outer_tasks held-out tasks at meta-training checkpoints; "
                          "half-steps at half the final value, index = std/mean over modes",
        },
        "references": {p: r["estimators"] for p, r in refs.items()},
        "points": [{k: v for k, v in row.items() if k != "outer_loop"} for row in rows],
        "outer_loop": {row["prior"]: {"hidden": row["hidden"], "meta_steps": row["meta_steps"], "seed": row["seed"],
                                      **row["outer_loop"]} for row in rows if "outer_loop" in row},
        "figures": [f_sweep.name],
        **clock.summary(),
    }
    return write_results(outdir, "metalearn-sweep", results)


def load_metalearn_sweep(folder: str | Path) -> dict[str, Any]:
    """Read the results.json of a ``metalearn-sweep`` folder (QKDissectError if it is not one)."""
    return load_results(folder, "metalearn-sweep")

