"""In-context linear regression: learners, ideal estimators, meta-learners and transformers.

* :mod:`.setting` — the task priors (rotation, aligned), episodes, mode recovery m_α = u_αᵀ Ŵ v_α / s_α,
  the concurrency index and the probes that read Ŵ out of a black-box in-context learner;
* :mod:`.estimators` — min-norm / ridge / Bayes estimators after k samples and their closed forms;
* :mod:`.metalearn` — SGD learners (one 2-layer linear net per task) and the LSTM meta-learner;
* :mod:`.model` — a small attention-only transformer on (x, y) tokens; :mod:`.train` — its training,
  probing, QK/OV spectra and cosine statistics; :mod:`.adapter` — its qkdissect adapter (registered
  here, so that ``qkdissect.dissect(model)`` works on it).

Every public name of these modules is importable from here (and from :mod:`qkdissect.dynamics`).
"""

from qkdissect.dynamics.incontext import adapter, estimators, metalearn, model, setting, train
from qkdissect.dynamics.incontext.adapter import *  # noqa: F403  (registers ICLTransformerAdapter)
from qkdissect.dynamics.incontext.estimators import *  # noqa: F403
from qkdissect.dynamics.incontext.metalearn import *  # noqa: F403
from qkdissect.dynamics.incontext.model import *  # noqa: F403
from qkdissect.dynamics.incontext.setting import *  # noqa: F403
from qkdissect.dynamics.incontext.train import *  # noqa: F403

__all__ = [*setting.__all__, *estimators.__all__, *metalearn.__all__, *model.__all__, *train.__all__,
           *adapter.__all__]
