"""Rotary maths in complex head coordinates: offsets, offset averages, distance curves (a leaf).

A head vector a ∈ R^{d_head} is read as P_total complex coordinates: rotary pair f of the model's
layout becomes a_f = a_{f,0} + i a_{f,1}; the unrotated coordinates (partial rotary) are paired
consecutively after them (zero-padded to an even count) and never rotate. The model's rotation
of token t is multiplication by z_{t,f} = cos_{t,f} + i sin_{t,f} (1 for unrotated pairs), so

    q̃_i · k̃_j = Re Σ_f conj(q_{i,f}) k_{j,f} w_f(i, j),    w_f(i, j) = conj(z_{i,f}) z_{j,f}

— the relative rotation R(θ_j − θ_i) of pair f. With the atlas factors W_qᵀ = U G_q, W_kᵀ = V G_k
(G: r × d_head, complexified along d_head to g: r × P_total) the bilinear form at any w is

    M(w) = U K(w) Vᵀ,   K(w)_kl = Re Σ_f conj(g^q_{k,f}) w_f g^k_{l,f}     (r × r; K(1) = diag(S))

so every offset, every average over offsets and every distance bin costs one r × r SVD.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.factored import fix_signs
from qkdissect.forms.spec import RotaryTable

__all__ = [
    "core_at",
    "distance_average",
    "distance_edges",
    "expected_norm2",
    "modes_of_core",
    "offset_average",
    "offset_rotation",
    "pair_mean",
    "rotations",
    "second_moments",
    "to_complex",
]


def to_complex(a: Tensor, layout: str, rotary_dim: int) -> Tensor:
    """(..., d_head) real -> (..., P_total) complex: rotary pairs first, then the unrotated
    coordinates paired consecutively (one zero appended when their number is odd)."""
    P = rotary_dim // 2
    rotating = a[..., :rotary_dim]
    if layout == "interleaved":
        re, im = rotating[..., 0::2], rotating[..., 1::2]
    else:
        re, im = rotating[..., :P], rotating[..., P:]
    rest = a[..., rotary_dim:]
    if rest.shape[-1] % 2:
        rest = torch.nn.functional.pad(rest, (0, 1))
    re = torch.cat([re, rest[..., 0::2]], dim=-1)
    im = torch.cat([im, rest[..., 1::2]], dim=-1)
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return torch.complex(re.to(dtype), im.to(dtype))


def rotations(table: RotaryTable, n_tokens: int, d_head: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """z = cos + i·sin per token and complex coordinate, (G, N, P_total); unrotated pairs are 1."""
    cos, sin = table.rows(n_tokens)
    z = torch.complex(cos.to(dtype), sin.to(dtype))
    extra = (d_head - table.rotary_dim + 1) // 2
    if extra:
        z = torch.cat([z, torch.ones(*z.shape[:-1], extra, dtype=z.dtype, device=z.device)], dim=-1)
    return z


def pair_mean(u: Tensor, v: Tensor, pairs: str, weights: Tensor | None = None) -> Tensor:
    """Mean of conj(u_i) v_j over the (query i, key j) pairs that attend. u, v: (..., T, K) -> (..., K).

    pairs "all": every ordered pair, = conj(mean u) · mean v; "causal": j ≤ i, via a running sum.
    ``weights`` (T,) ∈ {0, 1} restricts the tokens (both sides).
    """
    if weights is not None:
        u = u * weights[:, None]
        v = v * weights[:, None]
        n = float(weights.sum())
    else:
        n = float(u.shape[-2])
    if pairs == "all":
        return u.sum(-2).conj() * v.sum(-2) / (n * n)
    if pairs == "causal":
        running = v.cumsum(dim=-2)
        if weights is not None:
            counts = weights.cumsum(0)
            total = float((weights * counts).sum())
        else:
            total = n * (n + 1) / 2
        return (u.conj() * running).sum(-2) / total
    raise QKDissectError(f"unknown pair set {pairs!r}.")


def offset_average(z: Tensor, pairs: str) -> Tensor:
    """E over attending pairs of w_f(i, j) = conj(z_i) z_j: (G, T, P) -> (G, P). For "all" pairs
    it is |mean_t z_t|² (real): the coherence of each rotary pair over the token layout."""
    return pair_mean(z, z, pairs)


def second_moments(z: Tensor, pairs: str) -> tuple[Tensor, Tensor]:
    """E[w_f w_g] and E[w_f conj(w_g)] over attending pairs, each (G, P, P)."""
    G, T, P = z.shape
    product = (z[..., :, None] * z[..., None, :]).reshape(G, T, P * P)
    mixed = (z[..., :, None] * z[..., None, :].conj()).reshape(G, T, P * P)
    return (pair_mean(product, product, pairs).reshape(G, P, P),
            pair_mean(mixed, mixed, pairs).reshape(G, P, P))


def core_at(g_q: Tensor, g_k: Tensor, w: Tensor) -> Tensor:
    """K(w)_kl = Re Σ_f conj(g_q[k, f]) w_f g_k[l, f].

    g_q, g_k: (H, r, P) complex; w: (G, ..., P) complex with G ∈ {1, H} -> (H, ..., r, r).
    """
    H = g_q.shape[0]
    w = w.expand(H, *w.shape[1:]) if w.shape[0] == 1 else w
    extra = w.shape[1:-1]
    w_flat = w.reshape(H, -1, w.shape[-1])
    core = torch.einsum("hkf,hdf,hlf->hdkl", g_q.conj(), w_flat.to(g_q.dtype), g_k).real
    return core.reshape(H, *extra, core.shape[-2], core.shape[-1])


def modes_of_core(U: Tensor, V: Tensor, core: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of U K Vᵀ from its r × r core: (U A, S, V B) with K = A diag(S) Bᵀ, signs fixed.

    U, V: (H, d, r); core: (H, r, r) -> U' (H, d, r), S (H, r), V' (H, d, r).
    """
    A, S, B_t = torch.linalg.svd(core)
    U_new, V_new = fix_signs(U @ A, V @ B_t.transpose(-1, -2))
    return U_new, S, V_new


