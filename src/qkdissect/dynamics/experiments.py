"""The four experiments behind ``qkdissect dynamics …``: run, write results.json and PNG figures.

Each ``run_*`` function returns the results dictionary it wrote to ``out/results.json``
(every number that is plotted, the parameters, seeds and library versions). NaN is written as
``null``. The command-line interface in :mod:`qkdissect.dynamics.cli` is a thin layer over these.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from qkdissect.dynamics import _checks, plots, rmt
from qkdissect.dynamics.generalization import (
    ERROR_DEFINITIONS,
    generalization_theory,
    shrinkage_sweep,
    simulate_generalization,
)
from qkdissect.dynamics.simulate import simulate_modes
from qkdissect.dynamics.sweep import depth_sweep
from qkdissect.dynamics.theory import (
    _mode_strength_unchecked,
    discrete_mode_strength,
    half_time,
    mode_strength,
)
from qkdissect.dynamics.transfer import simulate_transfer, transfer_theory
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write, library_versions

__all__ = [
    "run_saxe",
    "run_depth_sweep",
    "run_generalization",
    "run_transfer",
    "DEFAULT_SWEEP_SETTINGS",
]

ProgressFn = Callable[[str, int, int], None]


def _nanmedian(x: np.ndarray, axis: int) -> np.ndarray:
    """Median ignoring NaN; all-NaN slices (after an early stop) give NaN without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmedian(x, axis=axis)

#: (N_i, N_o, teacher strengths) of the shrinkage-vs-GD sweep of ``run_generalization``.
DEFAULT_SWEEP_SETTINGS: tuple[tuple[int, int, tuple[float, ...]], ...] = (
    (100, 100, (3.0,)),
    (100, 100, (1.5,)),
    (100, 100, (1.2,)),
    (100, 100, (4.0, 2.0)),
    (100, 50, (2.0,)),
    (100, 25, (5.0, 1.0)),
    (100, 50, (0.7,)),
)


