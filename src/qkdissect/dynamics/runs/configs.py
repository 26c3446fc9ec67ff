"""The settings of every ``qkdissect dynamics`` experiment: one frozen dataclass per command.

The command line builds these from its options (same names; its defaults are read from here) and the
runners (``qkdissect.dynamics.runs.<experiment>.run_<experiment>``) take them, so every default is
written once. This module imports nothing heavy, so the command line can read the defaults at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["DepthSweepConfig", "GeneralizationConfig", "ICLConfig", "MetalearnConfig", "SaxeConfig",
           "SHRINKAGE_SWEEP_SETTINGS", "TransferConfig"]


#: (N_i, N_o, teacher strengths) of the shrinkage-vs-GD sweep.
SHRINKAGE_SWEEP_SETTINGS: tuple[tuple[int, int, tuple[float, ...]], ...] = (
    (100, 100, (3.0,)),
    (100, 100, (1.5,)),
    (100, 100, (1.2,)),
    (100, 100, (4.0, 2.0)),
    (100, 50, (2.0,)),
    (100, 25, (5.0, 1.0)),
    (100, 50, (0.7,)),
)


@dataclass(frozen=True)
class SaxeConfig:
    """Settings of ``qkdissect dynamics saxe`` (the command's options have the same names).

    strengths: target singular values s_α; depth: number of weight matrices N; a0: initial strength
    of the product on each mode (decoupled) or its scale (random); lr: learning rate, τ = 1/lr;
    init: decoupled | random | orthogonal | gaussian; gain: per-layer scale of orthogonal / gaussian;
    seeds: networks simulated as a batch; hidden: hidden width (>= number of modes); steps: gradient
    steps (None: 2 × the slowest analytic half-time); seed: random seed.
    """

    strengths: tuple[float, ...] = (5.0, 4.0, 3.0, 2.0, 1.0)
    depth: int = 2
    a0: float = 1e-6
    lr: float = 1e-3
    init: str = "decoupled"
    gain: float = 1.0
    seeds: int = 3
    hidden: int = 32
    steps: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class DepthSweepConfig:
    """Settings of ``qkdissect dynamics depth-sweep`` (the command's options have the same names).

    depths: numbers of weight matrices N; init: initialisations (orthogonal, gaussian, decoupled,
    random); strengths: the task spectrum (square task, n = number of strengths); lr: learning rate
    at depth 2; lr_scaling: '1/N' (lr · 2/N at depth N) or 'constant'; criterion: relative training
    loss that counts as learned; max_steps: epochs before giving up; seeds: networks per (init,
    depth); width: hidden width (0: n); gain: per-layer scale of orthogonal / gaussian; a0: product
    strength of decoupled / scale of random init; seed: random seed.
    """

    depths: tuple[int, ...] = (2, 4, 8, 16)
    init: tuple[str, ...] = ("orthogonal", "gaussian")
    strengths: tuple[float, ...] = (4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5)
    lr: float = 1e-2
    lr_scaling: str = "1/N"
    criterion: float = 0.01
    max_steps: int = 20_000
    seeds: int = 8
    width: int = 0
    gain: float = 1.0
    a0: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class GeneralizationConfig:
    """Settings of ``qkdissect dynamics generalization`` (the command's options have the same names).

    n_in, n_out: N_i (= number of training examples) and N_o <= N_i; strengths: teacher singular values
    s̄ (the SNRs); seeds: teacher/noise draws, one student each; depth: student depth N; a0: initial
    student strength on every empirical mode; lr: learning rate (τ = 1/lr); init: decoupled (aligned
    to Σ̂, the theory's assumption) | random; steps: gradient steps (None: 2 × the half-time of a
    bulk-edge mode); sweep: also compare shrinkage with GD at t* on ``sweep_settings`` with
    ``sweep_seeds`` seeds each; seed: random seed.
    """

    n_in: int = 100
    n_out: int = 100
    strengths: tuple[float, ...] = (3.0,)
    seeds: int = 10
    depth: int = 2
    a0: float = 1e-5
    lr: float = 1e-2
    init: str = "decoupled"
    steps: int | None = None
    sweep: bool = True
    sweep_seeds: int = 5
    sweep_settings: tuple[tuple[int, int, tuple[float, ...]], ...] = SHRINKAGE_SWEEP_SETTINGS
    seed: int = 0


@dataclass(frozen=True)
class TransferConfig:
    """Settings of ``qkdissect dynamics transfer`` (the command's options have the same names).

    alignment: input alignments v̄_S·v̄_T in [0, 1]; snr_source: source teacher strengths s̄_S;
    snr_target: target teacher strength s̄_T; n_in: shared input dimension N_i; n_out_source,
    n_out_target: output dimensions (N_oS + N_oT <= N_i); seeds: noise draws per setting (the same
    draws alone and joint); a0: initial student strength per empirical mode; lr: learning rate
    (τ = 1/lr); init: decoupled | random; seed: random seed.
    """

    alignment: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    snr_source: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    snr_target: float = 1.0
    n_in: int = 100
    n_out_source: int = 50
    n_out_target: int = 50
    seeds: int = 10
    a0: float = 1e-5
    lr: float = 1e-2
    init: str = "decoupled"
    seed: int = 0


@dataclass(frozen=True)
class MetalearnConfig:
    """Settings of ``qkdissect dynamics metalearn`` (the command's options have the same names).

    Tasks: y = W x + σε, W = U diag(``strengths``) Vᵀ with N_x = ``n_x`` inputs, N_y = ``n_y`` outputs,
    (U, V) from ``prior`` (rotation | aligned), σ = ``noise``; ``ridge``: λ of the ridge estimator.
    LSTM: ``hidden`` units, ``layers`` layers, meta-trained for ``meta_steps`` Adam steps (learning rate
    ``meta_lr``, cosine decay) of ``batch`` episodes of ``episode_length`` samples, tasks from a pool of
    ``train_tasks``; every system is evaluated on ``test_tasks`` held-out tasks; probes ±``probe_scale``·e_i.
    Learner: a 2-layer linear net of width ``learner_hidden`` per task, ``learner_steps`` SGD steps
    (rate ``learner_lr``, ``learner_batch`` samples each, init product ~ ``learner_a0``, recorded every
    ``learner_record_every`` steps). ``seed``: every derived seed comes from it.
    """

    strengths: tuple[float, ...] = (4.0, 3.0, 2.0, 1.5, 1.0, 0.7, 0.5, 0.3)
    n_x: int = 8
    n_y: int = 8
    prior: str = "rotation"
    noise: float = 0.0
    ridge: float = 1.0
    meta_steps: int = 20_000
    hidden: int = 128
    layers: int = 1
    batch: int = 64
    episode_length: int = 20
    meta_lr: float = 1e-3
    train_tasks: int = 50_000
    test_tasks: int = 512
    learner_steps: int = 3000
    learner_lr: float = 0.01
    learner_batch: int = 8
    learner_hidden: int = 32
    learner_a0: float = 1e-3
    learner_record_every: int = 10
    probe_scale: float = 1.0
    seed: int = 0

    def quick(self) -> "MetalearnConfig":
        """Tiny settings for tests (well under a minute): everything small."""
        return dataclasses.replace(self, meta_steps=150, hidden=24, batch=16, train_tasks=500, test_tasks=48,
                                   episode_length=12, learner_steps=300, learner_record_every=5)


@dataclass(frozen=True)
class ICLConfig:
    """Settings of ``qkdissect dynamics icl`` (the command's options have the same names).

    Tasks as in ``metalearn``: spectrum ``strengths``, N_x = ``n_x`` inputs, N_y = ``n_y`` outputs (0: N_x),
    priors ``prior`` (rotation and/or aligned), noise σ = ``noise``, ridge λ = ``ridge``. One transformer per
    (attention in ``attention``, prior): ``layers`` layers of ``heads`` heads of width ``d_head`` (0: d_model =
    N_x + N_y), context length ``context``, initial weights ``init_scale`` · N(0, 1/fan_in); trained for
    ``steps`` steps of ``batch`` tasks from a pool of ``train_tasks`` (``optimizer`` adam | sgd, constant
    learning rate ``lr``), ``checkpoints`` checkpoints saved (3/4 geometric, 1/4 even), the outer loop probed
    on ``outer_tasks`` held-out tasks at each; the in-context analysis on ``test_tasks`` held-out tasks,
    probes ±``probe_scale``·e_i. ``seed``: every derived seed comes from it.
    """

    strengths: tuple[float, ...] = (3.0, 2.0, 1.5, 1.0, 0.5)
    n_x: int = 5
    n_y: int = 0
    attention: tuple[str, ...] = ("softmax", "linear")
    prior: tuple[str, ...] = ("rotation", "aligned")
    layers: int = 1
    heads: int = 4
    d_head: int = 0
    context: int = 40
    steps: int = 10_000
    batch: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    init_scale: float = 0.1
    noise: float = 0.0
    ridge: float = 1.0
    checkpoints: int = 200
    train_tasks: int = 50_000
    test_tasks: int = 512
    outer_tasks: int = 128
    probe_scale: float = 1.0
    seed: int = 0

    def quick(self) -> "ICLConfig":
        """Tiny settings for tests (well under a minute)."""
        return dataclasses.replace(self, steps=120, batch=16, train_tasks=500, test_tasks=48, checkpoints=12,
                                   context=12, outer_tasks=24)
