"""``qkdissect dynamics metalearn``: learners vs ideal estimators vs a meta-trained LSTM.

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

from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.incontext.estimators import estimator_recovery, min_norm_recovery
from qkdissect.dynamics.incontext.metalearn import LSTMMetaLearner, meta_train, probe_lstm, sgd_learner
from qkdissect.dynamics.incontext.setting import PRIORS, make_prior_tasks
from qkdissect.dynamics.linear.theory import mode_strength_function
from qkdissect.dynamics.plots.incontext import plot_meta_training, plot_metalearn
from qkdissect.dynamics.runs.common import (
    RunClock,
    config_dict,
    derive_seeds,
    load_results,
    output_folder,
    recovery_curve,
    write_results,
)
from qkdissect.dynamics.runs.configs import MetalearnConfig
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, report

__all__ = ["DEFINITIONS", "load_metalearn", "run_metalearn"]

DEFINITIONS = {
    "mode_recovery": "m_alpha = u_alpha^T W_hat v_alpha / s_alpha (mean over held-out tasks; 1 = recovered)",
    "half_point": "first k (or samples seen) where the task-mean m_alpha reaches 0.5 (linear interpolation)",
    "concurrency_index": "std/mean over modes of the half points (0 = all modes at once); if a mode never "
                         "reaches 0.5 its point is set to the last record (censored = true: a censored "
                         "estimate); null if no mode reaches 0.5",
    "relative_concurrency_index": "the same with each mode's level = 0.5 x its own final recovery",
    "relative_error": "||y_hat - y||^2 / sum(s^2) averaged over positions (1 = predicting 0)",
}


def run_metalearn(out: str | Path, config: MetalearnConfig | None = None, *,
                  progress: ProgressFn | None = None) -> dict[str, Any]:
    """Learner vs ideal estimators vs LSTM meta-learner on the same held-out tasks (module docstring)."""
    c = config or MetalearnConfig()
    s = checks.strengths(c.strengths)
    if c.prior not in PRIORS:
        raise QKDissectError(f"--prior: expected one of {', '.join(PRIORS)}, got {c.prior!r}.")
    if c.noise < 0:
        raise QKDissectError(f"--noise: expected a standard deviation >= 0, got {c.noise!r}.")
    outdir = output_folder(out)
    clock = RunClock()
    seeds = derive_seeds(c.seed, ["train_tasks", "test_tasks", "learner", "estimators", "lstm_init", "meta_train",
                                  "probe"])
    train = make_prior_tasks(s, c.n_x, c.n_y, prior=c.prior, n_tasks=c.train_tasks, seed=seeds["train_tasks"])
    test = make_prior_tasks(s, c.n_x, c.n_y, prior=c.prior, n_tasks=c.test_tasks, seed=seeds["test_tasks"])

    with clock.part("learner"):  # (a) a fresh SGD learner per held-out task
        lt = sgd_learner(test, hidden=c.learner_hidden, lr=c.learner_lr, batch=c.learner_batch,
                         n_steps=c.learner_steps, a0=c.learner_a0, noise=c.noise,
                         record_every=c.learner_record_every, seed=seeds["learner"], progress=progress)
        tau = 1.0 / c.learner_lr
        # Saxe depth 2 with each task's effective a0, averaged over tasks: (T, r)
        theory = np.mean([mode_strength_function(s, a, 2, tau, float(lt.steps[-1]))(lt.steps)
                          for a in lt.effective_a0], axis=0) / s
        learner = recovery_curve(lt.steps * lt.batch, lt.recovery, s)
        learner.update({"sgd_steps": lt.steps, "theory_mean": theory, "loss": lt.loss,
                        "theory": "Saxe depth-2 curve a(t) = s/(1+(s/a_eff-1)exp(-2st/tau)), tau = 1/lr SGD "
                                  "steps, a_eff = ||W2^T u + W1 v||^2/4 at init, averaged over tasks"})

    with clock.part("estimators"):  # (b) ideal in-context estimators on the same tasks
        ks = np.arange(c.episode_length)
        est = estimator_recovery(test, ks, ridge=c.ridge, noise=c.noise, prior=c.prior, seed=seeds["estimators"])
        estimators = {name: recovery_curve(ks, e.per_task, s) for name, e in est.items()}
        estimators["min_norm"]["closed_form"] = min_norm_recovery(ks, c.n_x)
        bayes_is_min_norm = bool(c.prior == "rotation" and c.noise == 0)
        report(progress, "estimators", 1, 1)

    with clock.part("lstm"):  # (c) LSTM meta-learner
        with torch.random.fork_rng():
            torch.manual_seed(seeds["lstm_init"])
            model = LSTMMetaLearner(c.n_x, c.n_y, hidden=c.hidden, layers=c.layers)
        log = meta_train(model, train, test, n_steps=c.meta_steps, batch=c.batch, episode_length=c.episode_length,
                         lr=c.meta_lr, noise=c.noise, seed=seeds["meta_train"], progress=progress)
        probe = probe_lstm(model, test, episode_length=c.episode_length, noise=c.noise, probe_scale=c.probe_scale,
                           seed=seeds["probe"])
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(outdir / "lstm.safetensors"))
        lstm = recovery_curve(probe.ks, probe.recovery, s)
        lstm.update({
            "linearity_r2": probe.linearity_r2, "probe_scale": probe.probe_scale, "model": model.describe(),
            "weights": "lstm.safetensors",
            "meta_training": {"steps": log.steps, "train_loss": log.train_loss, "test_loss": log.test_loss,
                              "test_loss_per_position": log.test_loss_per_step, "seconds": log.seconds},
        })

    systems = {"learner": learner, **estimators, "lstm": lstm}
    summary = {name: {"concurrency_index": sys_["concurrency"]["index"],
                      "censored": sys_["concurrency"]["censored"],
                      "relative_concurrency_index": sys_["concurrency"]["relative_index"],
                      "order_matches_strengths": sys_["concurrency"]["order_matches_strengths"]}
               for name, sys_ in systems.items()}
    f_main = plot_metalearn(outdir / "metalearn.png", s, systems, n_x=c.n_x, ridge=c.ridge,
                            bayes_is_min_norm=bayes_is_min_norm)
    f_train = plot_meta_training(outdir / "meta_training.png", lstm["meta_training"])
    lstm_c, learner_c = lstm["concurrency"], learner["concurrency"]
    findings = {
        "learner_staggered_strongest_first": learner_c["order_matches_strengths"],
        "min_norm_concurrent_closed_form": "m_alpha(k) = min(k, N_x)/N_x for every mode (index 0)",
        "lstm_more_concurrent_than_learner": bool(lstm_c["index"] < learner_c["index"]),
        "lstm_reaches_min_norm": bool(np.all(lstm["mean"][min(c.n_x, c.episode_length - 1)] > 0.9)),
        "note": ("Rabinowitz (2019) reports LSTM meta-learners recovering all modes concurrently, close to the "
                 "Bayes-optimal estimator. Compare lstm vs min_norm/bayes curves: concurrency and speed are "
                 "separate questions (an LSTM can be concurrent yet slower than min-norm)."),
    }
    results = {
        "parameters": {**config_dict(c), "strengths": s, "derived_seeds": seeds},
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
        "figures": [f_main.name, f_train.name],
        **clock.summary(),
    }
    return write_results(outdir, "metalearn", results)


def load_metalearn(folder: str | Path) -> dict[str, Any]:
    """Read the results.json of a ``metalearn`` folder (QKDissectError if it is not one)."""
    return load_results(folder, "metalearn")
