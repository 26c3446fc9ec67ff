"""Learning dynamics of singular modes in deep linear networks (spec: learning-dynamics §1–§2).

* :mod:`~qkdissect.dynamics.theory` — Saxe et al.'s exact mode dynamics (closed form for depth 2,
  ODE for depth N, half-times, the discrete-step recursion).
* :mod:`~qkdissect.dynamics.rmt` — Marchenko–Pastur law, spike ŝ(s̄), overlap O(s̄), inverse map,
  optimal shrinkage.
* :mod:`~qkdissect.dynamics.tasks` — task generators (spectrum + Haar singular vectors, noisy
  teachers, transfer pairs), batched.
* :mod:`~qkdissect.dynamics.simulate` — batched full-batch gradient descent of deep linear nets
  (torch) and initialisations; :mod:`~qkdissect.dynamics.sweep` — depth sweep.
* :mod:`~qkdissect.dynamics.generalization` / :mod:`~qkdissect.dynamics.transfer` — Lampinen &
  Ganguli's train/test theory, optimal stopping, shrinkage, transfer; simulations.
* :mod:`~qkdissect.dynamics.incontext` — the in-context regression setting shared by learners,
  meta-learners and transformers (task priors, mode recovery m_α, concurrency index);
  :mod:`~qkdissect.dynamics.estimators` — min-norm / ridge / Bayes estimators and closed forms.
* :mod:`~qkdissect.dynamics.metalearn` — SGD learners and the LSTM meta-learner (spec §3).
* :mod:`~qkdissect.dynamics.icl_model`, :mod:`~qkdissect.dynamics.icl`,
  :mod:`~qkdissect.dynamics.icl_adapter` — the in-context regression transformer, its training,
  probing and dissection, and its qkdissect adapter (spec §4).
* :mod:`~qkdissect.dynamics.experiments`, :mod:`~qkdissect.dynamics.meta_experiments`,
  :mod:`~qkdissect.dynamics.icl_experiment` / :mod:`~qkdissect.dynamics.cli` — the
  ``qkdissect dynamics`` commands.

Conventions: singular vectors are columns (W = U diag(s) Vᵀ); time in epochs (= full-batch
gradient steps), τ = 1/lr; a₀ is the initial strength of the network's *product* on a mode.
"""

from qkdissect.dynamics.estimators import (
    ESTIMATORS,
    EstimatorRecovery,
    bayes_estimate,
    estimator_recovery,
    min_norm_estimate,
    min_norm_recovery,
    min_norm_recovery_sd,
    prior_row_covariance,
    ridge_estimate,
)
from qkdissect.dynamics.generalization import (
    ERROR_DEFINITIONS,
    GeneralizationSimulation,
    GeneralizationTheory,
    ShrinkageComparison,
    generalization_theory,
    shrinkage_estimate,
    shrinkage_sweep,
    simulate_generalization,
)
from qkdissect.dynamics.icl import (
    ICLProbe,
    ICLTrainLog,
    cosine_statistics,
    load_checkpoint,
    probe_icl,
    train_icl,
    weight_spectra,
)
from qkdissect.dynamics.icl_model import ICLBatch, ICLTransformer, icl_batch, icl_mask
from qkdissect.dynamics.incontext import (
    PRIORS,
    Concurrency,
    concurrency,
    half_recovery_points,
    make_prior_tasks,
    mode_recovery,
    sample_episode,
)
from qkdissect.dynamics.metalearn import (
    LearnerTrace,
    LSTMMetaLearner,
    LSTMProbe,
    MetaTrainLog,
    meta_train,
    probe_lstm,
    sgd_learner,
)
from qkdissect.dynamics.rmt import (
    detection_threshold,
    inverse_spike,
    marchenko_pastur_density,
    marchenko_pastur_edges,
    marchenko_pastur_expectation,
    optimal_shrinkage,
    spike_overlap,
    spike_overlaps,
    spike_singular_value,
)
from qkdissect.dynamics.simulate import (
    INIT_KINDS,
    GDTrace,
    ModeSimulation,
    effective_initial_strength,
    gradient_descent,
    init_weights,
    network_product,
    simulate_modes,
)
from qkdissect.dynamics.sweep import DepthSweep, depth_learning_rate, depth_sweep
from qkdissect.dynamics.tasks import (
    LinearTask,
    NoisyTeacher,
    TransferPair,
    make_linear_task,
    make_noisy_teacher,
    make_transfer_pair,
    random_orthogonal,
    sample_inputs,
)
from qkdissect.dynamics.theory import (
    discrete_mode_strength,
    half_time,
    mode_strength,
    saxe_depth2,
    time_to_fraction,
)
from qkdissect.dynamics.transfer import (
    TransferSimulation,
    TransferTheory,
    simulate_transfer,
    transfer_theory,
)

__all__ = [
    # theory
    "saxe_depth2",
    "mode_strength",
    "half_time",
    "time_to_fraction",
    "discrete_mode_strength",
    # random-matrix theory
    "marchenko_pastur_edges",
    "marchenko_pastur_density",
    "marchenko_pastur_expectation",
    "detection_threshold",
    "spike_singular_value",
    "spike_overlaps",
    "spike_overlap",
    "inverse_spike",
    "optimal_shrinkage",
    # tasks
    "random_orthogonal",
    "LinearTask",
    "make_linear_task",
    "sample_inputs",
    "NoisyTeacher",
    "make_noisy_teacher",
    "TransferPair",
    "make_transfer_pair",
    # simulation
    "INIT_KINDS",
    "init_weights",
    "network_product",
    "GDTrace",
    "gradient_descent",
    "ModeSimulation",
    "simulate_modes",
    "effective_initial_strength",
    "DepthSweep",
    "depth_sweep",
    "depth_learning_rate",
    # generalisation and transfer
    "ERROR_DEFINITIONS",
    "GeneralizationTheory",
    "generalization_theory",
    "GeneralizationSimulation",
    "simulate_generalization",
    "shrinkage_estimate",
    "ShrinkageComparison",
    "shrinkage_sweep",
    "TransferTheory",
    "transfer_theory",
    "TransferSimulation",
    "simulate_transfer",
    # in-context setting and ideal estimators
    "PRIORS",
    "make_prior_tasks",
    "sample_episode",
    "mode_recovery",
    "Concurrency",
    "concurrency",
    "half_recovery_points",
    "ESTIMATORS",
    "min_norm_estimate",
    "ridge_estimate",
    "bayes_estimate",
    "prior_row_covariance",
    "min_norm_recovery",
    "min_norm_recovery_sd",
    "EstimatorRecovery",
    "estimator_recovery",
    # learners and meta-learners
    "LearnerTrace",
    "sgd_learner",
    "LSTMMetaLearner",
    "MetaTrainLog",
    "meta_train",
    "LSTMProbe",
    "probe_lstm",
    # in-context transformers
    "ICLBatch",
    "ICLTransformer",
    "icl_batch",
    "icl_mask",
    "ICLTrainLog",
    "train_icl",
    "load_checkpoint",
    "ICLProbe",
    "probe_icl",
    "weight_spectra",
    "cosine_statistics",
]
