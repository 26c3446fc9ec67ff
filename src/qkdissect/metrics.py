"""Similarity statistics of query-key modes and their Gaussian null.

For a head with M = W_qᵀ W_k = U diag(S) Vᵀ (U, V: d_model × r, orthonormal columns):

* per-mode cosine        cos_k = u_k · v_k
* weighted cosine        C_h = Σ_k σ_k cos_k / Σ_k σ_k  =  tr(M) / ‖M‖_*
* symmetric fraction     ‖M_s‖_F² / ‖M‖_F²  with M_s = (M + Mᵀ)/2, = (‖M‖_F² + tr(M²)) / (2‖M‖_F²)

C_h = +1 when W_k = W_q (M positive semi-definite: tokens attend to similar tokens), −1 when
W_k = −W_q. The null is computed by sampling heads whose W_q, W_k (d_head × d_model) are
i.i.d. Gaussian — the model's exact shapes — not from a formula; by default with an exact sampler
of that distribution that costs O(d_head³) per head and never forms a d_model-sized matrix
(:func:`_haar_from`), and cached per (shape, samples, seed, percentile) in the user cache
(:mod:`qkdissect.cache`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.factored import factored_svd
from qkdissect.parallel import thread_map, worker_count

if TYPE_CHECKING:
    from jaxtyping import Bool, Float

__all__ = [
    "UNDEFINED_RTOL",
    "NullReference",
    "defined_modes",
    "defined_weighted_cosine",
    "gaussian_null",
    "layer_statistics",
    "mode_cosines",
    "symmetric_fraction",
    "undefined_tolerance",
    "weighted_cosine",
]

UNDEFINED_RTOL = 1e-6


def undefined_tolerance(dtype: torch.dtype, d_model: int) -> float:
    """ε of the rule "mode k is undefined when σ_k ≤ ε·σ_1": ε = max(1e-6, d_model · machine ε of ``dtype``)
    (NumPy's matrix-rank rule, at least 1e-6): float64 and d_model 768 give 1e-6, float32 9.2e-5."""
    return max(UNDEFINED_RTOL, d_model * torch.finfo(dtype).eps)


def defined_modes(S: Float[Tensor, "*batch r"], tol: float) -> Bool[Tensor, "*batch r"]:
    """(..., r) bool: σ_k > tol·σ_1. Below that u_k, v_k are arbitrary (any basis of the null space), so the
    mode has no cosine, no map and no place in statistics. σ_1 = 0 (a head of rank 0): no mode is defined."""
    return S > tol * S[..., :1]


def defined_weighted_cosine(S: Float[Tensor, "*batch r"], cosines: Float[Tensor, "*batch r"],
                            defined: Bool[Tensor, "*batch r"]) -> Float[Tensor, "*batch"]:
    """C = Σ_k σ_k cos_k / Σ_k σ_k over the defined modes only: (..., r) -> (...); NaN where none is defined."""
    weights = torch.where(defined, S, torch.zeros((), dtype=S.dtype))
    total = weights.sum(dim=-1)
    numerator = (weights * torch.where(defined, cosines, torch.zeros((), dtype=cosines.dtype))).sum(dim=-1)
    return torch.where(total > 0, numerator / total.clamp_min(torch.finfo(S.dtype).tiny),
                       torch.full_like(total, float("nan")))


def mode_cosines(U: Float[Tensor, "*batch d_model r"], V: Float[Tensor, "*batch d_model r"]) -> Float[Tensor, "*batch r"]:
    """cos_k = u_k·v_k. U, V: (..., d_model, r) -> (..., r)."""
    return (U * V).sum(dim=-2)


def weighted_cosine(S: Float[Tensor, "*batch r"], cosines: Float[Tensor, "*batch r"]) -> Float[Tensor, "*batch"]:
    """C = Σ_k σ_k cos_k / Σ_k σ_k. S, cosines: (..., r) -> (...); 0 for an all-zero head."""
    total = S.sum(dim=-1)
    return torch.where(total > 0, (S * cosines).sum(dim=-1) / total.clamp_min(torch.finfo(S.dtype).tiny), 0.0)


def symmetric_fraction(U: Float[Tensor, "*batch d_model r"], S: Float[Tensor, "*batch r"],
                       V: Float[Tensor, "*batch d_model r"]) -> Float[Tensor, "*batch"]:
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
    method: str = "dense"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["description"] = ("heads with i.i.d. Gaussian W_q, W_k of the model's shapes; central percentile "
                               "band; 'factored' samples their QR factors exactly instead of the matrices, 'haar' the "
                               "singular values of the r×r core and the cosines as the diagonal of a Haar frame's top "
                               "block (same distribution)")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NullReference":
        return cls(
            d_model=int(data["d_model"]), d_head=int(data["d_head"]), n_samples=int(data["n_samples"]),
            seed=int(data["seed"]), percentile=float(data["percentile"]),
            cosine_band=tuple(float(v) for v in data["cosine_band"]),
            weighted_band=tuple(float(v) for v in data["weighted_band"]),
            weighted_mean=float(data["weighted_mean"]), weighted_std=float(data["weighted_std"]),
            method=str(data.get("method", "dense")),
        )


def _draw_dense(d_model: int, d_head: int, n: int, rng) -> tuple[np.ndarray, ...]:
    return rng.standard_normal((n, d_head, d_model)), rng.standard_normal((n, d_head, d_model))


def _dense_from(d_model: int, d_head: int, draws: tuple[np.ndarray, ...]) -> tuple[Tensor, Tensor]:
    """Literal sampler: W_q, W_k (n, d_head, d_model) i.i.d. N(0, 1) -> factored SVD. (S, cos), (n, r)."""
    W_q, W_k = (torch.from_numpy(x) for x in draws)
    U, S, V = factored_svd(W_q, W_k)
    return S, mode_cosines(U, V)


def _bartlett(rng, n: int, size: int, df: int, upper: bool) -> np.ndarray:
    """n triangular size×size matrices T with T_ii = √χ²(df − i) and N(0, 1) entries off the diagonal
    (upper: the R of a QR of a Gaussian df×size matrix; lower: the Cholesky factor of a Wishart(df))."""
    T = rng.standard_normal((n, size, size))
    T = np.triu(T, 1) if upper else np.tril(T, -1)
    diagonal = np.sqrt(rng.chisquare(df - np.arange(size), size=(n, size)))
    T[:, np.arange(size), np.arange(size)] = diagonal
    return T


def _draw_factored(d_model: int, d_head: int, n: int, rng) -> tuple[np.ndarray, ...]:
    return (_bartlett(rng, n, d_head, d_model, upper=True), _bartlett(rng, n, d_head, d_model, upper=True),
            rng.standard_normal((n, d_head, d_head)), _bartlett(rng, n, d_head, d_model - d_head, upper=False))


def _factored_from(d_model: int, d_head: int, draws: tuple[np.ndarray, ...]) -> tuple[Tensor, Tensor]:
    """Exact sampler of the same distribution in O(d_head³) per head, independent of d_model.

    For W_qᵀ = Q_q R_q, W_kᵀ = Q_k R_k with Gaussian W: Q and R are independent, R is Bartlett
    distributed and Q is a Haar frame. By rotation invariance Q_q = [I; 0], so cos_k = a_kᵀ C b_k
    with R_q R_kᵀ = A diag(S) Bᵀ and C the top d_head rows of a Haar frame, C = G_top (GᵀG)^{-1/2}
    with G = [G_top; G_bot] Gaussian and G_botᵀG_bot ~ Wishart(d_model − d_head) (Bartlett again).
    Needs d_model ≥ 2·d_head.
    """
    R_q, R_k, G_top, L = (torch.from_numpy(x) for x in draws)
    gram = G_top.transpose(-1, -2) @ G_top + L @ L.transpose(-1, -2)
    eigenvalues, E = torch.linalg.eigh(gram)
    C = G_top @ (E * eigenvalues.rsqrt().unsqueeze(-2)) @ E.transpose(-1, -2)
    A, S, B_t = torch.linalg.svd(R_q @ R_k.transpose(-1, -2))
    cos = ((A.transpose(-1, -2) @ C) * B_t).sum(-1)  # (Aᵀ C B)_kk
    return S, cos


def _draw_haar(d_model: int, d_head: int, n: int, rng) -> tuple[np.ndarray, ...]:
    rest = d_model - d_head
    R_q = _bartlett(rng, n, d_head, d_model, upper=True)
    R_k = _bartlett(rng, n, d_head, d_model, upper=True)
    G_top = rng.standard_normal((n, d_head, d_head))
    if rest >= d_head:
        L = _bartlett(rng, n, d_head, rest, upper=False)
    else:  # a rank-deficient Wishart matrix: draw its Gaussian factor directly
        L = rng.standard_normal((n, d_head, rest))
    return R_q, R_k, G_top, L


def _haar_from(d_model: int, d_head: int, draws: tuple[np.ndarray, ...]) -> tuple[Tensor, Tensor]:
    """Exact sampler of the same distribution with no SVD, eigendecomposition or d_model-sized matrix.

    In :func:`_factored_from`, cos = diag(Aᵀ C B) with C = Q_qᵀ Q_k independent of (A, S, B) (Q and R of a
    Gaussian matrix are independent). C is bi-orthogonally invariant (C ~ O₁ C O₂ for fixed orthogonal O₁, O₂,
    because Q_q, Q_k are Haar), so Aᵀ C B has the distribution of C itself: the cosines are the diagonal of C,
    independent of S. With Q_q = [I; 0] and Q_k = G R⁻¹ (G Gaussian d_model × d_head, R the Cholesky factor of
    GᵀG = G_topᵀG_top + G_botᵀG_bot, G_botᵀG_bot ~ Wishart(d_model − d_head) drawn as Bartlett factors):

        cos_k = (G_top R⁻¹)_kk,     S = singular values of R_q R_kᵀ = √eig(P Pᵀ), P = R_q R_kᵀ

    Per head: three d_head³ products, one Cholesky factor, one triangular inverse and one symmetric eigenvalue
    problem (values only). Needs d_model ≥ d_head.
    """
    R_q, R_k, G_top, L = (torch.from_numpy(x) for x in draws)
    P = R_q @ R_k.transpose(-1, -2)
    S = torch.linalg.eigvalsh(P @ P.transpose(-1, -2)).clamp_min(0).sqrt().flip(-1)  # descending
    R = torch.linalg.cholesky(G_top.transpose(-1, -2) @ G_top + L @ L.transpose(-1, -2), upper=True)
    identity = torch.eye(d_head, dtype=R.dtype).expand_as(R)
    R_inv = torch.linalg.solve_triangular(R, identity, upper=True)
    cos = (G_top * R_inv.transpose(-1, -2)).sum(-1)  # (G_top R⁻¹)_kk
    return S, cos


# name -> (draw: the random numbers of one chunk, in a fixed order from the one generator; compute: (S, cos) from them)
SAMPLERS = {"dense": (_draw_dense, _dense_from), "factored": (_draw_factored, _factored_from),
            "haar": (_draw_haar, _haar_from)}


def _null_dense(d_model: int, d_head: int, n: int, rng) -> tuple[Tensor, Tensor]:
    """(S, cos) of ``n`` Gaussian heads decomposed (see :func:`_dense_from`)."""
    return _dense_from(d_model, d_head, _draw_dense(d_model, d_head, n, rng))


def _null_factored(d_model: int, d_head: int, n: int, rng) -> tuple[Tensor, Tensor]:
    """(S, cos) of ``n`` heads from their QR factors (see :func:`_factored_from`)."""
    return _factored_from(d_model, d_head, _draw_factored(d_model, d_head, n, rng))


def _null_haar(d_model: int, d_head: int, n: int, rng) -> tuple[Tensor, Tensor]:
    """(S, cos) of ``n`` heads with no SVD (see :func:`_haar_from`)."""
    return _haar_from(d_model, d_head, _draw_haar(d_model, d_head, n, rng))


NULL_SAMPLER_VERSION = 2  # bump whenever a sampler's output for a given seed changes (invalidates the cache)


def gaussian_null(
    d_model: int, d_head: int, *, n_samples: int = 1000, percentile: float = 99.0, seed: int = 0,
    method: str = "auto", chunk: int = 256, cache: bool | None = None,
) -> NullReference:
    """Sample ``n_samples`` heads with i.i.d. Gaussian W_q, W_k (d_head × d_model) and return the
    central ``percentile``% bands of per-mode and weighted cosines.

    method: "dense" draws the matrices and decomposes them; "factored" draws the exactly
    equally distributed QR factors directly (needs d_model ≥ 2·d_head); "haar" draws the
    singular values from the r × r core and the cosines as the diagonal of a Haar frame's top
    block (:func:`_null_haar`: no SVD at all, the fastest; needs d_model ≥ d_head); "auto" picks
    "haar" when d_model ≥ 2·d_head, else "dense". Deterministic for a given seed (float64).

    ``cache``: read / write the result in the user cache (:mod:`qkdissect.cache`; None: unless
    ``QKDISSECT_CACHE=0``). The result is a pure function of the arguments, so a cached band is
    the band this call would compute.
    """
    if not 0 < percentile < 100:
        raise QKDissectError(f"null percentile must be in (0, 100), got {percentile}.")
    if n_samples < 10:
        raise QKDissectError(f"the null needs at least 10 samples, got {n_samples}.")
    if method == "auto":
        method = "haar" if d_model >= 2 * d_head else "dense"
    if method not in SAMPLERS or (method == "factored" and d_model < 2 * d_head) or \
            (method == "haar" and d_model < d_head):
        raise QKDissectError(f"null method must be 'dense', 'auto', 'haar' (d_model ≥ d_head) or 'factored' "
                             f"(d_model ≥ 2·d_head), got {method!r}.")
    from qkdissect.cache import cached_json

    key = {"d_model": int(d_model), "d_head": int(d_head), "n_samples": int(n_samples), "seed": int(seed),
           "percentile": float(percentile), "method": method, "chunk": int(chunk), "version": NULL_SAMPLER_VERSION,
           "torch": torch.__version__.split("+")[0], "numpy": np.__version__}
    bands = cached_json("null", key, lambda: _null_bands(d_model, d_head, n_samples, percentile, seed, method, chunk),
                        use=cache)
    return NullReference(
        d_model=d_model, d_head=d_head, n_samples=n_samples, seed=seed, percentile=percentile,
        cosine_band=tuple(bands["cosine_band"]), weighted_band=tuple(bands["weighted_band"]),
        weighted_mean=float(bands["weighted_mean"]), weighted_std=float(bands["weighted_std"]), method=method,
    )


def _null_bands(d_model: int, d_head: int, n_samples: int, percentile: float, seed: int, method: str,
                chunk: int) -> dict[str, Any]:
    draw, compute = SAMPLERS[method]
    rng = np.random.default_rng(seed)
    starts = range(0, n_samples, chunk)
    draws = (draw(d_model, d_head, min(chunk, n_samples - start), rng) for start in starts)  # in order, lazily

    def bands_of(chunk_draws: tuple[np.ndarray, ...]) -> tuple[Tensor, Tensor]:
        S, cos = compute(d_model, d_head, chunk_draws)
        return cos.flatten(), weighted_cosine(S, cos)

    parts = thread_map(bands_of, draws, worker_count(len(starts)))  # chunks' linear algebra in parallel threads
    cosines, weighted = torch.cat([cos for cos, _ in parts]), torch.cat([w for _, w in parts])
    tail = (100.0 - percentile) / 200.0
    qs = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    return {"cosine_band": torch.quantile(cosines, qs).tolist(), "weighted_band": torch.quantile(weighted, qs).tolist(),
            "weighted_mean": float(weighted.mean()), "weighted_std": float(weighted.std())}


def layer_statistics(weighted: Tensor, cosines: Tensor, symmetric: Tensor, null: NullReference) -> dict[str, Any]:
    """Statistics of one layer: ``weighted`` C_h (heads,), ``cosines`` (heads, r), ``symmetric`` (heads,), NaN marking
    heads of rank 0 and undefined modes, which are left out (of numerators and denominators alike).

    mean / std (unbiased) / min / max of C_h, shares of heads above / below the null band of C_h, shares of modes
    above / below the per-mode null band, mean symmetric fraction; NaN where nothing is defined.
    """
    lo, hi = null.weighted_band
    c_lo, c_hi = null.cosine_band
    w = weighted.double()
    w = w[~torch.isnan(w)]
    cos = cosines.double()
    cos = cos[~torch.isnan(cos)]
    sym = symmetric.double()
    sym = sym[~torch.isnan(sym)]
    nan = float("nan")

    def share(mask: Tensor) -> float:
        return float(mask.double().mean()) if mask.numel() else nan

    return {
        "mean_weighted_cosine": float(w.mean()) if w.numel() else nan,
        "std_weighted_cosine": (float(w.std()) if w.numel() > 1 else 0.0) if w.numel() else nan,
        "min_weighted_cosine": float(w.min()) if w.numel() else nan,
        "max_weighted_cosine": float(w.max()) if w.numel() else nan,
        "share_heads_above_null": share(w > hi),
        "share_heads_below_null": share(w < lo),
        "share_modes_above_null": share(cos > c_hi),
        "share_modes_below_null": share(cos < c_lo),
        "mean_symmetric_fraction": float(sym.mean()) if sym.numel() else nan,
        "n_rank0_heads": int(weighted.numel() - w.numel()),
        "n_undefined_modes": int(cosines.numel() - cos.numel()),
    }
