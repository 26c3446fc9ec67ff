"""``qkdissect dynamics metalearn | icl``: learners, meta-learners and in-context transformers."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from qkdissect.commands.common import console, guarded
from qkdissect.commands.dynamics.common import (
    config_from_options,
    execute,
    fmt,
    list_default,
    out_option,
    quick_option,
    results_table,
    seed_option,
    threads_option,
)
from qkdissect.dynamics.runs.configs import ICLConfig, MetalearnConfig


def _index(c: dict[str, Any]) -> str:
    """A concurrency block's index as text, flagged when censored."""
    idx = c.get("index")
    if idx is None:
        return "n/a"
    return f"{idx:.3f}" + (" (censored)" if c.get("censored") else "")


def register(app: typer.Typer) -> None:
    M, I = MetalearnConfig(), ICLConfig()

    @app.command()
    @guarded
    def metalearn(
        strengths: str = typer.Option(list_default(M.strengths), help="Task spectrum s_α (fixed for every task)."),
        n_x: int = typer.Option(M.n_x, help="Input dimension N_x."),
        n_y: int = typer.Option(M.n_y, help="Output dimension N_y."),
        prior: str = typer.Option(M.prior, help="rotation (U, V Haar per task) | aligned (V = input axes)."),
        noise: float = typer.Option(M.noise, help="Observation noise σ (targets y = Wx + σε)."),
        ridge: float = typer.Option(M.ridge, help="Ridge λ of the ridge estimator."),
        meta_steps: int = typer.Option(M.meta_steps, help="LSTM meta-training steps (one batch of episodes each)."),
        hidden: int = typer.Option(M.hidden, help="LSTM hidden units."),
        batch: int = typer.Option(M.batch, help="Episodes per meta-step."),
        episode_length: int = typer.Option(M.episode_length, help="Samples per episode (m_α(k) for k = 0 … "
                                                                  "length−1)."),
        meta_lr: float = typer.Option(M.meta_lr, help="Adam learning rate (cosine decay to 0)."),
        train_tasks: int = typer.Option(M.train_tasks, help="Size of the meta-training task pool."),
        test_tasks: int = typer.Option(M.test_tasks, help="Held-out tasks on which every system is evaluated."),
        learner_steps: int = typer.Option(M.learner_steps, help="SGD steps of each fresh learner."),
        learner_lr: float = typer.Option(M.learner_lr, help="SGD learning rate of the learners (τ = 1/lr steps)."),
        learner_batch: int = typer.Option(M.learner_batch, help="Samples per SGD step."),
        learner_hidden: int = typer.Option(M.learner_hidden, help="Hidden width of the 2-layer linear learners."),
        seed: int = seed_option(M.seed),
        quick: bool = quick_option(),
        threads: int = threads_option(),
        out: str = out_option("metalearn"),
    ) -> None:
        """Learner vs ideal estimators vs LSTM meta-learner: staggered or concurrent mode recovery."""
        from qkdissect.dynamics.runs.metalearn import run_metalearn

        config = config_from_options(MetalearnConfig, locals())
        res = execute(run_metalearn, out, config.quick() if quick else config, threads)
        results_table("metalearn: concurrency of mode recovery", out,
                      ("system", "x axis", "half points (per mode, strongest first)", "concurrency index"),
                      [(name, "samples seen" if name == "learner" else "k",
                        ", ".join("—" if v is None else f"{v:.3g}" for v in sys_["concurrency"]["half_points"]),
                        _index(sys_["concurrency"])) for name, sys_ in res["systems"].items()])
        lstm = res["systems"]["lstm"]
        r2 = min(v for v in lstm["linearity_r2"][1:] if v is not None)
        console.print(f"LSTM held-out relative error {lstm['meta_training']['test_loss'][-1]:.3f}; "
                      f"probe linearity R² (min over k≥1) {r2:.3f}; total {res['timings_seconds']['total']:.0f} s, "
                      f"load {escape(str(res['load_average']))}")

    @app.command()
    @guarded
    def icl(
        strengths: str = typer.Option(list_default(I.strengths), help="Task spectrum s_α (unequal mode strengths)."),
        n_x: int = typer.Option(I.n_x, help="Input dimension N_x."),
        n_y: int = typer.Option(I.n_y, help="Output dimension N_y; 0 = N_x."),
        attention: str = typer.Option(list_default(I.attention), help="Attention variants, comma-separated "
                                                                      "(softmax, linear)."),
        prior: str = typer.Option(list_default(I.prior), help="Task priors, comma-separated: rotation (U, V Haar "
                                  "per task, as in metalearn) and/or aligned (mode α reads input axis α)."),
        layers: int = typer.Option(I.layers, help="Attention layers."),
        heads: int = typer.Option(I.heads, help="Heads per layer."),
        d_head: int = typer.Option(I.d_head, help="Head width; 0 = d_model = N_x + N_y."),
        context: int = typer.Option(I.context, help="Context length N (queries see k = 0 … N samples)."),
        steps: int = typer.Option(I.steps, help="Training steps (outer-loop transitions happen in the first ~1000 "
                                                "at the defaults; later ones can follow)."),
        batch: int = typer.Option(I.batch, help="Tasks per step."),
        lr: float = typer.Option(I.lr, help="Learning rate (constant)."),
        optimizer: str = typer.Option(I.optimizer, help="adam | sgd."),
        init_scale: float = typer.Option(I.init_scale, help="Initial weights: init_scale · N(0, 1/fan_in) (small)."),
        noise: float = typer.Option(I.noise, help="Observation noise σ."),
        ridge: float = typer.Option(I.ridge, help="Ridge λ of the ridge estimator."),
        checkpoints: int = typer.Option(I.checkpoints, help="Checkpoints saved during training (3/4 geometric, "
                                                            "1/4 even)."),
        train_tasks: int = typer.Option(I.train_tasks, help="Size of the training task pool."),
        test_tasks: int = typer.Option(I.test_tasks, help="Held-out tasks for the in-context analysis."),
        seed: int = seed_option(I.seed),
        quick: bool = quick_option(),
        threads: int = threads_option(),
        out: str = out_option("icl"),
    ) -> None:
        """Small transformers on in-context regression: outer-loop QK/OV modes, in-context recovery, cosines."""
        from qkdissect.dynamics.runs.icl import run_icl

        config = config_from_options(ICLConfig, locals())
        res = execute(run_icl, out, config.quick() if quick else config, threads)
        results_table("icl: outer loop vs in context", out,
                      ("variant", "test error", "outer-loop index", "strongest first", "in-context index"),
                      [(name, f"{sm['final_test_loss']:.3f}", fmt(sm["outer_loop_m_full_context_index"], ".3f"),
                        str(sm["outer_loop_m_full_context_strongest_first"]),
                        _index({"index": sm["in_context_index"], "censored": sm["in_context_censored"]}))
                       for name, sm in res["summary"].items()])
        console.print("index = std/mean of the modes' half-points (0 = all at once); outer loop: m_α(N) over "
                      "training steps; in context: m_α(k) over k.")
        results_table("weighted cosine of W_QᵀW_K per head (x–x block | full matrix), ω = tr(M_xx)/N_x", out,
                      ("variant", "head", "x–x block", "full", "ω"),
                      [(v["name"], f"L{h['layer']}H{h['head']}", f"{h['xx_weighted_cosine']:+.3f}",
                        f"{h['full_weighted_cosine']:+.3f}", f"{h['omega']:+.3f}")
                       for v in res["variants"] for h in v["cosines"]["heads"]])
        console.print(f"atlases: {escape(', '.join(v['atlas'] for v in res['variants']))} (open with `qkdissect "
                      f"report`); total {res['timings_seconds']['total']:.0f} s, load {escape(str(res['load_average']))}")
