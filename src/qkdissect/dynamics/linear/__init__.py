"""Deep linear networks: how they learn singular modes, generalise and transfer.

* :mod:`.theory` — Saxe et al.'s exact mode dynamics τ da/dt = N a^{2−2/N}(s − a) (closed form for
  depth 2, ODE for depth N, half-times, the discrete-step recursion);
* :mod:`.rmt` — Marchenko–Pastur law, spike ŝ(s̄), overlap O(s̄), inverse map, optimal shrinkage;
* :mod:`.tasks` — task generators (spectrum + Haar singular vectors, noisy teachers, transfer pairs);
* :mod:`.simulate` — batched full-batch gradient descent and initialisations; :mod:`.depth` — the
  depth sweep;
* :mod:`.generalization`, :mod:`.transfer` — Lampinen & Ganguli's train/test theory, optimal stopping,
  shrinkage and transfer, with simulations.

Every public name of these modules is importable from here (and from :mod:`qkdissect.dynamics`).
"""

from qkdissect.dynamics.linear import depth, generalization, rmt, simulate, tasks, theory, transfer
from qkdissect.dynamics.linear.depth import *  # noqa: F403
from qkdissect.dynamics.linear.generalization import *  # noqa: F403
from qkdissect.dynamics.linear.rmt import *  # noqa: F403
from qkdissect.dynamics.linear.simulate import *  # noqa: F403
from qkdissect.dynamics.linear.tasks import *  # noqa: F403
from qkdissect.dynamics.linear.theory import *  # noqa: F403
from qkdissect.dynamics.linear.transfer import *  # noqa: F403

__all__ = [*theory.__all__, *rmt.__all__, *tasks.__all__, *simulate.__all__, *depth.__all__,
           *generalization.__all__, *transfer.__all__]
