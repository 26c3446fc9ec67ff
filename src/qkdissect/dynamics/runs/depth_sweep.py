"""``qkdissect dynamics depth-sweep``: learning time vs depth for several initialisations.

Output folder: ``results.json`` (per initialisation and depth the epochs each seed needed to reach
the loss criterion, their median, the decoupled-init theory) and ``depth_sweep.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import nanmedian
from qkdissect.dynamics.linear.depth import depth_sweep
from qkdissect.dynamics.plots.linear import plot_depth_sweep
from qkdissect.dynamics.runs.common import RunClock, config_dict, output_folder, write_results
from qkdissect.dynamics.runs.configs import DepthSweepConfig
from qkdissect.progress import ProgressFn

__all__ = ["run_depth_sweep"]


def run_depth_sweep(out: str | Path, config: DepthSweepConfig | None = None, *,
                    progress: ProgressFn | None = None) -> dict[str, Any]:
    """Learning time vs depth for several initialisations."""
    c = config or DepthSweepConfig()
    checks.positive(c.lr, "lr")
    outdir = output_folder(out)
    clock = RunClock()
    with clock.part("sweep"):
        sw = depth_sweep(c.depths, c.init, c.strengths, lr=c.lr, lr_scaling=c.lr_scaling, criterion=c.criterion,
                         max_steps=c.max_steps, n_seeds=c.seeds, width=c.width or None, gain=c.gain, a0=c.a0,
                         seed=c.seed, progress=progress)
    fig = plot_depth_sweep(outdir / "depth_sweep.png", sw)
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
        "parameters": {**config_dict(c), "strengths": sw.strengths, "width": sw.width},
        "normalisation": {
            "time": "epochs until ||Sigma_yx - W||_F^2/||Sigma_yx||_F^2 < criterion; "
            "null/inf = not reached within max_steps",
            "lr": "lr * 2/N at depth N for lr_scaling '1/N'",
            "inits": "orthogonal: gain*Haar orthogonal per layer; gaussian: gain*N(0,1/fan_in); "
            "decoupled: aligned, product a0; random: a0^(1/N)*N(0,1/fan_in)",
        },
        "results": table,
        "loss_curves": {"steps": sw.loss_steps, "median_loss": nanmedian(sw.loss, -1)},
        "figures": [fig.name],
        **clock.summary(),
    }
    return write_results(outdir, "depth-sweep", results)
