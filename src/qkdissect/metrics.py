"""Similarity statistics of query-key modes and their Gaussian null.

For a head with M = W_qᵀ W_k = U diag(S) Vᵀ (U, V: d_model × r, orthonormal columns):

* per-mode cosine        cos_k = u_k · v_k
* weighted cosine        C_h = Σ_k σ_k cos_k / Σ_k σ_k  =  tr(M) / ‖M‖_*
* symmetric fraction     ‖M_s‖_F² / ‖M‖_F²  with M_s = (M + Mᵀ)/2, = (‖M‖_F² + tr(M²)) / (2‖M‖_F²)

C_h = +1 when W_k = W_q (M positive semi-definite: tokens attend to similar tokens), −1 when
W_k = −W_q. The null is computed by sampling heads whose W_q, W_k (d_head × d_model) are
i.i.d. Gaussian — the model's exact shapes — not from a formula.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "NullReference",
    "gaussian_null",
    "mode_cosines",
    "symmetric_fraction",
    "trace_over_nuclear",
    "weighted_cosine",
]


def mode_cosines(U: Tensor, V: Tensor) -> Tensor:
    """cos_k = u_k·v_k. U, V: (..., d_model, r) -> (..., r)."""
    return (U * V).sum(dim=-2)


def weighted_cosine(S: Tensor, cosines: Tensor) -> Tensor:
    """C = Σ_k σ_k cos_k / Σ_k σ_k. S, cosines: (..., r) -> (...); 0 for an all-zero head."""
    total = S.sum(dim=-1)
    return torch.where(total > 0, (S * cosines).sum(dim=-1) / total.clamp_min(torch.finfo(S.dtype).tiny), 0.0)


def trace_over_nuclear(W_q: Tensor, W_k: Tensor) -> Tensor:
    """tr(W_qᵀW_k) / ‖W_qᵀW_k‖_*, from the factors. W_q, W_k: (..., d_head, d_model) -> (...).

    tr(W_qᵀ W_k) = Σ W_q ⊙ W_k; the nuclear norm is the sum of singular values of the small
    core R_q R_kᵀ (W_qᵀ = Q_q R_q, W_kᵀ = Q_k R_k), which has the singular values of M.
    """
    _, R_q = torch.linalg.qr(W_q.transpose(-1, -2))
    _, R_k = torch.linalg.qr(W_k.transpose(-1, -2))
    nuclear = torch.linalg.svdvals(R_q @ R_k.transpose(-1, -2)).sum(dim=-1)
    return (W_q * W_k).sum(dim=(-1, -2)) / nuclear


def symmetric_fraction(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """‖M_s‖_F² / ‖M‖_F² for M = U diag(S) Vᵀ, from the factors: (..., d_model, r) -> (...).

    ‖M‖_F² = Σσ², tr(M²) = tr(diag(S) G diag(S) G) with G = VᵀU (r × r).
    """
    G = V.transpose(-1, -2) @ U
    SG = S.unsqueeze(-1) * G
    trace_m2 = (SG * SG.transpose(-1, -2)).sum(dim=(-1, -2))
    fro2 = (S * S).sum(dim=-1)
    return torch.where(fro2 > 0, (fro2 + trace_m2) / (2 * fro2.clamp_min(torch.finfo(S.dtype).tiny)), 0.5)


@dataclass(frozen=True)
class NullReference:
    """Central ``percentile``% bands of per-mode cosines and of weighted cosines of random heads.

    Heads with W_q, W_k i.i.d. N(0, 1) of shape (d_head, d_model); a mode or head is "above
    the null" when its statistic exceeds the band's upper end (one-sided rate (100−p)/2 %).
    """

    d_model: int
    d_head: int
    n_samples: int
    seed: int
    percentile: float
    cosine_band: tuple[float, float]
    weighted_band: tuple[float, float]
    weighted_mean: float
    weighted_std: float

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["method"] = "Gaussian W_q, W_k with the model's shapes; central percentile band"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NullReference":
        return cls(
            d_model=int(data["d_model"]), d_head=int(data["d_head"]), n_samples=int(data["n_samples"]),
            seed=int(data["seed"]), percentile=float(data["percentile"]),
            cosine_band=tuple(float(v) for v in data["cosine_band"]),
            weighted_band=tuple(float(v) for v in data["weighted_band"]),
            weighted_mean=float(data["weighted_mean"]), weighted_std=float(data["weighted_std"]),
        )


def gaussian_null(
    d_model: int, d_head: int, *, n_samples: int = 1000, percentile: float = 99.0, seed: int = 0,
    chunk: int = 256,
) -> NullReference:
    """Sample ``n_samples`` Gaussian heads and return the central ``percentile``% bands.

    Deterministic for a given seed (CPU generator, float64).
    """
    from qkdissect.decomposition import factored_svd

    if not 0 < percentile < 100:
        from qkdissect.errors import QKDissectError

        raise QKDissectError(f"null percentile must be in (0, 100), got {percentile}.")
    generator = torch.Generator().manual_seed(seed)
    cos_parts, weighted_parts = [], []
    for start in range(0, n_samples, chunk):
        size = min(chunk, n_samples - start)
        W_q = torch.randn(size, d_head, d_model, generator=generator, dtype=torch.float64)
        W_k = torch.randn(size, d_head, d_model, generator=generator, dtype=torch.float64)
        U, S, V = factored_svd(W_q, W_k)
        cos = mode_cosines(U, V)
        cos_parts.append(cos.flatten())
        weighted_parts.append(weighted_cosine(S, cos))
    cosines, weighted = torch.cat(cos_parts), torch.cat(weighted_parts)
    tail = (100.0 - percentile) / 200.0
    qs = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    cos_lo, cos_hi = torch.quantile(cosines, qs).tolist()
    w_lo, w_hi = torch.quantile(weighted, qs).tolist()
    return NullReference(
        d_model=d_model, d_head=d_head, n_samples=n_samples, seed=seed, percentile=percentile,
        cosine_band=(cos_lo, cos_hi), weighted_band=(w_lo, w_hi),
        weighted_mean=float(weighted.mean()), weighted_std=float(weighted.std()),
    )
