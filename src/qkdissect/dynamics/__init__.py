"""How singular modes are learned: deep linear networks, in-context learners, and their experiments.

* :mod:`qkdissect.dynamics.linear` — deep linear networks: Saxe et al.'s exact mode dynamics
  (``theory``), random-matrix facts (``rmt``), tasks, batched gradient descent (``simulate``), the depth
  sweep (``depth``), Lampinen & Ganguli's generalisation dynamics and transfer.
* :mod:`qkdissect.dynamics.incontext` — in-context linear regression: task priors and mode recovery
  (``setting``), ideal estimators, SGD learners and the LSTM meta-learner (``metalearn``), a small
  attention-only transformer (``model``), its training and dissection (``train``) and adapter.
* :mod:`qkdissect.dynamics.runs` — one runner and one frozen config per ``qkdissect dynamics``
  command (``saxe``, ``depth_sweep``, ``generalization``, ``transfer``, ``metalearn``, ``icl``) and the
  results format they share (``common``); :mod:`qkdissect.dynamics.plots` — their figures.
* :mod:`qkdissect.dynamics.checks` (parameter checks) and :mod:`qkdissect.dynamics.curves`
  (crossings, minima, medians of sampled curves) serve all of them.

Conventions: singular vectors are columns (W = U diag(s) Vᵀ); time in epochs (= full-batch
gradient steps), τ = 1/lr; a₀ is the initial strength of the network's *product* on a mode.

Every public name of ``linear`` and ``incontext`` is importable from here.
"""

from qkdissect.dynamics import incontext, linear
from qkdissect.dynamics.incontext import *  # noqa: F403
from qkdissect.dynamics.linear import *  # noqa: F403

__all__ = [*linear.__all__, *incontext.__all__]
