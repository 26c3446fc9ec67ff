"""``qkdissect dynamics transfer``: transfer to a weak target task through a shared first layer.

Output folder: ``results.json`` (per source SNR and alignment the target's test error at its optimal
stopping time trained alone and jointly, theory and simulation, and their difference, the benefit)
and ``transfer_matrix.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qkdissect.dynamics import checks
from qkdissect.dynamics.linear.transfer import simulate_transfer, transfer_theory
from qkdissect.dynamics.plots.linear import plot_transfer
from qkdissect.dynamics.runs.common import RunClock, config_dict, output_folder, write_results
from qkdissect.dynamics.runs.configs import TransferConfig
from qkdissect.progress import ProgressFn, report

__all__ = ["run_transfer"]


def run_transfer(out: str | Path, config: TransferConfig | None = None, *,
                 progress: ProgressFn | None = None) -> dict[str, Any]:
    """Transfer benefit to a target task from joint training with a source task."""
    c = config or TransferConfig()
    checks.positive(c.lr, "lr")
    for q in c.alignment:
        checks.unit_interval(q, "alignment")
    for s_s in c.snr_source:
        checks.positive(s_s, "snr_source")
    outdir = output_folder(out)
    clock = RunClock()
    al = np.asarray(c.alignment, dtype=np.float64)
    ss = np.asarray(c.snr_source, dtype=np.float64)
    sizes = dict(n_in=c.n_in, n_out_source=c.n_out_source, n_out_target=c.n_out_target, a0=c.a0, lr=c.lr)
    b_th = np.zeros((ss.size, al.size))
    b_sim = np.zeros_like(b_th)
    rows = []
    total = ss.size * al.size
    for i, s_s in enumerate(ss):
        for j, q in enumerate(al):
            th = transfer_theory(s_s, c.snr_target, q, **sizes)
            sim = simulate_transfer(s_s, c.snr_target, q, **sizes, n_seeds=c.seeds, init=c.init,
                                    seed=c.seed + 100 * i + j)
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
                    "steps": sim.steps, "joint_theory": np.interp(sim.steps, th.times, th.test_error_joint),
                    "alone_theory": np.interp(sim.steps, th.times, th.test_error_alone),
                    "joint_sim_mean": sim.test_error_joint.mean(1),
                    "alone_sim_mean": sim.test_error_alone.mean(1),
                },
            })
            report(progress, "settings", i * al.size + j + 1, total)
    fine = np.linspace(0.0, 1.0, 21)
    b_fine = np.array([[transfer_theory(s_s, c.snr_target, q, **sizes).benefit for q in fine] for s_s in ss])
    fig = plot_transfer(outdir / "transfer_matrix.png", al, ss, b_th, b_sim, snr_target=c.snr_target,
                        fine_alignments=fine, fine_benefit_theory=b_fine)
    results = {
        "parameters": {**config_dict(c), "tau": 1.0 / c.lr, "depth": 2},
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
        **clock.summary(),
    }
    return write_results(outdir, "transfer", results)
