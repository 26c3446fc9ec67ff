"""``qkdissect dynamics …``: how deep linear networks learn singular modes.

Mount with ``app.add_typer(qkdissect.dynamics.cli.app, name="dynamics")``. Every command writes
``results.json`` and PNG figures into ``--out`` and prints a summary table.
"""

from __future__ import annotations

import functools
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qkdissect.errors import QKDissectError

app = typer.Typer(
    name="dynamics",
    help="Learning dynamics of singular modes: deep linear networks (Saxe et al.), random-matrix "
    "generalisation theory and transfer (Lampinen & Ganguli), learners vs meta-learners (Rabinowitz), "
    "and the QK modes of in-context regression transformers.",
    no_args_is_help=True,
    add_completion=False,
)

console = Console()
err_console = Console(stderr=True)


def _fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a QKDissectError into a one-line message on stderr and exit status 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QKDissectError as exc:
            err_console.print(f"[bold red]error:[/bold red] {exc}", highlight=False)
            raise typer.Exit(code=2) from None

    return wrapper


def _floats(text: str, name: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise QKDissectError(
            f"{name}: expected comma-separated numbers such as 5,4,3, got {text!r}."
        ) from None
    if not vals:
        raise QKDissectError(f"{name}: expected at least one number, got {text!r}.")
    return vals


def _ints(text: str, name: str) -> list[int]:
    vals = _floats(text, name)
    if any(not v.is_integer() for v in vals):
        raise QKDissectError(f"{name}: expected comma-separated integers such as 2,4,8, got {text!r}.")
    return [int(v) for v in vals]


def _threads(n: int) -> None:
    import torch

    if n < 1:
        raise QKDissectError(f"--threads: expected an integer >= 1, got {n}.")
    torch.set_num_threads(n)


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    tasks: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
    ) as prog:

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = prog.add_task(label, total=total)
            prog.update(tasks[label], completed=done, total=total)

        yield update


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(x, spec)


OUT_HELP = "Directory for results.json and the PNG figures (created if missing)."
THREADS_HELP = "torch CPU threads (small matrices run fastest on one)."


@app.command()
@_fail_cleanly
def saxe(
    strengths: str = typer.Option("5,4,3,2,1", help="Target singular values s_α, comma-separated."),
    depth: int = typer.Option(2, help="Number of weight matrices N (2 = one hidden layer)."),
    a0: float = typer.Option(1e-6, help="Initial strength of the product on each mode "
                             "(decoupled), or scale of the product (random)."),
    lr: float = typer.Option(1e-3, help="Learning rate; time constant τ = 1/lr epochs."),
    init: str = typer.Option("decoupled", help="decoupled | random | orthogonal | gaussian."),
    gain: float = typer.Option(1.0, help="Per-layer scale for orthogonal / gaussian init."),
    seeds: int = typer.Option(3, help="Independent networks (tasks and inits), simulated as a batch."),
    hidden: int = typer.Option(32, help="Hidden width (at least the number of modes)."),
    steps: Optional[int] = typer.Option(
        None, help="Gradient steps; default 2 × the slowest analytic half-time."
    ),
    seed: int = typer.Option(0, help="Random seed."),
    threads: int = typer.Option(1, help=THREADS_HELP),
    out: str = typer.Option("saxe", help=OUT_HELP),
) -> None:
    """Modes are learned one by one: analytic curves and half-times vs a full-matrix simulation."""
    from qkdissect.dynamics.experiments import run_saxe

    _threads(threads)
    with _progress() as prog:
        res = run_saxe(
            out, _floats(strengths, "--strengths"), depth=depth, a0=a0, lr=lr, init=init, gain=gain,
            n_seeds=seeds, hidden=hidden, n_steps=steps, seed=seed, progress=prog,
        )
    table = Table(title=f"saxe: depth {depth}, {init} init → {Path(out) / 'results.json'}")
    for col in ("s", "analytic t½", "simulated t½", "max |Δa|/s"):
        table.add_column(col, justify="right")
    for m in res["modes"]:
        table.add_row(_fmt(m["strength"]), _fmt(m["analytic_half_time"], ".1f"),
                      _fmt(m["simulated_half_time"], ".1f"), _fmt(m["max_relative_deviation"], ".4f"))
    console.print(table)
    console.print(f"modes learned in order of strength: {res['modes_learned_in_order_of_strength']}")


