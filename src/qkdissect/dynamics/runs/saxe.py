"""``qkdissect dynamics saxe``: modes are learned one by one (Saxe et al. 2014), theory vs simulation.

Output folder: ``results.json`` (per mode the analytic and simulated half-times and the largest
deviation of the simulated strength from the theory, the curves) and ``mode_strengths.png``.

Theory: from decoupled initial conditions a mode of strength s obeys τ da/dt = N a^{2−2/N} (s − a),
a(0) = a₀, τ = 1/lr (closed form for N <= 2: a(t) = s / (1 + (s/a₀ − 1) e^{−2st/τ})); the full-matrix
simulation takes discrete gradient steps, so it departs from the flow by O(lr·s): the results say
where that exceeds ``tolerance`` and which learning rate meets it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qkdissect.dynamics import checks
from qkdissect.dynamics.linear.simulate import simulate_modes
from qkdissect.dynamics.linear.theory import discrete_mode_strength, half_time, mode_strength
from qkdissect.dynamics.plots.linear import plot_mode_strengths
from qkdissect.dynamics.runs.common import RunClock, config_dict, output_folder, subsample, write_results
from qkdissect.dynamics.runs.configs import SaxeConfig
from qkdissect.progress import ProgressFn

__all__ = ["run_saxe"]


def run_saxe(out: str | Path, config: SaxeConfig | None = None, *, progress: ProgressFn | None = None
             ) -> dict[str, Any]:
    """Mode-by-mode learning: analytic curves and half-times vs a full-matrix simulation."""
    c = config or SaxeConfig()
    s = checks.strengths(c.strengths)
    tau = 1.0 / checks.positive(c.lr, "lr")
    outdir = output_folder(out)
    clock = RunClock()
    th_half = half_time(s, c.a0, depth=c.depth, tau=tau)
    n_steps = int(np.ceil(2.0 * th_half.max())) if c.steps is None else c.steps
    h = max(int(c.hidden), s.size)
    with clock.part("simulation"):
        sim = simulate_modes(s, depth=c.depth, a0=c.a0, lr=c.lr, n_steps=n_steps, init=c.init, gain=c.gain,
                             n_seeds=c.seeds, hidden=h, seed=c.seed, progress=progress)
    theory = mode_strength(s, c.a0, sim.steps, depth=c.depth, tau=tau)
    dev = np.abs(sim.strengths - theory[:, None, :]) / s  # (T, B, M)
    sim_half = sim.half_times()
    discrete = discrete_mode_strength(s, c.a0, n_steps, depth=c.depth, lr=c.lr) if c.init == "decoupled" else None
    per_mode = []
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
            row["effective_a0_per_seed"] = eff
            pred = np.full(eff.shape, np.nan)  # Saxe's depth-2 half-time with a₀ = a_eff (NaN if a_eff >= s)
            ok = eff < sm
            if ok.any():
                pred[ok] = half_time(np.full(int(ok.sum()), sm), eff[ok], tau=tau)
            row["predicted_half_time_effective_a0_per_seed"] = pred
        per_mode.append(row)
    idx = subsample(sim.steps.size)
    fig = plot_mode_strengths(
        outdir / "mode_strengths.png", sim.steps[idx], sim.strengths[idx], theory[idx], s,
        analytic_half_times=th_half,
        title=f"Depth {c.depth}, {c.init} init, a0={c.a0:g}, lr={c.lr:g} (τ={tau:g} epochs)",
    )
    order_ok = bool(np.all(np.diff(np.nanmean(sim_half, 0)[np.argsort(-s)]) > 0))
    results = {
        "parameters": {**config_dict(c), "strengths": s, "tau": tau, "hidden": h, "steps": n_steps,
                       "layer_sizes": sim.layer_sizes},
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
        **clock.summary(),
    }
    return write_results(outdir, "saxe", results)