def expected_norm2(g_q: Tensor, g_k: Tensor, moment_ww: Tensor, moment_wcw: Tensor) -> Tensor:
    """E ‖K(w)‖_F² from the second moments of w (see :func:`second_moments`): (H,).

    ‖Re Σ_f w_f a_f b_fᵀ‖² = ½ Re Σ_fg [w_f w_g (a_f·a_g)(b_f·b_g) + w_f w̄_g (a_f·ā_g)(b_f·b̄_g)],
    a_f = conj(g_q[:, f]), b_f = g_k[:, f].
    """
    a = g_q.conj()
    bil_a = torch.einsum("hkf,hkg->hfg", a, a)
    ses_a = torch.einsum("hkf,hkg->hfg", a, a.conj())
    bil_b = torch.einsum("hkf,hkg->hfg", g_k, g_k)
    ses_b = torch.einsum("hkf,hkg->hfg", g_k, g_k.conj())
    ww = moment_ww.to(a.dtype).expand(a.shape[0], -1, -1)
    wcw = moment_wcw.to(a.dtype).expand(a.shape[0], -1, -1)
    return 0.5 * (ww * bil_a * bil_b + wcw * ses_a * ses_b).sum(dim=(-1, -2)).real


def distance_edges(positions: Tensor) -> Tensor:
    """Bin edges over |Δ| for the distance curve: integer-rounded distances on a 2-D grid
    ([0, ½), [½, 1½), ...), roughly geometric bins on a 1-D sequence (0, 1, 2, 3, 4–5, 6–7, 8–11, ...)."""
    finite = positions[~torch.isnan(positions).any(dim=-1)]
    if finite.shape[0] < 2:
        raise QKDissectError("a distance curve needs at least two positioned tokens.")
    extent = float(torch.linalg.vector_norm(finite.max(0).values - finite.min(0).values))
    if positions.shape[-1] >= 2:
        top = int(math.floor(extent + 0.5))
        return torch.tensor([0.0] + [k + 0.5 for k in range(top + 1)], dtype=torch.float64)
    edges, power = {0.0, 1.0, 2.0, 3.0}, 4.0
    while power <= extent:
        edges.update((power, 1.5 * power))
        power *= 2
    edges = sorted(e for e in edges if e <= extent)
    return torch.tensor(edges + [extent + 1.0], dtype=torch.float64)


def lattice(table: RotaryTable) -> tuple[Tensor, tuple[int, ...]] | None:
    """(indices of the positioned tokens, grid shape) when they fill a full integer grid in row-major
    order (images: rows × cols; text: 0..T−1), else None."""
    index = torch.nonzero(table.rotated).flatten()
    pos = table.positions[index].double()
    if pos.numel() == 0 or not torch.equal(pos, pos.round()):
        pos = None
    if pos is None:
        return None
    low = pos.min(0).values
    shape = tuple(int(v) + 1 for v in (pos.max(0).values - low))
    if math.prod(shape) != len(index):
        return None
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1)
    return (index, shape) if torch.equal(pos - low, grid.reshape(-1, len(shape))) else None


def _correlation(zr: Tensor, shape: tuple[int, ...]) -> Tensor:
    """c(o) = Σ_i conj(z_i) z_{i+o} over grid positions i with i + o on the grid, every offset o at once:
    zr (G, T_r, P) -> (G, *(2n − 1 for n in shape), P), offsets ordered from −(n−1) to n−1 (FFT, exact to
    rounding)."""
    G, _, P = zr.shape
    grid = zr.reshape(G, *shape, P)
    dims = tuple(range(1, 1 + len(shape)))
    size = [2 * n - 1 for n in shape]
    spectrum = torch.fft.fftn(grid, s=size, dim=dims)
    corr = torch.fft.ifftn(spectrum.conj() * spectrum, dim=dims)  # circular index o mod size
    return torch.fft.fftshift(corr, dim=dims)  # index k ↔ offset k − (n − 1)