@app.command("depth-sweep")
@_fail_cleanly
def depth_sweep(
    depths: str = typer.Option("2,4,8,16", help="Depths N to compare, comma-separated."),
    init: str = typer.Option("orthogonal,gaussian", help="Initialisations, comma-separated "
                             "(orthogonal, gaussian, decoupled, random)."),
    strengths: str = typer.Option("4,3.5,3,2.5,2,1.5,1,0.5", help="Task spectrum (square task, n = count)."),
    lr: float = typer.Option(1e-2, help="Learning rate at depth 2 (scaled by 2/N, see --lr-scaling)."),
    lr_scaling: str = typer.Option("1/N", help="'1/N' (lr·2/N at depth N) or 'constant'."),
    criterion: float = typer.Option(0.01, help="Relative training loss that counts as learned."),
    max_steps: int = typer.Option(20_000, help="Give up after this many epochs."),
    seeds: int = typer.Option(8, help="Networks per (init, depth)."),
    width: int = typer.Option(0, help="Hidden width; 0 = number of modes."),
    gain: float = typer.Option(1.0, help="Per-layer scale for orthogonal / gaussian init."),
    a0: float = typer.Option(1e-3, help="Product strength for decoupled / random init."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: int = typer.Option(1, help=THREADS_HELP),
    out: str = typer.Option("depth-sweep", help=OUT_HELP),
) -> None:
    """Learning time vs depth: orthogonal init stays fast, scaled Gaussian init slows down."""
    from qkdissect.dynamics.experiments import run_depth_sweep

    _threads(threads)
    inits = [x.strip() for x in init.split(",") if x.strip()]
    with _progress() as prog:
        res = run_depth_sweep(
            out, _ints(depths, "--depths"), inits, _floats(strengths, "--strengths"), lr=lr,
            lr_scaling=lr_scaling, criterion=criterion, max_steps=max_steps, n_seeds=seeds,
            width=width or None, gain=gain, a0=a0, seed=seed, progress=prog,
        )
    table = Table(title=f"depth sweep → {Path(out) / 'results.json'}")
    for col in ("init", "depth", "lr", "median epochs", "not reached", "theory"):
        table.add_column(col, justify="right")
    for r in res["results"]:
        med = r["median_time"]
        table.add_row(r["init"], str(r["depth"]), _fmt(r["lr"]),
                      f"> {max_steps}" if med is None else _fmt(med, ".0f"),
                      f"{r['n_not_reached']}/{seeds}", _fmt(r["theory_time"], ".0f"))
    console.print(table)


@app.command()
@_fail_cleanly
def generalization(
    n_in: int = typer.Option(100, help="Input dimension N_i (= number of training examples)."),
    n_out: int = typer.Option(100, help="Output dimension N_o (needs N_o <= N_i)."),
    strengths: str = typer.Option("3", help="Teacher singular values s̄ (the SNRs), comma-separated."),
    seeds: int = typer.Option(10, help="Teacher/noise draws, one student each, simulated as a batch."),
    depth: int = typer.Option(2, help="Student depth N."),
    a0: float = typer.Option(1e-5, help="Initial student strength on every empirical mode."),
    lr: float = typer.Option(1e-2, help="Learning rate; τ = 1/lr epochs."),
    init: str = typer.Option(
        "decoupled", help="decoupled (aligned to Σ̂, the theory's assumption) | random."
    ),
    steps: Optional[int] = typer.Option(
        None, help="Gradient steps; default 2 × the half-time of a bulk-edge mode."
    ),
    sweep: bool = typer.Option(True, help="Also compare shrinkage with GD at t* on a sweep of settings."),
    sweep_seeds: int = typer.Option(5, help="Seeds per sweep setting."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: int = typer.Option(1, help=THREADS_HELP),
    out: str = typer.Option("generalization", help=OUT_HELP),
) -> None:
    """Train/test error over time, optimal stopping t*, MP spectrum, and the shrinkage optimum."""
    from qkdissect.dynamics.experiments import DEFAULT_SWEEP_SETTINGS, run_generalization

    _threads(threads)
    with _progress() as prog:
        res = run_generalization(
            out, _floats(strengths, "--strengths"), n_in=n_in, n_out=n_out, n_seeds=seeds, depth=depth,
            a0=a0, lr=lr, init=init, n_steps=steps, seed=seed,
            sweep_settings=DEFAULT_SWEEP_SETTINGS if sweep else None, sweep_seeds=sweep_seeds,
            progress=prog,
        )
    table = Table(title=f"generalisation → {Path(out) / 'results.json'}")
    table.add_column("quantity")
    table.add_column("theory", justify="right")
    table.add_column("simulation", justify="right")
    table.add_row("t* (epochs)", _fmt(res["t_opt_theory"], ".1f"), _fmt(res["t_opt_sim"], ".1f"))
    table.add_row("test error at t*", _fmt(res["test_error_at_t_opt_theory"]),
                  _fmt(res["test_error_at_t_opt_sim"]))
    table.add_row("shrinkage test error", _fmt(res["shrinkage_test_error_theory"]),
                  _fmt(res["shrinkage_test_error"]))
    sp = res["spikes"]
    table.add_row("top singular value ŝ", _fmt(sp["s_hat_theory"][0]), _fmt(sp["s_hat_sim_mean"][0]))
    table.add_row("overlap O", _fmt(sp["overlap_theory"][0]), _fmt(sp["overlap_sim_mean"][0]))
    console.print(table)
    dev = _fmt(res["test_curve_max_deviation_over_range"])
    console.print(f"test curve: max |sim − theory| / range = {dev}")
    if "shrinkage_sweep" in res:
        t2 = Table(title="shrinkage vs gradient descent at t* (test error)")
        for col in ("N_i", "N_o", "s̄", "GD theory", "shrink theory", "GD sim", "shrink sim"):
            t2.add_column(col, justify="right")
        for r in res["shrinkage_sweep"]:
            t2.add_row(str(r["n_in"]), str(r["n_out"]), ",".join(f"{x:g}" for x in r["strengths"]),
                       _fmt(r["gd_test_error_at_t_opt_theory"]), _fmt(r["shrinkage_test_error_theory"]),
                       _fmt(r["gd_test_error_at_t_opt_sim"]), _fmt(r["shrinkage_test_error_sim"]))
        console.print(t2)


@app.command()
@_fail_cleanly
def transfer(
    alignment: str = typer.Option("0,0.25,0.5,0.75,1", help="Input alignments v̄_S·v̄_T in [0, 1]."),
    snr_source: str = typer.Option("0.5,1,2,4", help="Source teacher strengths s̄_S, comma-separated."),
    snr_target: float = typer.Option(1.0, help="Target teacher strength s̄_T."),
    n_in: int = typer.Option(100, help="Shared input dimension N_i."),
    n_out_source: int = typer.Option(50, help="Source output dimension."),
    n_out_target: int = typer.Option(50, help="Target output dimension (N_oS + N_oT <= N_i)."),
    seeds: int = typer.Option(10, help="Noise draws per setting (paired: same draws alone and joint)."),
    a0: float = typer.Option(1e-5, help="Initial student strength per empirical mode."),
    lr: float = typer.Option(1e-2, help="Learning rate; τ = 1/lr epochs."),
    init: str = typer.Option("decoupled", help="decoupled | random."),
    seed: int = typer.Option(0, help="Random seed."),
    threads: int = typer.Option(1, help=THREADS_HELP),
    out: str = typer.Option("transfer", help=OUT_HELP),
) -> None:
    """Transfer to a weak target task from joint training with a source through a shared layer."""
    from qkdissect.dynamics.experiments import run_transfer

    _threads(threads)
    with _progress() as prog:
        res = run_transfer(
            out, _floats(alignment, "--alignment"), _floats(snr_source, "--snr-source"), snr_target,
            n_in=n_in, n_out_source=n_out_source, n_out_target=n_out_target, n_seeds=seeds, a0=a0,
            lr=lr, init=init, seed=seed, progress=prog,
        )
    table = Table(title=f"transfer benefit (alone − joint target test error) → {Path(out) / 'results.json'}")
    for col in ("s̄_S", "alignment", "alone (th)", "joint (th)", "benefit th", "benefit sim"):
        table.add_column(col, justify="right")
    for r in res["settings"]:
        table.add_row(
            _fmt(r["snr_source"]), _fmt(r["alignment"]), _fmt(r["target_error_alone_theory"], ".3f"),
            _fmt(r["target_error_joint_theory"], ".3f"), _fmt(r["benefit_theory"], "+.3f"),
            _fmt(r["benefit_sim"], "+.3f"),
        )
    console.print(table)


def _apply_quick(kwargs: dict[str, Any], quick: bool, settings: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, **settings} if quick else kwargs


def _conc(c: dict[str, Any]) -> str:
    idx = c.get("index")
    if idx is None:
        return "n/a"
    return f"{idx:.3f}" + (" (censored)" if c.get("censored") else "")


QUICK_HELP = "Tiny settings for tests (< 1 min): overrides the size options."


@app.command()
@_fail_cleanly
def metalearn(
    strengths: str = typer.Option("4,3,2,1.5,1,0.7,0.5,0.3", help="Task spectrum s_α (fixed for every task)."),
    n_x: int = typer.Option(8, help="Input dimension N_x."),
    n_y: int = typer.Option(8, help="Output dimension N_y."),
    prior: str = typer.Option("rotation", help="rotation (U, V Haar per task) | aligned (V = input axes)."),
    noise: float = typer.Option(0.0, help="Observation noise σ (targets y = Wx + σε)."),
    ridge: float = typer.Option(1.0, help="Ridge λ of the ridge estimator."),
    meta_steps: int = typer.Option(20_000, help="LSTM meta-training steps (one batch of episodes each)."),
    hidden: int = typer.Option(128, help="LSTM hidden units."),
    batch: int = typer.Option(64, help="Episodes per meta-step."),
    episode_length: int = typer.Option(20, help="Samples per episode (m_α(k) for k = 0 … length−1)."),
    meta_lr: float = typer.Option(1e-3, help="Adam learning rate (cosine decay to 0)."),
    train_tasks: int = typer.Option(50_000, help="Size of the meta-training task pool."),
    test_tasks: int = typer.Option(512, help="Held-out tasks on which every system is evaluated."),
    learner_steps: int = typer.Option(3000, help="SGD steps of each fresh learner."),
    learner_lr: float = typer.Option(0.01, help="SGD learning rate of the learners (τ = 1/lr steps)."),
    learner_batch: int = typer.Option(8, help="Samples per SGD step."),
    learner_hidden: int = typer.Option(32, help="Hidden width of the 2-layer linear learners."),
    seed: int = typer.Option(0, help="Random seed (every derived seed is recorded)."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
    threads: int = typer.Option(1, help=THREADS_HELP),
    out: str = typer.Option("metalearn", help=OUT_HELP),
) -> None:
    """Learner vs ideal estimators vs LSTM meta-learner: staggered or concurrent mode recovery."""
    from qkdissect.dynamics.meta_experiments import QUICK_METALEARN, run_metalearn

    _threads(threads)
    kwargs = dict(n_x=n_x, n_y=n_y, prior=prior, noise=noise, ridge=ridge, meta_steps=meta_steps, hidden=hidden,
                  batch=batch, episode_length=episode_length, meta_lr=meta_lr, n_train_tasks=train_tasks,
                  n_test_tasks=test_tasks, learner_steps=learner_steps, learner_lr=learner_lr,
                  learner_batch=learner_batch, learner_hidden=learner_hidden, seed=seed)
    with _progress() as prog:
        res = run_metalearn(out, _floats(strengths, "--strengths"), progress=prog,
                            **_apply_quick(kwargs, quick, QUICK_METALEARN))
    table = Table(title=f"metalearn: concurrency of mode recovery → {Path(out) / 'results.json'}")
    for col in ("system", "x axis", "half points (per mode, strongest first)", "concurrency index"):
        table.add_column(col, justify="right")
    for name, sys_ in res["systems"].items():
        hp = sys_["concurrency"]["half_points"]
        pts = ", ".join("—" if v is None else f"{v:.3g}" for v in hp)
        table.add_row(name, "samples seen" if name == "learner" else "k", pts, _conc(sys_["concurrency"]))
    console.print(table)
    r2 = res["systems"]["lstm"]["linearity_r2"]
    console.print(f"LSTM held-out relative error {res['systems']['lstm']['meta_training']['test_loss'][-1]:.3f}; "
                  f"probe linearity R² (min over k≥1) {min(v for v in r2[1:] if v is not None):.3f}; "
                  f"total {res['timings_seconds']['total']:.0f} s, load {res['load_average']}")


@app.command()
@_fail_cleanly
def icl(
    strengths: str = typer.Option("3,2,1.5,1,0.5", help="Task spectrum s_α (unequal mode strengths)."),
    n_x: int = typer.Option(5, help="Input dimension N_x."),
    n_y: int = typer.Option(0, help="Output dimension N_y; 0 = N_x."),
    attention: str = typer.Option("softmax,linear", help="Attention variants, comma-separated (softmax, linear)."),
    prior: str = typer.Option("rotation,aligned", help="Task priors, comma-separated: rotation (U, V Haar per "
                              "task, as in metalearn) and/or aligned (mode α reads input axis α)."),
    layers: int = typer.Option(1, help="Attention layers."),
    heads: int = typer.Option(4, help="Heads per layer."),
    d_head: int = typer.Option(0, help="Head width; 0 = d_model = N_x + N_y."),
    context: int = typer.Option(40, help="Context length N (queries see k = 0 … N samples)."),
    steps: int = typer.Option(10_000, help="Training steps (outer-loop transitions happen in the first ~1000 "
                              "at the defaults; later ones can follow)."),
    batch: int = typer.Option(64, help="Tasks per step."),
    lr: float = typer.Option(1e-3, help="Learning rate (constant)."),
    optimizer: str = typer.Option("adam", help="adam | sgd."),
    init_scale: float = typer.Option(0.1, help="Initial weights: init_scale · N(0, 1/fan_in) (small)."),
    noise: float = typer.Option(0.0, help="Observation noise σ."),
    ridge: float = typer.Option(1.0, help="Ridge λ of the ridge estimator."),
    checkpoints: int = typer.Option(200, help="Checkpoints saved during training (3/4 geometric, 1/4 even)."),
    train_tasks: int = typer.Option(50_000, help="Size of the training task pool."),
    test_tasks: int = typer.Option(512, help="Held-out tasks for the in-context analysis."),
    seed: int = typer.Option(0, help="Random seed (every derived seed is recorded)."),
    quick: bool = typer.Option(False, "--quick", help=QUICK_HELP),
    threads: int = typer.Option(1, help=THREADS_HELP),
    out: str = typer.Option("icl", help=OUT_HELP),
) -> None:
    """Small transformers on in-context regression: outer-loop QK/OV modes, in-context recovery, cosines."""
    from qkdissect.dynamics.icl_experiment import QUICK_ICL, run_icl

    _threads(threads)
    kwargs = dict(attentions=[a.strip() for a in attention.split(",") if a.strip()],
                  priors=[p.strip() for p in prior.split(",") if p.strip()], n_x=n_x, n_y=n_y or None,
                  layers=layers, heads=heads, d_head=d_head or None, context=context, steps=steps, batch=batch,
                  lr=lr, optimizer=optimizer, init_scale=init_scale, noise=noise, ridge=ridge,
                  n_checkpoints=checkpoints, n_train_tasks=train_tasks, n_test_tasks=test_tasks, seed=seed)
    with _progress() as prog:
        res = run_icl(out, _floats(strengths, "--strengths"), progress=prog, **_apply_quick(kwargs, quick, QUICK_ICL))
    table = Table(title=f"icl: outer loop vs in context → {Path(out) / 'results.json'}")
    for col in ("variant", "test error", "outer-loop index", "strongest first", "in-context index"):
        table.add_column(col, justify="right")
    for name, sm in res["summary"].items():
        table.add_row(
            name, f"{sm['final_test_loss']:.3f}", _fmt(sm["outer_loop_m_full_context_index"], ".3f"),
            str(sm["outer_loop_m_full_context_strongest_first"]),
            _fmt(sm["in_context_index"], ".3f") + (" (censored)" if sm["in_context_censored"] else ""),
        )
    console.print(table)
    console.print("index = std/mean of the modes' half-points (0 = all at once); outer loop: m_α(N) over "
                  "training steps; in context: m_α(k) over k.")
    cos = Table(title="weighted cosine of W_QᵀW_K per head (x–x block | full matrix), ω = tr(M_xx)/N_x")
    for col in ("variant", "head", "x–x block", "full", "ω"):
        cos.add_column(col, justify="right")
    for v in res["variants"]:
        for h in v["cosines"]["heads"]:
            cos.add_row(v["name"], f"L{h['layer']}H{h['head']}", f"{h['xx_weighted_cosine']:+.3f}",
                        f"{h['full_weighted_cosine']:+.3f}", f"{h['omega']:+.3f}")
    console.print(cos)
    console.print(f"atlases: {', '.join(v['atlas'] for v in res['variants'])} (open with `qkdissect report`); "
                  f"total {res['timings_seconds']['total']:.0f} s, load {res['load_average']}")


def main() -> None:  # pragma: no cover - convenience entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
