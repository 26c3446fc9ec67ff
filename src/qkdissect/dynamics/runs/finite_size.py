"""``qkdissect dynamics finite-size``: shrinkage vs early-stopped gradient descent as N grows.

At fixed aspect ratio N_o/N_i and teacher strengths, for N_i = each size: the test error of the
shrinkage estimator, of gradient descent stopped at each student's validation-chosen step (a validation
set drawn like the training set, no teacher involved) and at the oracle t* (minimum of the seed-mean test
curve), against the large-N theory at that size. Students start from decoupled init and are followed
exactly in Σ̂'s singular basis (``method='modes'`` of
:func:`~qkdissect.dynamics.linear.generalization_sim.simulate_generalization`), so N in the thousands
takes seconds (the SVD of Σ̂ dominates).

Output folder: ``results.json`` (one row per size) and ``finite_size.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkdissect.dynamics.linear.generalization import ERROR_DEFINITIONS
from qkdissect.dynamics.linear.generalization_sim import FiniteSizeTrend, finite_size_trend
from qkdissect.dynamics.plots.linear import plot_finite_size
from qkdissect.dynamics.runs.common import RunClock, config_dict, output_folder, write_results
from qkdissect.dynamics.runs.configs import FiniteSizeConfig
from qkdissect.dynamics.runs.generalization import STOPPING_DEFINITIONS
from qkdissect.progress import ProgressFn

__all__ = ["finite_size_results", "run_finite_size"]


def finite_size_results(trend: FiniteSizeTrend) -> dict[str, Any]:
    """The finite-size trend as results.json rows (one per size) plus its definition."""
    rows = [{"n_in": trend.n_in[i], "n_out": trend.n_out[i],
             "shrinkage_sim": trend.shrinkage[i], "shrinkage_sim_sem": trend.shrinkage_sem[i],
             "gd_validation_sim": trend.gd_validation[i], "gd_validation_sim_sem": trend.gd_validation_sem[i],
             "gd_oracle_sim": trend.gd_oracle[i], "gd_oracle_per_seed_sim": trend.gd_oracle_per_seed[i],
             "t_validation_mean": trend.t_validation[i], "t_oracle": trend.t_oracle[i],
             "shrinkage_theory": trend.theory_shrinkage[i], "gd_at_t_opt_theory": trend.theory_gd[i],
             "t_opt_theory": trend.theory_t_opt[i], "seconds": trend.seconds[i]}
            for i in range(trend.n_in.size)]
    return {"strengths": trend.strengths, "seeds_per_size": trend.n_seeds, "a0": trend.a0, "method": "modes (exact GD from "
            "decoupled init in the singular basis of Sigma_hat)", "rows": rows}


def run_finite_size(out: str | Path, config: FiniteSizeConfig | None = None, *,
                    progress: ProgressFn | None = None) -> dict[str, Any]:
    """The finite-size trend of shrinkage vs GD at validation / oracle t* (module docstring)."""
    c = config or FiniteSizeConfig()
    outdir = output_folder(out)
    clock = RunClock()
    with clock.part("trend"):
        trend = finite_size_trend(c.strengths, c.sizes, aspect_ratio=c.aspect_ratio, n_seeds=c.seeds, a0=c.a0,
                                  lr=c.lr, depth=c.depth, seed=c.seed, progress=progress)
    fig = plot_finite_size(outdir / "finite_size.png", trend)
    results = {
        "parameters": {**config_dict(c), "tau": 1.0 / c.lr},
        "normalisation": {**ERROR_DEFINITIONS, **STOPPING_DEFINITIONS},
        **finite_size_results(trend),
        "figures": [fig.name],
        **clock.summary(),
    }
    return write_results(outdir, "finite-size", results)
