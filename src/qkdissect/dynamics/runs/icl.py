"""``qkdissect dynamics icl``: train in-context regression transformers, follow their QK/OV modes.

Output folder of :func:`run_icl` (read it back with :func:`load_icl`)::

    results.json        parameters, seeds, definitions, timings with the machine load, and one entry
                        per variant (attention × prior) with
                          training     held-out / training relative error at the checkpoints
                          outer_loop   per checkpoint, layer and head the singular values (qkdissect
                                       factored SVD) of W_QᵀW_K (full, x–x block), W_OW_V (full, y←y
                                       block), the x–x diagonal per input coordinate, and m_α(N) (the
                                       in-context recovery with the full context) — with half-times
                                       (first step at half the final value) and staggering indices
                          in_context   m_α(k), k = 0 … N, of the trained model (mean, s.e. over the
                                       held-out tasks), R² of its linear read-out, and min-norm / ridge /
                                       Bayes on the same tasks, each with a concurrency block
                          cosines      per head: weighted cosine and per-mode cosines of the full
                                       W_QᵀW_K and of its x–x block, ω, distance from ω·I, null bands
    icl_outer_loop.png  rows = variants: loss, KQ x–x singular values, OV y←y singular values, m_α(N)
    icl_in_context.png  m_α(k) of each trained model vs min-norm / ridge / Bayes
    icl_cosines.png     weighted cosine per head: full W_QᵀW_K vs its x–x block, with the null bands
    <variant>/checkpoints/step_NNNNNNN.safetensors   state dicts during training (load_checkpoint)
    <variant>/model.safetensors                      the trained model
    <variant>/atlas/                                 its standard qkdissect atlas (``qkdissect report``)

``<variant>`` is ``{attention}-{prior}``, e.g. ``softmax-rotation``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import staggering
from qkdissect.dynamics.incontext.estimators import estimator_recovery, min_norm_recovery
from qkdissect.dynamics.incontext.model import ATTENTION_KINDS, ICLTransformer
from qkdissect.dynamics.incontext.setting import PRIORS, concurrency, make_prior_tasks, task_subset
from qkdissect.dynamics.incontext.train import cosine_statistics, probe_icl, train_icl, weight_spectra
from qkdissect.dynamics.linear.tasks import LinearTask
from qkdissect.dynamics.plots.incontext import plot_icl_cosines, plot_icl_in_context, plot_icl_outer_loop
from qkdissect.dynamics.runs.common import (
    RunClock,
    config_dict,
    derive_seeds,
    load_results,
    output_folder,
    recovery_curve,
    write_results,
)
from qkdissect.dynamics.runs.configs import ICLConfig
from qkdissect.dynamics.runs.metalearn import DEFINITIONS
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn

__all__ = ["load_icl", "run_icl"]


def _variant(
    outdir: Path, c: ICLConfig, attention: str, prior: str, s: np.ndarray, train: LinearTask, test: LinearTask,
    seeds: dict[str, int], progress: ProgressFn | None,
) -> dict[str, Any]:
    """Train one transformer and analyse it: outer loop, in-context recovery, cosines; returns its entry."""
    name = f"{attention}-{prior}"
    folder = outdir / name
    t_start = time.perf_counter()
    n_x, context = c.n_x, c.context
    model = ICLTransformer(n_x, c.n_y or n_x, n_layers=c.layers, n_heads=c.heads, d_head=c.d_head or None,
                           attention=attention, context=context, init_scale=c.init_scale, seed=seeds["model_init"])
    outer = task_subset(test, slice(0, min(c.outer_tasks, test.n_tasks)))
    snapshots: list[dict[str, torch.Tensor]] = []
    m_full: list[np.ndarray] = []

    def on_checkpoint(step: int, m: ICLTransformer) -> None:
        snapshots.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        p = probe_icl(m, outer, [context], noise=c.noise, probe_scale=c.probe_scale, n_random=1, seed=seeds["outer"])
        m_full.append(p.recovery[0].mean(0))

    log = train_icl(model, train, test, n_steps=c.steps, batch=c.batch, lr=c.lr, optimizer=c.optimizer,
                    noise=c.noise, n_checkpoints=c.checkpoints, checkpoint_dir=folder / "checkpoints",
                    on_checkpoint=on_checkpoint, seed=seeds["train"], progress=progress, stage=f"training {name}")
    t_train = time.perf_counter() - t_start
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    ck = log.checkpoint_steps
    spectra = weight_spectra(snapshots, n_x)
    m_outer = np.stack(m_full)  # (C, r)
    final = m_outer[-1]
    if np.all(final > 0.1):
        outer_conc = concurrency(ck, m_outer / final, s).to_dict()
    else:  # relative to a final value near 0 the half-step is noise
        outer_conc = {"index": None, "half_points": None, "order_matches_strengths": None,
                      "note": "some mode has final m_alpha(N) <= 0.1: not learned, no half-step"}
    diag_strength = np.abs(spectra["kq_xx_diag"]).sum(2)  # (C, L, N_x): Σ_h |M_xx,h[α, α]|
    outer_loop = {
        "steps": ck,
        "singular_values": {k: spectra[k] for k in ("kq", "kq_xx", "ov", "ov_yy")},
        "kq_xx_diagonal": spectra["kq_xx_diag"],
        "staggering": {k: staggering(ck, spectra[k]) for k in ("kq_xx", "ov_yy", "kq", "ov")},
        "diagonal_strength": diag_strength,
        "diagonal_staggering": staggering(ck, diag_strength[..., : s.size]),
        "m_full_context": m_outer,
        "m_full_context_concurrency": outer_conc,
        "m_full_context_concurrency_definition": "concurrency of m_alpha(N)(step) / m_alpha(N)(final): "
                                                  "half-steps at half the final value, index = std/mean",
    }
    ks = np.arange(context + 1)
    probe = probe_icl(model, test, list(ks), noise=c.noise, probe_scale=c.probe_scale, seed=seeds["probe"])
    est = estimator_recovery(test, ks, ridge=c.ridge, noise=c.noise, prior=prior, seed=seeds["estimators"])
    in_context = recovery_curve(ks, probe.recovery, s)
    in_context.update({
        "linearity_r2": probe.linearity_r2, "probe_scale": probe.probe_scale,
        "estimators": {n: recovery_curve(ks, e.per_task, s) for n, e in est.items()},
        "min_norm_closed_form": min_norm_recovery(ks, n_x),
    })
    cos = cosine_statistics(model, spec=f"icl-transformer:{name}")
    atlas = cos.pop("atlas")
    atlas.save(folder / "atlas")
    return {
        "name": name, "attention": attention, "prior": prior, "model": model.describe(),
        "training": {"steps": log.steps, "train_loss": log.train_loss, "test_loss": log.test_loss,
                     "test_loss_per_k": log.test_loss_per_k, "seconds": log.seconds},
        "checkpoints": [f"{name}/checkpoints/{f}" for f in log.checkpoint_files],
        "weights": f"{name}/model.safetensors",
        "atlas": f"{name}/atlas",
        "outer_loop": outer_loop,
        "in_context": in_context,
        "cosines": cos,
        "seconds": time.perf_counter() - t_start,
        "seconds_training": t_train,
    }


def _summary(v: dict[str, Any], s: np.ndarray) -> dict[str, Any]:
    """The headline numbers of a variant (also printed by the CLI)."""
    heads = v["cosines"]["heads"]
    st = v["outer_loop"]["staggering"]
    oc = v["outer_loop"]["m_full_context_concurrency"]
    ic = v["in_context"]["concurrency"]
    return {
        "final_test_loss": float(v["training"]["test_loss"][-1]),
        "outer_loop_m_full_context_index": oc.get("index"),
        "outer_loop_m_full_context_half_steps": oc.get("half_points"),
        "outer_loop_m_full_context_strongest_first": oc.get("order_matches_strengths"),
        "outer_loop_kq_xx_index_per_head": st["kq_xx"]["index"],
        "outer_loop_kq_xx_largest_first_per_head": st["kq_xx"]["largest_first"],
        "outer_loop_diagonal_half_steps": v["outer_loop"]["diagonal_staggering"]["half_times"],
        "in_context_index": ic["index"],
        "in_context_censored": ic["censored"],
        "in_context_relative_index": ic["relative_index"],
        "min_norm_in_context_index": v["in_context"]["estimators"]["min_norm"]["concurrency"]["index"],
        "bayes_in_context_index": v["in_context"]["estimators"]["bayes"]["concurrency"]["index"],
        "mean_xx_weighted_cosine": float(np.mean([h["xx_weighted_cosine"] for h in heads])),
        "mean_abs_xx_weighted_cosine": float(np.mean([abs(h["xx_weighted_cosine"]) for h in heads])),
        "mean_full_weighted_cosine": float(np.mean([h["full_weighted_cosine"] for h in heads])),
        "omega_per_head": [h["omega"] for h in heads],
        "xx_weighted_cosine_per_head": [h["xx_weighted_cosine"] for h in heads],
        "full_weighted_cosine_per_head": [h["full_weighted_cosine"] for h in heads],
    }


#: Threshold on a concurrency / staggering index used for the yes/no findings (the numbers are reported too).
INDEX_THRESHOLD = 0.1


def _findings(v: dict[str, Any]) -> dict[str, Any]:
    """Yes/no answers, with the numbers behind them, to the three questions for one variant: is the outer
    loop staggered, is in-context recovery concurrent, is the KQ x–x block ≈ ω·I?"""
    sm = v["summary"]
    heads = v["cosines"]["heads"]
    oc = v["outer_loop"]["m_full_context_concurrency"]
    idx, ic = oc.get("index"), sm["in_context_index"]
    abs_xx = [abs(h["xx_weighted_cosine"]) for h in heads]
    dist = [h["xx_relative_distance_from_omega_identity"] for h in heads]
    return {
        "outer_loop_staggered": None if idx is None else bool(idx > INDEX_THRESHOLD),
        "outer_loop_strongest_first": oc.get("order_matches_strengths"),
        "in_context_concurrent": None if ic is None else bool(ic < INDEX_THRESHOLD),
        "kq_xx_close_to_omega_identity": bool(np.median(abs_xx) > 0.95),
        "kq_xx_each_head_omega_identity": bool(np.median(dist) < 0.1),
        "kq_xx_same_sign_sum_omega_identity": bool(all(
            g["relative_distance_from_omega_identity"] < 0.1 for g in v["cosines"]["sign_groups"])),
        "kq_xx_sign_groups": [{k: g[k] for k in ("layer", "sign", "heads", "omega",
                                                   "relative_distance_from_omega_identity")}
                              for g in v["cosines"]["sign_groups"]],
        "median_abs_xx_weighted_cosine": float(np.median(abs_xx)),
        "median_xx_relative_distance_from_omega_identity": float(np.median(dist)),
        "n_heads_omega_positive": int(sum(h["omega"] > 0 for h in heads)),
        "n_heads_omega_negative": int(sum(h["omega"] < 0 for h in heads)),
        "threshold": f"staggered if index > {INDEX_THRESHOLD}, concurrent if index < {INDEX_THRESHOLD}; "
                     "KQ x-x block ~ omega*I (by cosine) if the median |weighted cosine| over heads > 0.95; "
                     "(by distance) if the relative Frobenius distance from omega*I < 0.1",
    }


def run_icl(out: str | Path, config: ICLConfig | None = None, *, progress: ProgressFn | None = None
            ) -> dict[str, Any]:
    """Train one transformer per (attention, prior) and analyse it (module docstring)."""
    c = config or ICLConfig()
    s = checks.strengths(c.strengths)
    n_y = c.n_y or c.n_x
    for a in c.attention:
        if a not in ATTENTION_KINDS:
            raise QKDissectError(f"--attention: expected a comma list of {', '.join(ATTENTION_KINDS)}, got {a!r}.")
    for p in c.prior:
        if p not in PRIORS:
            raise QKDissectError(f"--prior: expected a comma list of {', '.join(PRIORS)}, got {p!r}.")
    if not c.attention or not c.prior:
        raise QKDissectError("--attention and --prior need at least one value each.")
    if c.noise < 0:
        raise QKDissectError(f"--noise: expected a standard deviation >= 0, got {c.noise!r}.")
    outdir = output_folder(out)
    clock = RunClock()
    variants = []
    all_seeds: dict[str, dict[str, int]] = {}
    for prior in c.prior:
        seeds = derive_seeds(c.seed + PRIORS.index(prior),
                             ["train_tasks", "test_tasks", "model_init", "train", "probe", "outer", "estimators"])
        all_seeds[prior] = seeds
        train = make_prior_tasks(s, c.n_x, n_y, prior=prior, n_tasks=c.train_tasks, seed=seeds["train_tasks"])
        test = make_prior_tasks(s, c.n_x, n_y, prior=prior, n_tasks=c.test_tasks, seed=seeds["test_tasks"])
        for attention in c.attention:
            with clock.part(f"{attention}-{prior}"):
                v = _variant(outdir, c, attention, prior, s, train, test, seeds, progress)
            v["summary"] = _summary(v, s)
            v["findings"] = _findings(v)
            variants.append(v)
    f_outer = plot_icl_outer_loop(outdir / "icl_outer_loop.png", s, variants)
    f_in = plot_icl_in_context(outdir / "icl_in_context.png", s, variants, ridge=c.ridge)
    f_cos = plot_icl_cosines(outdir / "icl_cosines.png", variants)
    results = {
        "parameters": {**config_dict(c), "strengths": s, "n_y": n_y, "d_head": c.d_head or c.n_x + n_y,
                       "derived_seeds": all_seeds},
        "choices": {
            "model": "attention-only transformer on raw tokens (x, y), d_model = n_x + n_y, no embedding, no "
                     "LayerNorm, no MLP; prediction = y-part of the query's output; see qkdissect.dynamics.incontext.model",
            "training": "every batch: N context samples and N+1 fresh queries seeing k = 0..N of them; loss = "
                        "relative error averaged over k; constant learning rate; same tasks and same initial "
                        "weights for the attention variants of a prior",
            "priors": "rotation: U, V Haar per task (the distribution shared with `metalearn`); aligned: V = first "
                      "r input axes for every task, U Haar per task (mode alpha always reads input coordinate alpha)",
            "outer_loop_half_time": "first checkpoint step at which a quantity reaches half its final value "
                                    "(quantities below 10% of the largest final value in their group left out)",
        },
        "definitions": {**DEFINITIONS,
                        "outer_loop_index": "std/mean of the half-times (0 = all learned at the same step)"},
        "variants": variants,
        "summary": {v["name"]: v["summary"] for v in variants},
        "findings": {v["name"]: v["findings"] for v in variants},
        "paper_comparison": (
            "'In-Context Linear Regression Demystified' reports trained one-layer multi-head softmax KQ matrices "
            "~ omega_h * I (cos(u, v) ~ +1, or -1 for heads with omega_h < 0); von Oswald et al. construct linear "
            "attention with KQ x-x ~ I (one gradient step). Compare with findings[*].kq_xx_close_to_omega_identity "
            "and the per-head omega. Rabinowitz's meta-learner picture predicts concurrent in-context recovery; "
            "Saxe's picture predicts staggered outer-loop learning where the prior ties strengths to fixed "
            "directions (prior 'aligned'); under the rotation-invariant prior no direction is privileged."),
        "figures": [f_outer.name, f_in.name, f_cos.name],
        **clock.summary(),
    }
    return write_results(outdir, "icl", results)


def load_icl(folder: str | Path) -> dict[str, Any]:
    """Read the results.json of an ``icl`` folder (QKDissectError if it is not one)."""
    return load_results(folder, "icl")
