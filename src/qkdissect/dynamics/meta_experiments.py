"""``qkdissect dynamics metalearn``: run, write results and figures (shared helpers for ``icl`` too).

Output folder of :func:`run_metalearn` (read it back with :func:`load_metalearn`)::

    results.json        parameters, seeds, definitions, per system (learner, min_norm, ridge, bayes,
                        lstm) the mode-recovery curves (mean and standard error over the held-out
                        tasks) and a concurrency block (index, half points, order), the LSTM's
                        meta-training curves, timings and the machine load, library versions
    metalearn.png       (a) learner over samples seen, (b) ideal estimators over k, (c) LSTM over k,
                        (d) the concurrency index per system
    meta_training.png   meta-training / held-out loss of the LSTM and its held-out loss per position
    lstm.safetensors    the meta-trained LSTM (configuration in results.json → lstm.model)

Every number that is plotted is in results.json. All randomness derives from ``seed`` (the derived
seeds are recorded). Timings are wall-clock on the machine that ran them, with its load average.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qkdissect.dynamics import _checks, plots
from qkdissect.dynamics.estimators import estimator_recovery, min_norm_recovery
from qkdissect.dynamics.experiments import _outdir, versions, write_results
from qkdissect.dynamics.incontext import PRIORS, concurrency, make_prior_tasks
from qkdissect.dynamics.metalearn import LSTMMetaLearner, meta_train, probe_lstm, sgd_learner
from qkdissect.errors import QKDissectError

__all__ = ["run_metalearn", "load_metalearn", "QUICK_METALEARN", "DEFINITIONS"]

ProgressFn = Callable[[str, int, int], None]

#: Settings of ``metalearn --quick`` (tests): everything small.
QUICK_METALEARN: dict[str, Any] = dict(meta_steps=150, hidden=24, batch=16, n_train_tasks=500, n_test_tasks=48,
                                       episode_length=12, learner_steps=300, learner_record_every=5)
DEFINITIONS = {
    "mode_recovery": "m_alpha = u_alpha^T W_hat v_alpha / s_alpha (mean over held-out tasks; 1 = recovered)",
    "half_point": "first k (or samples seen) where the task-mean m_alpha reaches 0.5 (linear interpolation)",
    "concurrency_index": "std/mean over modes of the half points (0 = all modes at once); if a mode never "
                         "reaches 0.5 its point is set to the last record (censored = true: a censored "
                         "estimate); null if no mode reaches 0.5",
    "relative_concurrency_index": "the same with each mode's level = 0.5 x its own final recovery",
    "relative_error": "||y_hat - y||^2 / sum(s^2) averaged over positions (1 = predicting 0)",
}


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def _seeds(seed: int, names: Sequence[str]) -> dict[str, int]:
    g = np.random.default_rng(seed)
    return {name: int(g.integers(2**31 - 1)) for name in names}


def _stage(progress: ProgressFn | None, label: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda k, n: progress(label, k, n))


def _curve(steps: np.ndarray, per_task: np.ndarray, strengths: np.ndarray) -> dict[str, Any]:
    """Mean / sem over tasks of ``per_task`` (T, B, r) and its concurrency block."""
    mean = per_task.mean(1)
    b = per_task.shape[1]
    sem = per_task.std(1, ddof=1) / np.sqrt(b) if b > 1 else np.zeros_like(mean)
    return {"x": steps, "mean": mean, "sem": sem, "concurrency": concurrency(steps, mean, strengths).to_dict()}


# ----------------------------------------------------------------------------- metalearn


def run_metalearn(
    out: str | Path,
    strengths: Sequence[float] = (4, 3, 2, 1.5, 1, 0.7, 0.5, 0.3),
    *,
    n_x: int = 8,
    n_y: int = 8,
    prior: str = "rotation",
    noise: float = 0.0,
    ridge: float = 1.0,
    n_train_tasks: int = 50_000,
    n_test_tasks: int = 512,
    episode_length: int = 20,
    meta_steps: int = 20_000,
    hidden: int = 128,
    layers: int = 1,
    batch: int = 64,
    meta_lr: float = 1e-3,
    learner_hidden: int = 32,
    learner_lr: float = 0.01,
    learner_batch: int = 8,
    learner_steps: int = 3000,
    learner_a0: float = 1e-3,
    learner_record_every: int = 10,
    probe_scale: float = 1.0,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Learner vs ideal estimators vs LSTM meta-learner on the same held-out tasks (module docstring)."""
    s = _checks.strengths(strengths)
    if prior not in PRIORS:
        raise QKDissectError(f"--prior: expected one of {', '.join(PRIORS)}, got {prior!r}.")
    if noise < 0:
        raise QKDissectError(f"--noise: expected a standard deviation >= 0, got {noise!r}.")
    outdir = _outdir(out)
    load_start, started = _load(), time.perf_counter()
    seeds = _seeds(seed, ["train_tasks", "test_tasks", "learner", "estimators", "lstm_init", "meta_train", "probe"])
    train = make_prior_tasks(s, n_x, n_y, prior=prior, n_tasks=n_train_tasks, seed=seeds["train_tasks"])
    test = make_prior_tasks(s, n_x, n_y, prior=prior, n_tasks=n_test_tasks, seed=seeds["test_tasks"])
    timings: dict[str, float] = {}

    # (a) a fresh SGD learner per held-out task
    t0 = time.perf_counter()
    lt = sgd_learner(test, hidden=learner_hidden, lr=learner_lr, batch=learner_batch, n_steps=learner_steps,
                     a0=learner_a0, noise=noise, record_every=learner_record_every, seed=seeds["learner"],
                     progress=_stage(progress, "(a) SGD learners"))
    samples = lt.steps * lt.batch
    tau = 1.0 / learner_lr
    theory = np.mean([
        s / (1.0 + (s / a - 1.0) * np.exp(-2.0 * s[None, :] * lt.steps[:, None] / tau)) for a in lt.effective_a0
    ], axis=0) / s  # (T, r): Saxe depth 2 with each task's effective a0, averaged over tasks
    learner = _curve(samples, lt.recovery, s)
    learner.update({"sgd_steps": lt.steps, "theory_mean": theory, "loss": lt.loss,
                    "theory": "Saxe depth-2 curve a(t) = s/(1+(s/a_eff-1)exp(-2st/tau)), tau = 1/lr SGD steps, "
                              "a_eff = ||W2^T u + W1 v||^2/4 at init, averaged over tasks"})
    timings["learner"] = time.perf_counter() - t0

    # (b) ideal in-context estimators on the same tasks
    t0 = time.perf_counter()
    ks = np.arange(episode_length)
    est = estimator_recovery(test, ks, ridge=ridge, noise=noise, prior=prior, seed=seeds["estimators"])
    estimators = {name: _curve(ks, e.per_task, s) for name, e in est.items()}
    estimators["min_norm"]["closed_form"] = min_norm_recovery(ks, n_x)
    bayes_is_min_norm = bool(prior == "rotation" and noise == 0)
    timings["estimators"] = time.perf_counter() - t0
    if progress is not None:
        progress("(b) estimators", 1, 1)

    # (c) LSTM meta-learner
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seeds["lstm_init"])
        model = LSTMMetaLearner(n_x, n_y, hidden=hidden, layers=layers)
    log = meta_train(model, train, test, n_steps=meta_steps, batch=batch, episode_length=episode_length,
                     lr=meta_lr, noise=noise, seed=seeds["meta_train"], progress=_stage(progress, "(c) meta-training"))
    probe = probe_lstm(model, test, episode_length=episode_length, noise=noise, probe_scale=probe_scale,
                       seed=seeds["probe"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(outdir / "lstm.safetensors"))
    lstm = _curve(probe.ks, probe.recovery, s)
    lstm.update({
        "linearity_r2": probe.linearity_r2, "probe_scale": probe.probe_scale, "model": model.describe(),
        "weights": "lstm.safetensors",
        "meta_training": {"steps": log.steps, "train_loss": log.train_loss, "test_loss": log.test_loss,
                          "test_loss_per_position": log.test_loss_per_step, "seconds": log.seconds},
    })
    timings["lstm"] = time.perf_counter() - t0

    systems = {"learner": learner, **estimators, "lstm": lstm}
    summary = {name: {"concurrency_index": sys_["concurrency"]["index"],
                      "censored": sys_["concurrency"]["censored"],
                      "relative_concurrency_index": sys_["concurrency"]["relative_index"],
                      "order_matches_strengths": sys_["concurrency"]["order_matches_strengths"]}
               for name, sys_ in systems.items()}
    f_main = plots.plot_metalearn(outdir / "metalearn.png", s, systems, n_x=n_x, ridge=ridge,
                                  bayes_is_min_norm=bayes_is_min_norm)
    f_train = plots.plot_meta_training(outdir / "meta_training.png", lstm["meta_training"])
    lstm_c, learner_c = lstm["concurrency"], learner["concurrency"]
    findings = {
        "learner_staggered_strongest_first": learner_c["order_matches_strengths"],
        "min_norm_concurrent_closed_form": "m_alpha(k) = min(k, N_x)/N_x for every mode (index 0)",
        "lstm_more_concurrent_than_learner": bool(lstm_c["index"] < learner_c["index"]),
        "lstm_reaches_min_norm": bool(np.all(lstm["mean"][min(n_x, episode_length - 1)] > 0.9)),
        "note": ("Rabinowitz (2019) reports LSTM meta-learners recovering all modes concurrently, close to the "
                 "Bayes-optimal estimator. Compare lstm vs min_norm/bayes curves: concurrency and speed are "
                 "separate questions (an LSTM can be concurrent yet slower than min-norm)."),
    }
    results = {
        "command": "metalearn",
        "parameters": {
            "strengths": s, "n_x": n_x, "n_y": n_y, "prior": prior, "noise": noise, "ridge_lambda": ridge,
            "n_train_tasks": n_train_tasks, "n_test_tasks": n_test_tasks, "episode_length": episode_length,
            "meta_steps": meta_steps, "hidden": hidden, "layers": layers, "batch": batch, "meta_lr": meta_lr,
            "learner_hidden": learner_hidden, "learner_lr": learner_lr, "learner_batch": learner_batch,
            "learner_steps": learner_steps, "learner_a0": learner_a0, "probe_scale": probe_scale, "seed": seed,
            "derived_seeds": seeds,
        },
        "choices": {
            "lstm": "1-layer LSTM (hidden units as given) reading (x_t, y_{t-1}), linear readout of h_t; Adam, "
                    "cosine decay to 0, gradient clipping 1.0, loss = relative error over the episode; tasks "
                    "drawn with replacement from a finite training pool, fresh x every episode. Rabinowitz's "
                    "exact sizes and training details could not be confirmed (abstract only): these are ours.",
            "learner": "2-layer linear net, hidden width learner_hidden, small random init (product ~ a0), "
                       "minibatch SGD on fresh samples of its own task",
            "evaluation": "all systems are evaluated on the same held-out test tasks (never in the training pool)",
            "bayes": ("exact posterior mean = min-norm (rotation prior, no noise)" if bayes_is_min_norm else
                      "posterior mean under a Gaussian prior with the task prior's second moments (approximation)"),
        },
        "definitions": DEFINITIONS,
        "systems": systems,
        "concurrency_summary": summary,
        "findings": findings,
        "timings_seconds": {**timings, "total": time.perf_counter() - started},
        "load_average": {"start": load_start, "end": _load()},
        "torch_threads": torch.get_num_threads(),
        "figures": [f_main.name, f_train.name],
        "versions": versions(),
    }
    return write_results(outdir, results)


def load_metalearn(folder: str | Path) -> dict[str, Any]:
    """Read the results.json of a ``metalearn`` folder (QKDissectError if it is not one)."""
    return _load_results(folder, "metalearn")


def _load_results(folder: str | Path, command: str) -> dict[str, Any]:
    from qkdissect.files import read_json_document

    return read_json_document(Path(folder) / "results.json", missing=f"{folder} is not a `qkdissect dynamics "
                              f"{command}` folder", remedy=f"re-run `qkdissect dynamics {command}`", kind=command,
                              key="command")

