"""Batched full-batch gradient descent of deep linear networks (torch).

The loss is the whitened-input regression loss

    L(W_1, …, W_N) = ½ tr(W Σ_xx Wᵀ) − tr(Σ_yxᵀ W) + const,   W = W_N ⋯ W_1,

which for Σ_xx = I is ½‖Σ_yx − W‖²_F. One step of gradient descent with learning rate ``lr``:

    W_l ← W_l − lr · (W_N⋯W_{l+1})ᵀ (W Σ_xx − Σ_yx) (W_{l−1}⋯W_1)ᵀ        for every l at once,

so t (epochs) = number of steps, and the gradient-flow time constant is τ = 1/lr. Every tensor
carries a leading batch dimension ``B`` (seeds, or tasks) and all B networks are updated with
batched matmuls. Layer ``l`` has shape ``(B, n_l, n_{l−1})`` with ``layer_sizes = [n_0 = N_i, …,
n_N = N_o]``.

Initialisations (:func:`init_weights`):

* ``decoupled`` — aligned and balanced (Saxe): W_l = R_l diag(a₀^{1/N}) R_{l−1}ᵀ with R_0 = V,
  R_N = U (the task's singular vectors) and random orthonormal R_l in the hidden layers, so the
  product is U diag(a₀) Vᵀ: a₀ is the *product's* initial strength on each mode.
* ``random`` — small random: W_l = a₀^{1/N} · G_l / √(fan_in), G_l i.i.d. N(0, 1); the product's
  singular values are then of order a₀ (not aligned to the task).
* ``orthogonal`` — W_l = gain · Q_l with Q_l a Haar (semi-)orthogonal matrix (Saxe's random
  orthogonal init; the product is gain^N times an orthogonal matrix when all sizes are equal).
* ``gaussian`` — Saxe's "scaled Gaussian": W_l = gain · G_l / √(fan_in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.curves import first_crossing
from qkdissect.dynamics.linear.tasks import Seed, make_generator, make_linear_task, random_orthogonal
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, throttled

__all__ = [
    "INIT_KINDS",
    "init_weights",
    "network_product",
    "GDTrace",
    "gradient_descent",
    "ModeSimulation",
    "simulate_modes",
    "effective_initial_strength",
]

INIT_KINDS = ("decoupled", "random", "orthogonal", "gaussian")

def init_weights(
    kind: str,
    layer_sizes: Sequence[int],
    *,
    n_batch: int = 1,
    a0: Any = 1e-6,
    gain: float = 1.0,
    modes: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """Initial weights ``[W_1, …, W_N]``, W_l of shape ``(n_batch, n_l, n_{l−1})``.

    Args:
        kind: one of ``decoupled``, ``random``, ``orthogonal``, ``gaussian`` (module docstring).
        layer_sizes: ``[N_i, n_1, …, N_o]``; depth N = len(layer_sizes) − 1.
        a0: product strength for ``decoupled`` (scalar or one per mode) and scale for ``random``.
        gain: per-layer scale for ``orthogonal`` and ``gaussian``.
        modes: ``(U, V)`` with U ``(n_batch, N_o, r)``, V ``(n_batch, N_i, r)``; needed for
            ``decoupled`` (the task's singular vectors, as columns).
    """
    sizes = [checks.count(n, "layer size") for n in layer_sizes]
    depth = len(sizes) - 1
    if depth < 1:
        raise QKDissectError(
            f"layer_sizes: expected at least [n_in, n_out] (depth >= 1), got {list(layer_sizes)!r}."
        )
    g = make_generator(seed)
    b = checks.count(n_batch, "n_batch")
    if kind == "decoupled":
        if modes is None:
            raise QKDissectError(
                "init 'decoupled' needs the task's singular vectors: pass modes=(U, V)."
            )
        u, v = modes
        r = u.shape[-1]
        a = torch.as_tensor(np.broadcast_to(np.asarray(a0, dtype=np.float64), (r,)).copy(), dtype=dtype)
        if torch.any(a <= 0):
            raise QKDissectError(f"a0: decoupled init needs a0 > 0, got {a0!r}. Use e.g. 1e-6.")
        if min(sizes[1:-1], default=r) < r:
            raise QKDissectError(
                f"hidden: decoupled init needs every hidden width >= the number of modes ({r}), "
                f"got layer sizes {sizes}. Increase --hidden."
            )
        bases = [v] + [random_orthogonal(h, r, batch=b, seed=g, dtype=dtype) for h in sizes[1:-1]] + [u]
        per_layer = a ** (1.0 / depth)
        return [
            (bases[l + 1] * per_layer) @ bases[l].transpose(-1, -2) for l in range(depth)
        ]
    if kind == "random":
        scale = checks.positive(a0, "a0") ** (1.0 / depth)
        return [
            scale * torch.randn(b, sizes[l + 1], sizes[l], generator=g, dtype=dtype) / math.sqrt(sizes[l])
            for l in range(depth)
        ]
    if kind == "gaussian":
        gn = checks.positive(gain, "gain")
        return [
            gn * torch.randn(b, sizes[l + 1], sizes[l], generator=g, dtype=dtype) / math.sqrt(sizes[l])
            for l in range(depth)
        ]
    if kind == "orthogonal":
        gn = checks.positive(gain, "gain")
        out = []
        for l in range(depth):
            n_o, n_i = sizes[l + 1], sizes[l]
            if n_o >= n_i:
                q = random_orthogonal(n_o, n_i, batch=b, seed=g, dtype=dtype)
            else:
                q = random_orthogonal(n_i, n_o, batch=b, seed=g, dtype=dtype).transpose(-1, -2)
            out.append(gn * q)
        return out
    raise QKDissectError(
        f"init: expected one of {', '.join(INIT_KINDS)}, got {kind!r}."
    )


def network_product(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """``W = W_N ⋯ W_1``, shape ``(B, N_o, N_i)``."""
    p = weights[0]
    for w in weights[1:]:
        p = w @ p
    return p


@dataclass(frozen=True)
class GDTrace:
    """What :func:`gradient_descent` recorded.

    Attributes:
        steps: ``(T,)`` the step (= epoch) of each record.
        observations: ``(T, ...)`` ``observe(W)`` at those steps (W before the step's update).
        weights: the final weights, one ``(B, n_l, n_{l−1})`` tensor per layer.
        n_steps_done: steps actually taken (smaller than requested if ``stop`` fired).
    """

    steps: np.ndarray
    observations: torch.Tensor
    weights: tuple[torch.Tensor, ...]
    n_steps_done: int


def gradient_descent(
    weights: Sequence[torch.Tensor],
    sigma_yx: torch.Tensor,
    lr: float,
    n_steps: int,
    *,
    sigma_xx: torch.Tensor | None = None,
    record_every: int = 1,
    observe: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: Callable[[torch.Tensor], bool] | None = None,
    progress: ProgressFn | None = None,
    stage: str = "gradient descent",
) -> GDTrace:
    """Exact full-batch gradient descent on ``½ tr(W Σ_xx Wᵀ) − tr(Σ_yxᵀ W)``, batched over B.

    Args:
        weights: initial ``[W_1, …, W_N]`` (not modified).
        sigma_yx: ``(B, N_o, N_i)`` input–output correlation (broadcastable over B).
        lr: learning rate; τ = 1/lr.
        n_steps: number of steps (epochs).
        sigma_xx: ``(B, N_i, N_i)`` input correlation, identity if None.
        record_every: record ``observe(W)`` every this many steps (and at the last step).
        observe: maps the product W ``(B, N_o, N_i)`` to what is recorded (default: W itself).
        stop: called with each recorded observation; returning True ends the run early.
        progress: called as ``progress(stage, steps_done, n_steps)`` about 100 times.
    """
    lr = checks.positive(lr, "lr")
    n_steps = checks.count(n_steps, "n_steps", minimum=0)
    every = checks.count(record_every, "record_every")
    obs_fn = observe if observe is not None else (lambda w: w.clone())
    ws = [w.detach().clone() for w in weights]
    depth = len(ws)
    records: list[torch.Tensor] = []
    rec_steps: list[int] = []
    tick = throttled(progress, stage, n_steps)
    k = 0
    with torch.no_grad():
        while True:
            # forward: right[l] = W_{l-1} ⋯ W_1 (None = identity), p = W_N ⋯ W_1
            right: list[torch.Tensor | None] = [None] * depth
            p = ws[0]
            for l in range(1, depth):
                right[l] = p
                p = ws[l] @ p
            if k % every == 0 or k == n_steps:
                obs = obs_fn(p)
                records.append(obs)
                rec_steps.append(k)
                if stop is not None and stop(obs):
                    break
            if k == n_steps:
                break
            grad_p = (p @ sigma_xx if sigma_xx is not None else p) - sigma_yx
            # backward: lg = (W_N ⋯ W_{l+1})ᵀ G
            lg = grad_p
            grads: list[torch.Tensor] = [grad_p] * depth
            for l in range(depth - 1, -1, -1):
                rl = right[l]
                grads[l] = lg if rl is None else lg @ rl.transpose(-1, -2)
                if l > 0:
                    lg = ws[l].transpose(-1, -2) @ lg
            for l in range(depth):
                ws[l].sub_(grads[l], alpha=lr)
            k += 1
            tick(k)
    return GDTrace(
        steps=np.asarray(rec_steps, dtype=np.int64),
        observations=torch.stack(records),
        weights=tuple(ws),
        n_steps_done=k,
    )


def effective_initial_strength(
    weights: Sequence[torch.Tensor], U: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """Effective initial strength of each mode under small random init of a depth-2 network.

    Linearising gradient flow around small weights, p = W_2ᵀu_α and q = W_1 v_α obey
    τ dp/dt = s q, τ dq/dt = s p, so p + q grows as e^{st/τ}, p − q decays, and
    a_α = pᵀq ≈ ‖p₀ + q₀‖²/4 · e^{2st/τ}: the mode then follows Saxe's depth-2 curve with
    a₀ replaced by ``a_eff = ‖W_2ᵀ u_α + W_1 v_α‖² / 4`` (interactions between modes neglected).

    Args:
        weights: ``[W_1 (B, h, N_i), W_2 (B, N_o, h)]``.
        U: ``(B, N_o, r)``; V: ``(B, N_i, r)``.
    Returns:
        ``(B, r)``.
    """
    if len(weights) != 2:
        raise QKDissectError(
            f"effective_initial_strength is derived for depth 2, got depth {len(weights)}."
        )
    w1, w2 = weights
    pq = w2.transpose(-1, -2) @ U + w1 @ V  # (B, h, r)
    return (pq**2).sum(-2) / 4.0


@dataclass(frozen=True)
class ModeSimulation:
    """Simulated mode strengths of deep linear networks trained on ``Σ_yx = U diag(s) Vᵀ``.

    Attributes:
        steps: ``(T,)`` epochs of the records.
        strengths: ``(T, n_seeds, M)`` simulated a_α(t) = u_αᵀ W(t) v_α.
        off_mode_norm: ``(T, n_seeds)`` ‖W − Σ_α a_α u_α v_αᵀ‖_F, the part of W outside the
            task's modes (0 for decoupled init; decays for random init).
        target: ``(M,)`` the strengths s_α.
        effective_a0: ``(n_seeds, M)`` for ``random`` init at depth 2 (see
            :func:`effective_initial_strength`), else None.
    """

    steps: np.ndarray
    strengths: np.ndarray
    off_mode_norm: np.ndarray
    target: np.ndarray
    depth: int
    lr: float
    init: str
    a0: float
    gain: float
    n_seeds: int
    seed: int
    layer_sizes: tuple[int, ...]
    effective_a0: np.ndarray | None = field(default=None)

    @property
    def tau(self) -> float:
        """τ = 1/lr (epochs)."""
        return 1.0 / self.lr

    def half_times(self) -> np.ndarray:
        """``(n_seeds, M)`` first time a_α(t) reaches s_α/2 (linear interpolation), NaN if never."""
        return first_crossing(self.strengths, self.target / 2.0, self.steps)


def simulate_modes(
    strengths: Any,
    *,
    depth: int = 2,
    a0: float = 1e-6,
    lr: float = 1e-3,
    n_steps: int = 10_000,
    init: str = "decoupled",
    gain: float = 1.0,
    n_seeds: int = 1,
    hidden: int | None = None,
    n_in: int | None = None,
    n_out: int | None = None,
    seed: int = 0,
    record_every: int = 1,
    progress: ProgressFn | None = None,
) -> ModeSimulation:
    """Train ``n_seeds`` deep linear networks on tasks with spectrum ``strengths`` and record modes.

    Each seed gets its own Haar-random U, V (the dynamics from decoupled init do not depend on
    them) and its own initial weights. Hidden layers all have width ``hidden`` (default
    max(N_i, N_o)); N_i, N_o default to the number of modes.

    Returns:
        :class:`ModeSimulation`.
    """
    s = checks.strengths(strengths)
    n = checks.depth(depth)
    if init in ("decoupled", "random"):
        checks.initial_strength(a0, s)
    if init not in INIT_KINDS:
        raise QKDissectError(f"init: expected one of {', '.join(INIT_KINDS)}, got {init!r}.")
    n_seeds = checks.count(n_seeds, "n_seeds")
    g = make_generator(seed)
    task = make_linear_task(s, n_in, n_out, n_tasks=n_seeds, seed=g)
    h = max(task.n_in, task.n_out) if hidden is None else checks.count(hidden, "hidden")
    sizes = [task.n_in] + [h] * (n - 1) + [task.n_out]
    ws = init_weights(
        init, sizes, n_batch=n_seeds, a0=a0, gain=gain, modes=(task.U, task.V), seed=g
    )
    eff = None
    if init == "random" and n == 2:
        eff = effective_initial_strength(ws, task.U, task.V).numpy()

    def observe(w: torch.Tensor) -> torch.Tensor:
        a = task.mode_strengths(w)  # (B, M)
        resid = w - (task.U * a.unsqueeze(-2)) @ task.V.transpose(-1, -2)
        return torch.cat([a, torch.linalg.matrix_norm(resid).unsqueeze(-1)], dim=-1)

    trace = gradient_descent(
        ws, task.matrix, lr, n_steps, record_every=record_every, observe=observe, progress=progress
    )
    obs = trace.observations.numpy()
    return ModeSimulation(
        steps=trace.steps,
        strengths=obs[..., :-1],
        off_mode_norm=obs[..., -1],
        target=s,
        depth=n,
        lr=float(lr),
        init=init,
        a0=float(a0),
        gain=float(gain),
        n_seeds=n_seeds,
        seed=int(seed),
        layer_sizes=tuple(sizes),
        effective_a0=eff,
    )
