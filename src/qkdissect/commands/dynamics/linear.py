"""``qkdissect dynamics saxe | depth-sweep | generalization | transfer``: deep linear networks."""

from __future__ import annotations

from typing import Optional

import typer

from qkdissect.commands.common import console, guarded
from qkdissect.commands.dynamics.common import (
    config_from_options,
    execute,
    fmt,
    list_default,
    out_option,
    results_table,
    seed_option,
    threads_option,
)
from qkdissect.dynamics.runs.configs import DepthSweepConfig, GeneralizationConfig, SaxeConfig, TransferConfig

LR_HELP = "Learning rate; time constant τ = 1/lr epochs."


def register(app: typer.Typer) -> None:
    S, D, G, T = SaxeConfig(), DepthSweepConfig(), GeneralizationConfig(), TransferConfig()

    @app.command()
    @guarded
    def saxe(
        strengths: str = typer.Option(list_default(S.strengths), help="Target singular values s_α, comma-separated."),
        depth: int = typer.Option(S.depth, help="Number of weight matrices N (2 = one hidden layer)."),
        a0: float = typer.Option(S.a0, help="Initial strength of the product on each mode (decoupled), or scale "
                                            "of the product (random)."),
        lr: float = typer.Option(S.lr, help=LR_HELP),
        init: str = typer.Option(S.init, help="decoupled | random | orthogonal | gaussian."),
        gain: float = typer.Option(S.gain, help="Per-layer scale for orthogonal / gaussian init."),
        seeds: int = typer.Option(S.seeds, help="Independent networks (tasks and inits), simulated as a batch."),
        hidden: int = typer.Option(S.hidden, help="Hidden width (at least the number of modes)."),
        steps: Optional[int] = typer.Option(S.steps, help="Gradient steps; default 2 × the slowest analytic "
                                                          "half-time."),
        seed: int = seed_option(S.seed),
        threads: int = threads_option(),
        out: str = out_option("saxe"),
    ) -> None:
        """Modes are learned one by one: analytic curves and half-times vs a full-matrix simulation."""
        from qkdissect.dynamics.runs.saxe import run_saxe

        config = config_from_options(SaxeConfig, locals())
        res = execute(run_saxe, out, config, threads)
        results_table(f"saxe: depth {config.depth}, {config.init} init", out,
                      ("s", "analytic t½", "simulated t½", "max |Δa|/s"),
                      [(fmt(m["strength"]), fmt(m["analytic_half_time"], ".1f"), fmt(m["simulated_half_time"], ".1f"),
                        fmt(m["max_relative_deviation"], ".4f")) for m in res["modes"]])
        console.print(f"modes learned in order of strength: {res['modes_learned_in_order_of_strength']}")

    @app.command("depth-sweep")
    @guarded
    def depth_sweep(
        depths: str = typer.Option(list_default(D.depths), help="Depths N to compare, comma-separated."),
        init: str = typer.Option(list_default(D.init), help="Initialisations, comma-separated (orthogonal, "
                                                            "gaussian, decoupled, random)."),
        strengths: str = typer.Option(list_default(D.strengths), help="Task spectrum (square task, n = count)."),
        lr: float = typer.Option(D.lr, help="Learning rate at depth 2 (scaled by 2/N, see --lr-scaling)."),
        lr_scaling: str = typer.Option(D.lr_scaling, help="'1/N' (lr·2/N at depth N) or 'constant'."),
        criterion: float = typer.Option(D.criterion, help="Relative training loss that counts as learned."),
        max_steps: int = typer.Option(D.max_steps, help="Give up after this many epochs."),
        seeds: int = typer.Option(D.seeds, help="Networks per (init, depth)."),
        width: int = typer.Option(D.width, help="Hidden width; 0 = number of modes."),
        gain: float = typer.Option(D.gain, help="Per-layer scale for orthogonal / gaussian init."),
        a0: float = typer.Option(D.a0, help="Product strength for decoupled / random init."),
        seed: int = seed_option(D.seed),
        threads: int = threads_option(),
        out: str = out_option("depth-sweep"),
    ) -> None:
        """Learning time vs depth: orthogonal init stays fast, scaled Gaussian init slows down."""
        from qkdissect.dynamics.runs.depth_sweep import run_depth_sweep

        config = config_from_options(DepthSweepConfig, locals())
        res = execute(run_depth_sweep, out, config, threads)
        results_table("depth sweep", out, ("init", "depth", "lr", "median epochs", "not reached", "theory"),
                      [(r["init"], str(r["depth"]), fmt(r["lr"]),
                        f"> {config.max_steps}" if r["median_time"] is None else fmt(r["median_time"], ".0f"),
                        f"{r['n_not_reached']}/{config.seeds}", fmt(r["theory_time"], ".0f"))
                       for r in res["results"]])

    @app.command()
    @guarded
    def generalization(
        n_in: int = typer.Option(G.n_in, help="Input dimension N_i (= number of training examples)."),
        n_out: int = typer.Option(G.n_out, help="Output dimension N_o (needs N_o <= N_i)."),
        strengths: str = typer.Option(list_default(G.strengths), help="Teacher singular values s̄ (the SNRs), "
                                                                      "comma-separated."),
        seeds: int = typer.Option(G.seeds, help="Teacher/noise draws, one student each, simulated as a batch."),
        depth: int = typer.Option(G.depth, help="Student depth N."),
        a0: float = typer.Option(G.a0, help="Initial student strength on every empirical mode."),
        lr: float = typer.Option(G.lr, help=LR_HELP),
        init: str = typer.Option(G.init, help="decoupled (aligned to Σ̂, the theory's assumption) | random."),
        steps: Optional[int] = typer.Option(G.steps, help="Gradient steps; default 2 × the half-time of a "
                                                          "bulk-edge mode."),
        sweep: bool = typer.Option(G.sweep, help="Also compare shrinkage with GD at t* on a sweep of settings."),
        sweep_seeds: int = typer.Option(G.sweep_seeds, help="Seeds per sweep setting."),
        seed: int = seed_option(G.seed),
        threads: int = threads_option(),
        out: str = out_option("generalization"),
    ) -> None:
        """Train/test error over time, optimal stopping t*, MP spectrum, and the shrinkage optimum."""
        from qkdissect.dynamics.runs.generalization import run_generalization

        config = config_from_options(GeneralizationConfig, locals())
        res = execute(run_generalization, out, config, threads)
        sp = res["spikes"]
        results_table("generalisation", out, ("quantity", "theory", "simulation"), [
            ("t* (epochs)", fmt(res["t_opt_theory"], ".1f"), fmt(res["t_opt_sim"], ".1f")),
            ("test error at t*", fmt(res["test_error_at_t_opt_theory"]), fmt(res["test_error_at_t_opt_sim"])),
            ("shrinkage test error", fmt(res["shrinkage_test_error_theory"]), fmt(res["shrinkage_test_error"])),
            ("top singular value ŝ", fmt(sp["s_hat_theory"][0]), fmt(sp["s_hat_sim_mean"][0])),
            ("overlap O", fmt(sp["overlap_theory"][0]), fmt(sp["overlap_sim_mean"][0])),
        ])
        console.print(f"test curve: max |sim − theory| / range = {fmt(res['test_curve_max_deviation_over_range'])}")
        if "shrinkage_sweep" in res:
            results_table("shrinkage vs gradient descent at t* (test error)", out,
                          ("N_i", "N_o", "s̄", "GD theory", "shrink theory", "GD sim", "shrink sim"),
                          [(str(r["n_in"]), str(r["n_out"]), ",".join(f"{x:g}" for x in r["strengths"]),
                            fmt(r["gd_test_error_at_t_opt_theory"]), fmt(r["shrinkage_test_error_theory"]),
                            fmt(r["gd_test_error_at_t_opt_sim"]), fmt(r["shrinkage_test_error_sim"]))
                           for r in res["shrinkage_sweep"]])

    @app.command()
    @guarded
    def transfer(
        alignment: str = typer.Option(list_default(T.alignment), help="Input alignments v̄_S·v̄_T in [0, 1]."),
        snr_source: str = typer.Option(list_default(T.snr_source), help="Source teacher strengths s̄_S, "
                                                                        "comma-separated."),
        snr_target: float = typer.Option(T.snr_target, help="Target teacher strength s̄_T."),
        n_in: int = typer.Option(T.n_in, help="Shared input dimension N_i."),
        n_out_source: int = typer.Option(T.n_out_source, help="Source output dimension."),
        n_out_target: int = typer.Option(T.n_out_target, help="Target output dimension (N_oS + N_oT <= N_i)."),
        seeds: int = typer.Option(T.seeds, help="Noise draws per setting (paired: same draws alone and joint)."),
        a0: float = typer.Option(T.a0, help="Initial student strength per empirical mode."),
        lr: float = typer.Option(T.lr, help=LR_HELP),
        init: str = typer.Option(T.init, help="decoupled | random."),
        seed: int = seed_option(T.seed),
        threads: int = threads_option(),
        out: str = out_option("transfer"),
    ) -> None:
        """Transfer to a weak target task from joint training with a source through a shared layer."""
        from qkdissect.dynamics.runs.transfer import run_transfer

        config = config_from_options(TransferConfig, locals())
        res = execute(run_transfer, out, config, threads)
        results_table("transfer benefit (alone − joint target test error)", out,
                      ("s̄_S", "alignment", "alone (th)", "joint (th)", "benefit th", "benefit sim"),
                      [(fmt(r["snr_source"]), fmt(r["alignment"]), fmt(r["target_error_alone_theory"], ".3f"),
                        fmt(r["target_error_joint_theory"], ".3f"), fmt(r["benefit_theory"], "+.3f"),
                        fmt(r["benefit_sim"], "+.3f")) for r in res["settings"]])
