"""Depth sweep: how learning time depends on depth and initialisation (Saxe et al. 2014).

For each depth N and initialisation, ``n_seeds`` networks (one Haar-random task each, spectrum
``strengths``, all layers of width n = len(strengths) unless ``width`` is given) are trained by
full-batch gradient descent until the relative training loss

    ℓ(t) = ‖Σ_yx − W(t)‖²_F / ‖Σ_yx‖²_F

falls below ``criterion``. The learning rate is ``lr · 2/N`` by default (``lr_scaling='1/N'``):
the product of N balanced layers moves N times faster than one layer, so Saxe et al. scale the
rate as 1/N; with this scaling the depth-2 network uses ``lr`` itself. Time is in epochs (steps).
For ``decoupled`` init the time is also predicted from the mode ODE (``theory_times``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import optimize

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import first_crossing
from qkdissect.dynamics.linear.simulate import INIT_KINDS, gradient_descent, init_weights
from qkdissect.dynamics.linear.tasks import make_generator, make_linear_task
from qkdissect.dynamics.linear.theory import mode_strength_function
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn

__all__ = ["DepthSweep", "depth_sweep", "depth_learning_rate"]


def depth_learning_rate(lr: float, depth: int, scaling: str = "1/N") -> float:
    """Learning rate used at depth N: ``lr · 2/N`` for scaling '1/N', ``lr`` for 'constant'."""
    if scaling == "1/N":
        return lr * 2.0 / depth
    if scaling == "constant":
        return lr
    raise QKDissectError(f"lr_scaling: expected '1/N' or 'constant', got {scaling!r}.")


@dataclass(frozen=True)
class DepthSweep:
    """Result of :func:`depth_sweep`.

    Attributes:
        times: ``(n_inits, n_depths, n_seeds)`` epochs to reach the criterion; NaN = not reached
            within ``max_steps``.
        theory_times: ``(n_inits, n_depths)`` decoupled-init prediction (NaN for other inits).
        loss_steps: ``(T,)`` epochs at which ``loss`` is stored (subsampled).
        loss: ``(n_inits, n_depths, T, n_seeds)`` relative training loss; NaN after an early stop.
        lrs: ``(n_depths,)`` learning rate used at each depth.
    """

    depths: tuple[int, ...]
    inits: tuple[str, ...]
    strengths: np.ndarray
    times: np.ndarray
    theory_times: np.ndarray
    loss_steps: np.ndarray
    loss: np.ndarray
    lrs: np.ndarray
    criterion: float
    max_steps: int
    n_seeds: int
    width: int
    gain: float
    a0: float
    lr_scaling: str
    seed: int


def _theory_time(s: np.ndarray, a0: float, depth: int, tau: float, crit: float, t_max: float) -> float:
    """Epochs until Σ(s − a)²/Σs² < crit for decoupled init (NaN if beyond t_max)."""
    strength = mode_strength_function(s, np.full(s.shape, a0), depth, tau, t_max)

    def loss(t: np.ndarray) -> np.ndarray:
        return ((s - strength(t)) ** 2).sum(1) / (s**2).sum()

    t = np.linspace(0.0, t_max, 4001)
    below = loss(t) < crit
    if not below.any():
        return float("nan")
    i = int(np.argmax(below))
    if i == 0:
        return 0.0
    return float(optimize.brentq(lambda x: loss(np.array([x]))[0] - crit, t[i - 1], t[i], xtol=1e-6))


def depth_sweep(
    depths: Sequence[int] = (2, 4, 8, 16),
    inits: Sequence[str] = ("orthogonal", "gaussian"),
    strengths: Any = (4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5),
    *,
    lr: float = 1e-2,
    lr_scaling: str = "1/N",
    criterion: float = 0.01,
    max_steps: int = 20_000,
    n_seeds: int = 8,
    width: int | None = None,
    gain: float = 1.0,
    a0: float = 1e-3,
    seed: int = 0,
    n_stored: int = 400,
    progress: ProgressFn | None = None,
) -> DepthSweep:
    """Epochs to reach a relative training loss ``criterion`` for each (init, depth).

    ``gain`` scales ``orthogonal``/``gaussian`` layers; ``a0`` is the product strength for
    ``decoupled`` and the scale of ``random``. ``progress(f"{init} N={depth}", done, total)`` reports steps.
    """
    s = checks.strengths(strengths)
    ds = tuple(checks.depth(d) for d in depths)
    ins = tuple(inits)
    for k in ins:
        if k not in INIT_KINDS:
            raise QKDissectError(f"init: expected any of {', '.join(INIT_KINDS)}, got {k!r}.")
    if not ds or not ins:
        raise QKDissectError("depth_sweep: give at least one depth and one init.")
    crit = checks.fraction(criterion, "criterion")
    max_steps = checks.count(max_steps, "max_steps")
    n_seeds = checks.count(n_seeds, "n_seeds")
    lr = checks.positive(lr, "lr")
    n = s.size
    w = n if width is None else checks.count(width, "width")
    if any(k in ("decoupled", "random") for k in ins):
        checks.initial_strength(a0, s)
    lrs = np.array([depth_learning_rate(lr, d, lr_scaling) for d in ds])
    stride = max(1, max_steps // n_stored)
    loss_steps = np.arange(0, max_steps + 1, stride)
    times = np.full((len(ins), len(ds), n_seeds), np.nan)
    theory = np.full((len(ins), len(ds)), np.nan)
    loss = np.full((len(ins), len(ds), loss_steps.size, n_seeds), np.nan)
    for i, kind in enumerate(ins):
        for j, d in enumerate(ds):
            g = make_generator(seed + 1000 * j)  # same tasks for every init at a given depth
            task = make_linear_task(s, n_tasks=n_seeds, seed=g)
            sig = task.matrix
            norm = (sig**2).sum((-1, -2))
            sizes = [n] + [w] * (d - 1) + [n]
            ws = init_weights(
                kind, sizes, n_batch=n_seeds, a0=a0, gain=gain, modes=(task.U, task.V), seed=g
            )
            tr = gradient_descent(
                ws,
                sig,
                float(lrs[j]),
                max_steps,
                observe=lambda p, sig=sig, norm=norm: ((p - sig) ** 2).sum((-1, -2)) / norm,
                stop=lambda obs: bool(torch.all(obs < crit)),
                progress=progress,
                stage=f"{kind} N={d}",
            )
            curve = tr.observations.numpy()  # (T_done, B)
            times[i, j] = first_crossing(-curve, np.full(n_seeds, -crit), tr.steps)
            keep = loss_steps <= tr.steps[-1]
            loss[i, j, keep] = curve[loss_steps[keep]]
            if kind == "decoupled":
                theory[i, j] = _theory_time(s, a0, d, 1.0 / lrs[j], crit, float(max_steps))
    return DepthSweep(
        depths=ds,
        inits=ins,
        strengths=s,
        times=times,
        theory_times=theory,
        loss_steps=loss_steps,
        loss=loss,
        lrs=lrs,
        criterion=crit,
        max_steps=max_steps,
        n_seeds=n_seeds,
        width=w,
        gain=float(gain),
        a0=float(a0),
        lr_scaling=lr_scaling,
        seed=int(seed),
    )
