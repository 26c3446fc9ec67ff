"""Task generators: linear maps with a chosen spectrum, noisy teachers, transfer pairs.

Every generator is batched: it makes ``n_tasks`` (or ``n_seeds``) independent draws at once,
stacked along a leading batch dimension ``B``. Singular vectors are stored as *columns*
(``U[..., :, α]`` is u_α), so a task's map is ``W = U diag(s) Vᵀ``.

Randomness comes from a ``torch.Generator``; pass an int ``seed`` or a generator. Everything is
float64 by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.errors import QKDissectError

__all__ = [
    "Seed",
    "make_generator",
    "random_orthogonal",
    "LinearTask",
    "make_linear_task",
    "sample_inputs",
    "NoisyTeacher",
    "make_noisy_teacher",
    "TransferPair",
    "make_transfer_pair",
]

Seed = Union[int, torch.Generator]


def make_generator(seed: Seed) -> torch.Generator:
    """A CPU ``torch.Generator`` from an int seed (or the generator itself)."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(checks.count(seed, "seed", minimum=0))


def random_orthogonal(
    n: int,
    k: int | None = None,
    *,
    batch: int = 1,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Haar-random matrices with orthonormal columns, shape ``(batch, n, k)`` (k defaults to n).

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q, which makes Q exactly
    Haar-distributed (Mezzadri 2007).
    """
    n = checks.count(n, "n")
    k = n if k is None else checks.count(k, "k")
    if k > n:
        raise QKDissectError(f"random_orthogonal: need k <= n orthonormal columns, got n={n}, k={k}.")
    g = make_generator(seed)
    z = torch.randn(batch, n, k, generator=g, dtype=dtype)
    q, r = torch.linalg.qr(z)
    d = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    d = torch.where(d == 0, torch.ones_like(d), d)
    return q * d.unsqueeze(-2)


@dataclass(frozen=True)
class LinearTask:
    """A batch of linear maps ``W_b = U_b diag(s_b) V_bᵀ``.

    Attributes:
        U: ``(B, n_out, r)`` output singular vectors (columns, orthonormal).
        strengths: ``(B, r)`` singular values s_α >= 0.
        V: ``(B, n_in, r)`` input singular vectors (columns, orthonormal).
    """

    U: torch.Tensor
    strengths: torch.Tensor
    V: torch.Tensor

    @property
    def n_tasks(self) -> int:
        return int(self.U.shape[0])

    @property
    def n_out(self) -> int:
        return int(self.U.shape[1])

    @property
    def n_in(self) -> int:
        return int(self.V.shape[1])

    @property
    def rank(self) -> int:
        return int(self.U.shape[2])

    @property
    def matrix(self) -> torch.Tensor:
        """``(B, n_out, n_in)`` the map W = U diag(s) Vᵀ (= Σ_yx for whitened inputs)."""
        return (self.U * self.strengths.unsqueeze(-2)) @ self.V.transpose(-1, -2)

    def mode_strengths(self, w: torch.Tensor) -> torch.Tensor:
        """``(..., B, r)`` strengths u_αᵀ W v_α of any ``(..., B, n_out, n_in)`` matrices along the modes."""
        return torch.einsum("bor,...boi,bir->...br", self.U, w, self.V)

    def outputs(
        self, x: torch.Tensor, noise_std: float = 0.0, seed: Seed | None = None
    ) -> torch.Tensor:
        """Targets ``y = W x + ε`` for inputs ``x`` of shape ``(B, P, n_in)``; returns ``(B, P, n_out)``.

        ε has i.i.d. N(0, noise_std²) entries (drawn from ``seed`` when noise_std > 0).
        """
        y = x @ self.matrix.transpose(-1, -2)
        if noise_std > 0:
            g = make_generator(0 if seed is None else seed)
            y = y + noise_std * torch.randn(y.shape, generator=g, dtype=y.dtype)
        return y


def make_linear_task(
    strengths: object,
    n_in: int | None = None,
    n_out: int | None = None,
    *,
    n_tasks: int = 1,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
) -> LinearTask:
    """Linear-regression tasks with a fixed spectrum and Haar-random singular vectors.

    ``W_b = U_b diag(s) V_bᵀ`` with U_b (n_out × r) and V_b (n_in × r) drawn independently for
    each of the ``n_tasks`` tasks; ``r = len(strengths)``; n_in and n_out default to r.
    """
    s = checks.strengths(strengths, allow_zero=True)
    r = s.size
    n_in = r if n_in is None else checks.count(n_in, "n_in")
    n_out = r if n_out is None else checks.count(n_out, "n_out")
    if r > min(n_in, n_out):
        raise QKDissectError(
            f"make_linear_task: {r} modes need n_in and n_out >= {r}, got n_in={n_in}, n_out={n_out}. "
            "Give fewer strengths or larger dimensions."
        )
    n_tasks = checks.count(n_tasks, "n_tasks")
    g = make_generator(seed)
    u = random_orthogonal(n_out, r, batch=n_tasks, seed=g, dtype=dtype)
    v = random_orthogonal(n_in, r, batch=n_tasks, seed=g, dtype=dtype)
    st = torch.as_tensor(s, dtype=dtype).expand(n_tasks, r).clone()
    return LinearTask(U=u, strengths=st, V=v)


def sample_inputs(
    n_tasks: int, n_samples: int, n_in: int, *, seed: Seed = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Gaussian inputs x ~ N(0, I), shape ``(n_tasks, n_samples, n_in)``."""
    g = make_generator(seed)
    return torch.randn(n_tasks, n_samples, n_in, generator=g, dtype=dtype)


@dataclass(frozen=True)
class NoisyTeacher:
    """Training correlation of a low-rank teacher seen through noise: ``Σ̂ = W̄ + Z``.

    With P = N_i orthonormal training inputs and outputs y = W̄x + noise, the student sees
    Σ̂ = Σ_μ y_μ x_μᵀ = W̄ + Z with Z of i.i.d. entries of variance 1/N_i.

    Attributes:
        teacher: the batch of teachers W̄ (``LinearTask``, B = number of seeds).
        noise: ``(B, N_o, N_i)`` the matrix Z.
    """

    teacher: LinearTask
    noise: torch.Tensor

    @property
    def sigma_hat(self) -> torch.Tensor:
        """``(B, N_o, N_i)`` Σ̂ = W̄ + Z."""
        return self.teacher.matrix + self.noise

    @property
    def aspect_ratio(self) -> float:
        """A = N_o / N_i."""
        return self.teacher.n_out / self.teacher.n_in


def make_noisy_teacher(
    n_in: int,
    n_out: int,
    strengths: object,
    *,
    n_seeds: int = 1,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
) -> NoisyTeacher:
    """Draw ``n_seeds`` teachers W̄ = Σ s̄_α ū_α v̄_αᵀ (Haar vectors) and noises Z ~ N(0, 1/N_i)."""
    g = make_generator(seed)
    teacher = make_linear_task(strengths, n_in, n_out, n_tasks=n_seeds, seed=g, dtype=dtype)
    z = torch.randn(teacher.n_tasks, n_out, n_in, generator=g, dtype=dtype) / np.sqrt(n_in)
    return NoisyTeacher(teacher=teacher, noise=z)


@dataclass(frozen=True)
class TransferPair:
    """Two rank-1 noisy teachers sharing the input space, for joint training (transfer).

    Source W̄_S = s̄_S ū_S v̄_Sᵀ (N_oS × N_i) and target W̄_T = s̄_T ū_T v̄_Tᵀ (N_oT × N_i) with
    input-feature alignment v̄_S·v̄_T = ``alignment``; their output spaces are disjoint. A network
    with a shared first layer and one head per task, trained on both, is a single linear network
    trained on the stacked correlation ``[Σ̂_S; Σ̂_T]`` (target rows last).
    """

    source: NoisyTeacher
    target: NoisyTeacher
    alignment: float

    @property
    def stacked_sigma_hat(self) -> torch.Tensor:
        """``(B, N_oS + N_oT, N_i)`` the joint training correlation (source rows first)."""
        return torch.cat([self.source.sigma_hat, self.target.sigma_hat], dim=-2)

    @property
    def stacked_teacher(self) -> torch.Tensor:
        """``(B, N_oS + N_oT, N_i)`` the joint teacher [W̄_S; W̄_T]."""
        return torch.cat([self.source.teacher.matrix, self.target.teacher.matrix], dim=-2)


def make_transfer_pair(
    n_in: int,
    n_out_source: int,
    n_out_target: int,
    snr_source: float,
    snr_target: float,
    alignment: float,
    *,
    n_seeds: int = 1,
    seed: Seed = 0,
    dtype: torch.dtype = torch.float64,
) -> TransferPair:
    """A source/target pair of rank-1 teachers with ``v̄_S·v̄_T = alignment`` plus independent noise.

    The SNRs are the teacher strengths s̄_S, s̄_T (noise entries have variance 1/N_i).
    v̄_T = q v̄_S + √(1 − q²) v_⊥ with v_⊥ a random unit vector orthogonal to v̄_S.
    """
    q = checks.unit_interval(alignment, "alignment")
    s_s = checks.positive(snr_source, "snr_source")
    s_t = checks.positive(snr_target, "snr_target")
    n_in = checks.count(n_in, "n_in", minimum=2)
    g = make_generator(seed)
    b = checks.count(n_seeds, "n_seeds")
    v2 = random_orthogonal(n_in, 2, batch=b, seed=g, dtype=dtype)
    v_s = v2[..., :1]
    v_t = q * v_s + np.sqrt(max(0.0, 1.0 - q * q)) * v2[..., 1:]
    u_s = random_orthogonal(n_out_source, 1, batch=b, seed=g, dtype=dtype)
    u_t = random_orthogonal(n_out_target, 1, batch=b, seed=g, dtype=dtype)
    z_s = torch.randn(b, n_out_source, n_in, generator=g, dtype=dtype) / np.sqrt(n_in)
    z_t = torch.randn(b, n_out_target, n_in, generator=g, dtype=dtype) / np.sqrt(n_in)
    src = LinearTask(U=u_s, strengths=torch.full((b, 1), s_s, dtype=dtype), V=v_s)
    tgt = LinearTask(U=u_t, strengths=torch.full((b, 1), s_t, dtype=dtype), V=v_t)
    return TransferPair(
        source=NoisyTeacher(teacher=src, noise=z_s),
        target=NoisyTeacher(teacher=tgt, noise=z_t),
        alignment=q,
    )