def distance_average(z: Tensor, table: RotaryTable, edges: Tensor, chunk: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of w(i, j) over the attending pairs of positioned tokens in each distance bin.

    z: (G, T, P) rotations of the table's tokens. Returns w_bins (G, D, P), pair counts (D,) and
    the mean distance of each bin (D,); empty bins are dropped. Tokens on a full grid (images,
    texts) sum every offset at once by a cross-correlation (FFT, O(T log T)); other layouts pair by pair.
    """
    found = lattice(table)
    D = len(edges) - 1
    if found is not None:
        index, shape = found
        axes = torch.meshgrid(*[torch.arange(-(n - 1), n, dtype=torch.float64) for n in shape], indexing="ij")
        offsets = torch.stack(axes, -1).reshape(-1, len(shape))  # (O, A), key − query
        counts_o = torch.stack([torch.tensor(float(n)) - o.abs() for n, o in zip(shape, offsets.T)], -1).prod(-1)
        if table.pairs == "causal":  # 1-D: keys at or before the query
            counts_o = torch.where(offsets[:, 0] <= 0, counts_o, 0.0) if len(shape) == 1 else None
        if counts_o is not None:
            distance = torch.linalg.vector_norm(offsets, dim=-1)
            bins = torch.bucketize(distance, edges.double(), right=True) - 1
            keep = (bins >= 0) & (bins < D) & (counts_o > 0)
            counts = torch.zeros(D, dtype=torch.float64).index_add_(0, bins[keep], counts_o[keep])
            dist_sum = torch.zeros(D, dtype=torch.float64).index_add_(0, bins[keep], (counts_o * distance)[keep])
            corr = _correlation(z[:, index], shape).reshape(z.shape[0], -1, z.shape[-1])  # (G, O, P)
            sums = torch.zeros(z.shape[0], D, z.shape[-1], dtype=z.dtype).index_add_(1, bins[keep], corr[:, keep])
            present = counts > 0
            return (sums[:, present] / counts[present][None, :, None], counts[present],
                    dist_sum[present] / counts[present])
    return pairwise_distance_average(z, table, edges, chunk)


def pairwise_distance_average(z: Tensor, table: RotaryTable, edges: Tensor, chunk: int = 8
                              ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`distance_average` pair by pair (any token layout)."""
    rotated = table.rotated
    index = torch.nonzero(rotated).flatten()
    pos = table.positions[index].double()
    distance = torch.cdist(pos, pos)  # (T_r, T_r)
    allowed = torch.ones_like(distance, dtype=torch.bool)
    if table.pairs == "causal":
        allowed = index[None, :] <= index[:, None]
    bins = torch.bucketize(distance, edges.double(), right=True) - 1
    bins = torch.where(allowed, bins, torch.full_like(bins, -1))
    D = len(edges) - 1
    flat = bins.flatten()
    keep = (flat >= 0) & (flat < D)
    counts = torch.bincount(flat[keep], minlength=D).double()
    dist_sum = torch.zeros(D, dtype=torch.float64).index_add_(0, flat[keep], distance.flatten()[keep])
    zr = z[:, index]  # (G, T_r, P)
    G, P = zr.shape[0], zr.shape[-1]
    sums = torch.zeros(G, D, P, dtype=zr.dtype)
    for start in range(0, G, chunk):
        part = zr[start:start + chunk]
        w = (part.conj()[:, :, None, :] * part[:, None, :, :]).reshape(part.shape[0], -1, P)
        sums[start:start + chunk].index_add_(1, flat[keep], w[:, keep])
    present = counts > 0
    return (sums[:, present] / counts[present][None, :, None], counts[present],
            dist_sum[present] / counts[present])


def offset_rotation(z: Tensor, table: RotaryTable, offset: tuple[float, ...], tol: float = 1e-6) -> tuple[Tensor, int]:
    """Mean of w(i, j) over attending positioned pairs with positions_j − positions_i = offset:
    (G, P) and the number of such pairs. Raises when no pair of the token layout has that offset."""
    rotated = table.rotated
    index = torch.nonzero(rotated).flatten()
    pos = table.positions[index].double()
    if len(offset) != pos.shape[-1]:
        raise QKDissectError(f"this model's positions have {pos.shape[-1]} coordinates; the offset needs "
                             f"{pos.shape[-1]} numbers, got {len(offset)}.")
    target = torch.tensor(offset, dtype=torch.float64)
    hit = ((pos[None, :, :] - pos[:, None, :] - target).abs() <= tol).all(dim=-1)
    if table.pairs == "causal":
        hit &= index[None, :] <= index[:, None]
    queries, keys = torch.nonzero(hit, as_tuple=True)
    if queries.numel() == 0:
        span = (pos.max(0).values - pos.min(0).values).tolist()
        raise QKDissectError(f"no pair of tokens sits at offset {tuple(offset)} (key − query) in this model's token "
                             f"layout (extent {span}" + (", keys never after the query" if table.pairs == "causal" else "")
                             + "); choose an offset inside the grid.")
    zr = z[:, index]
    w = zr[:, queries].conj() * zr[:, keys]
    return w.mean(dim=1), int(queries.numel())