def versions() -> dict[str, str]:
    """Library versions recorded in every results.json (scipy and matplotlib always included)."""
    return library_versions(required=("scipy", "matplotlib"))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_results(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``results.json`` into ``out`` and return the JSON-ready dictionary."""
    data = _jsonable(results)
    text = json.dumps(data, indent=1, allow_nan=False)
    atomic_write(out / "results.json", lambda path: path.write_text(text))
    return data


def _outdir(out: str | Path) -> Path:
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QKDissectError(
            f"--out: cannot create directory {str(p)!r} ({exc}). Choose a writable path."
        ) from exc
    return p


def _subsample(n: int, k: int = 1500) -> np.ndarray:
    idx = np.arange(0, n, max(1, n // k))
    return idx if idx[-1] == n - 1 else np.append(idx, n - 1)


# ----------------------------------------------------------------------------- saxe


def run_saxe(
    out: str | Path,
    strengths: Sequence[float] = (5, 4, 3, 2, 1),
    *,
    depth: int = 2,
    a0: float = 1e-6,
    lr: float = 1e-3,
    init: str = "decoupled",
    gain: float = 1.0,
    n_seeds: int = 3,
    hidden: int = 32,
    n_steps: int | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Mode-by-mode learning: analytic curves and half-times vs a full-matrix simulation."""
    s = _checks.strengths(strengths)
    tau = 1.0 / _checks.positive(lr, "lr")
    outdir = _outdir(out)
    th_half = half_time(s, a0, depth=depth, tau=tau)
    if n_steps is None:
        n_steps = int(np.ceil(2.0 * th_half.max()))
    h = max(int(hidden), s.size)
    prog = None if progress is None else (lambda k, n: progress("simulating", k, n))
    sim = simulate_modes(
        s, depth=depth, a0=a0, lr=lr, n_steps=n_steps, init=init, gain=gain,
        n_seeds=n_seeds, hidden=h, seed=seed, progress=prog,
    )
    theory = mode_strength(s, a0, sim.steps, depth=depth, tau=tau)
    dev = np.abs(sim.strengths - theory[:, None, :]) / s  # (T, B, M)
    sim_half = sim.half_times()
    per_mode = []
    discrete = None
    if init == "decoupled":
        discrete = discrete_mode_strength(s, a0, n_steps, depth=depth, lr=lr)
    for m, sm in enumerate(s):
        row: dict[str, Any] = {
            "strength": sm,
            "analytic_half_time": th_half[m],
            "simulated_half_time": float(np.nanmean(sim_half[:, m])),
            "simulated_half_time_per_seed": sim_half[:, m],
            "half_time_ratio_sim_over_analytic": float(np.nanmean(sim_half[:, m]) / th_half[m]),
            "max_relative_deviation": float(dev[:, :, m].max()),
        }
        if discrete is not None:
            row["max_relative_deviation_from_discrete_gd"] = float(
                (np.abs(sim.strengths[:, :, m] - discrete[sim.steps, m, None]) / sm).max()
            )
        if sim.effective_a0 is not None:
            eff = sim.effective_a0[:, m]
            pred = tau / (2 * sm) * np.log(sm / eff - 1.0)
            row["effective_a0_per_seed"] = eff
            row["predicted_half_time_effective_a0_per_seed"] = pred
        per_mode.append(row)
    idx = _subsample(sim.steps.size)
    fig = plots.plot_mode_strengths(
        outdir / "mode_strengths.png", sim.steps[idx], sim.strengths[idx], theory[idx], s,
        analytic_half_times=th_half,
        title=f"Depth {depth}, {init} init, a0={a0:g}, lr={lr:g} (τ={tau:g} epochs)",
    )
    order_ok = bool(np.all(np.diff(np.nanmean(sim_half, 0)[np.argsort(-s)]) > 0))
    results = {
        "command": "saxe",
        "parameters": {
            "strengths": s, "depth": depth, "a0": a0, "lr": lr, "tau": tau, "init": init,
            "gain": gain, "n_seeds": n_seeds, "hidden": h, "n_steps": n_steps, "seed": seed,
            "layer_sizes": sim.layer_sizes,
        },
        "normalisation": {
            "loss": "1/2 ||Sigma_yx - W_N...W_1||_F^2 (whitened inputs)",
            "time_unit": "epochs = full-batch gradient steps; tau = 1/lr",
            "a0": "initial strength of the product on each mode (decoupled: per layer a0^(1/N))",
            "theory": "tau da/dt = N a^(2-2/N) (s - a); closed form for N<=2, DOP853 ODE otherwise",
            "max_relative_deviation": "max over recorded steps and seeds of |a_sim - a_theory| / s "
            "(every step recorded)",
        },
        "modes": per_mode,
        "modes_learned_in_order_of_strength": order_ok,
        "curves": {
            "steps": sim.steps[idx],
            "theory": theory[idx],
            "simulated": sim.strengths[idx],
            "relative_deviation_max_over_seeds": dev[idx].max(1),
            "off_mode_norm": sim.off_mode_norm[idx],
        },
        "figures": [fig.name],
        "versions": versions(),
    }
    return write_results(outdir, results)


# ----------------------------------------------------------------------------- depth sweep


def run_depth_sweep(
    out: str | Path,
    depths: Sequence[int] = (2, 4, 8, 16),
    inits: Sequence[str] = ("orthogonal", "gaussian"),
    strengths: Sequence[float] = (4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5),
    *,
    lr: float = 1e-2,
    lr_scaling: str = "1/N",
    criterion: float = 0.01,
    max_steps: int = 20_000,
    n_seeds: int = 8,
    width: int | None = None,
    gain: float = 1.0,
    a0: float = 1e-3,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Learning time vs depth for several initialisations."""
    _checks.positive(lr, "lr")
    outdir = _outdir(out)
    sw = depth_sweep(
        depths, inits, strengths, lr=lr, lr_scaling=lr_scaling, criterion=criterion,
        max_steps=max_steps, n_seeds=n_seeds, width=width, gain=gain, a0=a0, seed=seed,
        progress=progress,
    )
    fig = plots.plot_depth_sweep(outdir / "depth_sweep.png", sw)
    table = []
    for i, kind in enumerate(sw.inits):
        for j, d in enumerate(sw.depths):
            t = sw.times[i, j]
            table.append({
                "init": kind, "depth": d, "lr": sw.lrs[j],
                "median_time": float(np.median(np.where(np.isnan(t), np.inf, t))),
                "mean_time_reached": float(np.nanmean(t)) if np.isfinite(t).any() else None,
                "n_not_reached": int(np.isnan(t).sum()),
                "times_per_seed": t, "theory_time": sw.theory_times[i, j],
            })
    results = {
        "command": "depth-sweep",
        "parameters": {
            "depths": sw.depths, "inits": sw.inits, "strengths": sw.strengths, "lr": lr,
            "lr_scaling": lr_scaling, "criterion": criterion, "max_steps": max_steps,
            "n_seeds": n_seeds, "width": sw.width, "gain": gain, "a0": a0, "seed": seed,
        },
        "normalisation": {
            "time": "epochs until ||Sigma_yx - W||_F^2/||Sigma_yx||_F^2 < criterion; "
            "null/inf = not reached within max_steps",
            "lr": "lr * 2/N at depth N for lr_scaling '1/N'",
            "inits": "orthogonal: gain*Haar orthogonal per layer; gaussian: gain*N(0,1/fan_in); "
            "decoupled: aligned, product a0; random: a0^(1/N)*N(0,1/fan_in)",
        },
        "results": table,
        "loss_curves": {"steps": sw.loss_steps, "median_loss": _nanmedian(sw.loss, -1)},
        "figures": [fig.name],
        "versions": versions(),
    }
    return write_results(outdir, results)


# ----------------------------------------------------------------------------- generalisation


def run_generalization(
    out: str | Path,
    strengths: Sequence[float] = (3.0,),
    *,
    n_in: int = 100,
    n_out: int = 100,
    n_seeds: int = 10,
    depth: int = 2,
    a0: float = 1e-5,
    lr: float = 1e-2,
    init: str = "decoupled",
    n_steps: int | None = None,
    seed: int = 0,
    sweep_settings: Sequence[tuple[int, int, Sequence[float]]] | None = DEFAULT_SWEEP_SETTINGS,
    sweep_seeds: int = 5,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train/test dynamics, t*, the RMT spectrum and the shrinkage estimator; optional sweep."""
    _checks.positive(lr, "lr")
    _checks.aspect_ratio(_checks.count(n_out, "n_out") / _checks.count(n_in, "n_in"))
    outdir = _outdir(out)
    prog = None if progress is None else (lambda k, n: progress("simulating", k, n))
    sim = simulate_generalization(
        strengths, n_in, n_out, n_seeds=n_seeds, depth=depth, a0=a0, lr=lr, init=init,
        n_steps=n_steps, seed=seed, progress=prog,
    )
    # small random init at depth 2 behaves like decoupled init with a_eff = a0 (1 + h/N_i) / 4
    a0_theory = a0 * (1.0 + sim.hidden / n_in) / 4.0 if (init == "random" and depth == 2) else a0
    th = generalization_theory(
        strengths, n_in, n_out, sim.steps.astype(np.float64), a0=a0_theory, depth=depth, lr=lr
    )
    a_ratio = n_out / n_in
    edge = 1.0 + np.sqrt(a_ratio)
    rng = float(th.test_error.max() - th.test_error.min())
    dev = np.abs(sim.test_error.mean(1) - th.test_error)
    # spectrum figure
    grid = np.linspace(max(0.0, 1 - np.sqrt(a_ratio)) + 1e-9, edge - 1e-9, 400)
    dens = rmt.marchenko_pastur_density(grid, a_ratio)
    n_det = int(th.detected.sum())
    spikes = th.s_hat[th.detected]
    f_spec = plots.plot_spectrum(
        outdir / "spectrum.png", sim.s_hat, grid, dens, predicted_spikes=spikes, bulk_edge=edge,
        n_bulk_fraction=(n_out - n_det) / n_out,
        title=f"Σ̂ spectrum, N_o={n_out}, N_i={n_in}, {n_seeds} seeds",
    )
    # shrinkage curve figure: estimators as maps ŝ -> kept singular value
    sh_grid = np.linspace(0.0, max(float(sim.s_hat.max()), edge) * 1.1, 400)[1:]
    shrink_curve = rmt.optimal_shrinkage(sh_grid, a_ratio)
    gd_curve = _mode_strength_unchecked(sh_grid, np.full(sh_grid.shape, a0_theory), np.array([th.t_opt]),
                                        depth, 1.0 / lr)[0]
    f_shr = plots.plot_shrinkage(
        outdir / "shrinkage.png", sh_grid, shrink_curve, gd_curve, empirical_s_hat=sim.s_hat,
        empirical_oracle=sim.oracle_strength, bulk_edge=edge,
    )
    f_err = plots.plot_error_curves(
        outdir / "errors.png", th.times, th.train_error, th.test_error, sim.steps,
        sim.train_error, sim.test_error, t_opt_theory=th.t_opt, t_opt_sim=sim.t_opt,
        shrinkage_theory=th.shrinkage_test_error, shrinkage_sim=float(sim.shrinkage_test_error.mean()),
        title=f"N_i={n_in}, N_o={n_out}, s̄={','.join(f'{x:g}' for x in th.s_bar)}, {init} init, "
        f"{n_seeds} seeds",
    )
    figures = [f_err.name, f_spec.name, f_shr.name]
    hist, edges = np.histogram(sim.s_hat.ravel(), bins=80, density=True)
    results: dict[str, Any] = {
        "command": "generalization",
        "parameters": {
            "strengths": th.s_bar, "n_in": n_in, "n_out": n_out, "aspect_ratio": a_ratio,
            "n_seeds": n_seeds, "depth": depth, "a0": a0, "a0_used_by_theory": a0_theory, "lr": lr,
            "tau": 1.0 / lr, "init": init, "hidden": sim.hidden, "n_steps": int(sim.steps[-1]),
            "seed": seed,
        },
        "normalisation": dict(ERROR_DEFINITIONS),
        "t_opt_theory": th.t_opt,
        "t_opt_sim": sim.t_opt,
        "t_opt_relative_difference": (sim.t_opt - th.t_opt) / th.t_opt if th.t_opt > 0 else None,
        "test_error_at_t_opt_theory": th.test_error_opt,
        "test_error_at_t_opt_sim": sim.test_error_opt,
        "test_error_at_t_opt_sim_per_seed": sim.test_error_at_t_opt,
        "train_error_at_t_opt_theory": th.train_error_opt,
        "shrinkage_test_error": float(sim.shrinkage_test_error.mean()),
        "shrinkage_test_error_theory": th.shrinkage_test_error,
        "shrinkage_test_error_per_seed": sim.shrinkage_test_error,
        "test_curve_max_deviation_over_range": float(dev.max() / rng) if rng > 0 else None,
        "spikes": {
            "s_bar": th.s_bar, "detected": th.detected, "threshold": a_ratio**0.25,
            "s_hat_theory": th.s_hat, "s_hat_sim_mean": sim.s_hat[:, : th.s_bar.size].mean(0),
            "overlap_theory": th.overlap, "overlap_sim_mean": sim.overlap.mean(0),
            "bulk_edge": edge,
        },
        "curves": {
            "times": th.times, "train_error_theory": th.train_error, "test_error_theory": th.test_error,
            "train_error_sim_mean": sim.train_error.mean(1), "train_error_sim_std": sim.train_error.std(1),
            "test_error_sim_mean": sim.test_error.mean(1), "test_error_sim_std": sim.test_error.std(1),
        },
        "spectrum": {
            "histogram_density": hist, "histogram_edges": edges, "mp_grid": grid,
            "mp_density": dens, "s_hat_per_seed": sim.s_hat,
        },
        "shrinkage_curve": {
            "s_hat": sh_grid, "optimal_shrinkage": shrink_curve, "gd_at_t_opt_theory": gd_curve,
            "oracle_strength_per_seed": sim.oracle_strength,
        },
        "figures": figures,
        "versions": versions(),
    }
    if sweep_settings:
        sprog = None if progress is None else (lambda k, n: progress("shrinkage sweep", k, n))
        sw = shrinkage_sweep(sweep_settings, n_seeds=sweep_seeds, a0=a0, lr=lr, depth=depth,
                             seed=seed + 1, progress=sprog)
        labels = [f"N_i={a},N_o={b}\ns̄={','.join(f'{x:g}' for x in c)}" for a, b, c in sw.settings]
        f_sw = plots.plot_shrinkage_sweep(
            outdir / "shrinkage_sweep.png", labels, sw.shrinkage_theory, sw.gd_opt_theory,
            sw.shrinkage_sim, sw.gd_opt_sim,
        )
        figures.append(f_sw.name)
        results["shrinkage_sweep"] = [
            {
                "n_in": a, "n_out": b, "strengths": c,
                "shrinkage_test_error_theory": sw.shrinkage_theory[i],
                "gd_test_error_at_t_opt_theory": sw.gd_opt_theory[i],
                "shrinkage_test_error_sim": sw.shrinkage_sim[i],
                "gd_test_error_at_t_opt_sim": sw.gd_opt_sim[i],
                "shrinkage_not_worse_theory": bool(sw.shrinkage_theory[i] <= sw.gd_opt_theory[i] + 1e-12),
                "shrinkage_not_worse_sim": bool(sw.shrinkage_sim[i] <= sw.gd_opt_sim[i]),
                "fraction_of_seeds_shrinkage_not_worse": sw.frac_seeds_shrinkage_better[i],
            }
            for i, (a, b, c) in enumerate(sw.settings)
        ]
        results["shrinkage_sweep_seeds"] = sweep_seeds
    return write_results(outdir, results)


# ----------------------------------------------------------------------------- transfer


def run_transfer(
    out: str | Path,
    alignments: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    snr_sources: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    snr_target: float = 1.0,
    *,
    n_in: int = 100,
    n_out_source: int = 50,
    n_out_target: int = 50,
    n_seeds: int = 10,
    a0: float = 1e-5,
    lr: float = 1e-2,
    init: str = "decoupled",
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Transfer benefit to a target task from joint training with a source task."""
    _checks.positive(lr, "lr")
    for q in alignments:
        _checks.unit_interval(q, "alignment")
    for s_s in snr_sources:
        _checks.positive(s_s, "snr_source")
    outdir = _outdir(out)
    al = np.asarray(alignments, dtype=np.float64)
    ss = np.asarray(snr_sources, dtype=np.float64)
    b_th = np.zeros((ss.size, al.size))
    b_sim = np.zeros_like(b_th)
    rows = []
    total = ss.size * al.size
    for i, s_s in enumerate(ss):
        for j, q in enumerate(al):
            th = transfer_theory(s_s, snr_target, q, n_in=n_in, n_out_source=n_out_source,
                                 n_out_target=n_out_target, a0=a0, lr=lr)
            sim = simulate_transfer(s_s, snr_target, q, n_in=n_in, n_out_source=n_out_source,
                                    n_out_target=n_out_target, n_seeds=n_seeds, a0=a0, lr=lr,
                                    init=init, seed=seed + 100 * i + j)
            b_th[i, j], b_sim[i, j] = th.benefit, sim.benefit
            rows.append({
                "snr_source": s_s, "alignment": q,
                "benefit_theory": th.benefit, "benefit_sim": sim.benefit,
                "target_error_alone_theory": th.error_opt_alone,
                "target_error_joint_theory": th.error_opt_joint,
                "target_error_alone_sim": sim.error_opt_alone,
                "target_error_joint_sim": sim.error_opt_joint,
                "t_opt_alone_theory": th.t_opt_alone, "t_opt_joint_theory": th.t_opt_joint,
                "t_opt_alone_sim": sim.t_opt_alone, "t_opt_joint_sim": sim.t_opt_joint,
                "stacked_teacher_strengths": th.stacked_strengths,
                "target_share_of_stacked_modes": th.target_share,
                "curves": {
                    "steps": sim.steps, "joint_theory": _interp(sim.steps, th),
                    "alone_theory": np.interp(sim.steps, th.times, th.test_error_alone),
                    "joint_sim_mean": sim.test_error_joint.mean(1),
                    "alone_sim_mean": sim.test_error_alone.mean(1),
                },
            })
            if progress is not None:
                progress("settings", i * al.size + j + 1, total)
    fine = np.linspace(0.0, 1.0, 21)
    b_fine = np.array([
        [transfer_theory(s_s, snr_target, q, n_in=n_in, n_out_source=n_out_source,
                         n_out_target=n_out_target, a0=a0, lr=lr).benefit for q in fine]
        for s_s in ss
    ])
    fig = plots.plot_transfer(outdir / "transfer_matrix.png", al, ss, b_th, b_sim, snr_target=snr_target,
                              fine_alignments=fine, fine_benefit_theory=b_fine)
    results = {
        "command": "transfer",
        "parameters": {
            "alignments": al, "snr_sources": ss, "snr_target": snr_target, "n_in": n_in,
            "n_out_source": n_out_source, "n_out_target": n_out_target, "n_seeds": n_seeds,
            "a0": a0, "lr": lr, "tau": 1.0 / lr, "init": init, "seed": seed, "depth": 2,
        },
        "normalisation": {
            "target_test_error": "||W_T - W_bar_T||_F^2 / snr_target^2 at the optimal stopping time "
            "(minimum of the seed-mean curve)",
            "benefit": "target error trained alone - target error trained jointly "
            "(positive = positive transfer); same noise draws for both",
            "joint_training": "shared first layer, one head per task = 2-layer net on the stacked "
            "[Sigma_S; Sigma_T]",
        },
        "benefit_theory": b_th,
        "benefit_sim": b_sim,
        "benefit_theory_fine": {"alignments": fine, "benefit": b_fine},
        "settings": rows,
        "figures": [fig.name],
        "versions": versions(),
    }
    return write_results(outdir, results)


def _interp(steps: np.ndarray, th: Any) -> np.ndarray:
    return np.interp(steps, th.times, th.test_error_joint)
