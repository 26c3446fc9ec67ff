"""``qkdissect dynamics generalization``: train/test error over time, optimal stopping, shrinkage.

Output folder: ``results.json`` and ``errors.png`` (train / test error over time, theory and
simulation, t* marked), ``spectrum.png`` (Σ̂'s singular values vs Marchenko–Pastur and the predicted
spikes), ``shrinkage.png`` (kept singular value vs ŝ for each estimator) and, with the sweep,
``shrinkage_sweep.png``. Error definitions: :data:`~qkdissect.dynamics.linear.generalization.ERROR_DEFINITIONS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qkdissect.dynamics import checks
from qkdissect.dynamics.linear import rmt
from qkdissect.dynamics.linear.generalization import (
    ERROR_DEFINITIONS,
    generalization_theory,
    shrinkage_sweep,
    simulate_generalization,
)
from qkdissect.dynamics.linear.theory import mode_strength_function
from qkdissect.dynamics.plots.linear import plot_error_curves, plot_shrinkage, plot_shrinkage_sweep, plot_spectrum
from qkdissect.dynamics.runs.common import RunClock, config_dict, output_folder, write_results
from qkdissect.dynamics.runs.configs import GeneralizationConfig
from qkdissect.progress import ProgressFn

__all__ = ["run_generalization"]

def run_generalization(out: str | Path, config: GeneralizationConfig | None = None, *,
                       progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train/test dynamics, t*, the RMT spectrum and the shrinkage estimator; optional sweep."""
    c = config or GeneralizationConfig()
    strengths, n_in, n_out, n_seeds, depth, a0, lr, init = (c.strengths, c.n_in, c.n_out, c.seeds, c.depth, c.a0,
                                                            c.lr, c.init)
    checks.positive(lr, "lr")
    checks.aspect_ratio(checks.count(n_out, "n_out") / checks.count(n_in, "n_in"))
    outdir = output_folder(out)
    clock = RunClock()
    with clock.part("simulation"):
        sim = simulate_generalization(strengths, n_in, n_out, n_seeds=n_seeds, depth=depth, a0=a0, lr=lr, init=init,
                                      n_steps=c.steps, seed=c.seed, progress=progress)
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
    f_spec = plot_spectrum(
        outdir / "spectrum.png", sim.s_hat, grid, dens, predicted_spikes=spikes, bulk_edge=edge,
        n_bulk_fraction=(n_out - n_det) / n_out,
        title=f"Σ̂ spectrum, N_o={n_out}, N_i={n_in}, {n_seeds} seeds",
    )
    # shrinkage curve figure: estimators as maps ŝ -> kept singular value
    sh_grid = np.linspace(0.0, max(float(sim.s_hat.max()), edge) * 1.1, 400)[1:]
    shrink_curve = rmt.optimal_shrinkage(sh_grid, a_ratio)
    gd_curve = mode_strength_function(sh_grid, np.full(sh_grid.shape, a0_theory), depth, 1.0 / lr, th.t_opt)(th.t_opt)[0]
    f_shr = plot_shrinkage(
        outdir / "shrinkage.png", sh_grid, shrink_curve, gd_curve, empirical_s_hat=sim.s_hat,
        empirical_oracle=sim.oracle_strength, bulk_edge=edge,
    )
    f_err = plot_error_curves(
        outdir / "errors.png", th.times, th.train_error, th.test_error, sim.steps,
        sim.train_error, sim.test_error, t_opt_theory=th.t_opt, t_opt_sim=sim.t_opt,
        shrinkage_theory=th.shrinkage_test_error, shrinkage_sim=float(sim.shrinkage_test_error.mean()),
        title=f"N_i={n_in}, N_o={n_out}, s̄={','.join(f'{x:g}' for x in th.s_bar)}, {init} init, "
        f"{n_seeds} seeds",
    )
    figures = [f_err.name, f_spec.name, f_shr.name]
    hist, edges = np.histogram(sim.s_hat.ravel(), bins=80, density=True)
    results: dict[str, Any] = {
        "parameters": {
            **config_dict(c), "strengths": th.s_bar, "aspect_ratio": a_ratio, "a0_used_by_theory": a0_theory,
            "tau": 1.0 / lr, "hidden": sim.hidden, "steps": int(sim.steps[-1]),
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
    }
    if c.sweep and c.sweep_settings:
        with clock.part("shrinkage sweep"):
            sw = shrinkage_sweep(c.sweep_settings, n_seeds=c.sweep_seeds, a0=a0, lr=lr, depth=depth, seed=c.seed + 1,
                                 progress=progress)
        labels = [f"N_i={a},N_o={b}\ns̄={','.join(f'{x:g}' for x in s)}" for a, b, s in sw.settings]
        f_sw = plot_shrinkage_sweep(
            outdir / "shrinkage_sweep.png", labels, sw.shrinkage_theory, sw.gd_opt_theory,
            sw.shrinkage_sim, sw.gd_opt_sim,
        )
        figures.append(f_sw.name)
        results["shrinkage_sweep"] = [
            {
                "n_in": a, "n_out": b, "strengths": s,
                "shrinkage_test_error_theory": sw.shrinkage_theory[i],
                "gd_test_error_at_t_opt_theory": sw.gd_opt_theory[i],
                "shrinkage_test_error_sim": sw.shrinkage_sim[i],
                "gd_test_error_at_t_opt_sim": sw.gd_opt_sim[i],
                "shrinkage_not_worse_theory": bool(sw.shrinkage_theory[i] <= sw.gd_opt_theory[i] + 1e-12),
                "shrinkage_not_worse_sim": bool(sw.shrinkage_sim[i] <= sw.gd_opt_sim[i]),
                "fraction_of_seeds_shrinkage_not_worse": sw.frac_seeds_shrinkage_better[i],
            }
            for i, (a, b, s) in enumerate(sw.settings)
        ]
        results["shrinkage_sweep_seeds"] = c.sweep_seeds
    results.update(clock.summary())
    return write_results(outdir, "generalization", results)


