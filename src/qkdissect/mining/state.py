"""The state of a mining run: exact streaming top-k per (layer, head, mode, sign), running
statistics, and their checkpoint file.

Shapes (L = mined layers, H = heads, r = modes per head, 2 = signs (+, −), k = top-k,
m = modes whose maps are kept, P = patch tokens):

    scores     (L, H, r, 2, k) float32   score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p'); −inf = empty slot
    image      (L, H, r, 2, k) int64     index into the sorted image list; −1 = empty slot
    query_pos  (L, H, r, 2, k) int32     patch (row-major) where ±q peaks; −1 = empty
    key_pos    (L, H, r, 2, k) int32     patch where ±k peaks
    maps       (L, H, m, 2, k, 2, P) float16 or None   raw (q, k) maps of the kept images (sign + values)

Order within the k slots: score descending, ties broken by the smaller image index. Merging
is therefore exact and associative: any split of the images into batches or shards, merged in
any grouping, gives the same state as one pass.

The sums of the running statistics are exact too: each image's sum over its patch tokens
(float64) is rounded to a multiple of 2⁻²⁴ and accumulated as a 96-bit fixed-point integer held
in two int64 limbs (hi, lo), so adding images, batches or whole shards in any order, on any
number of processes, gives the same bits (:func:`to_fixed`, :func:`fixed_to_float`). The
rounding (≤ 2⁻²⁵ per image) is far below float32 resolution of the values summed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write

__all__ = ["FIXED_BITS", "RunningStats", "TopK", "empty_state", "fixed_sum", "fixed_to_float", "load_checkpoint",
           "merge_stats", "merge_topk", "save_checkpoint", "checkpoint_meta", "stats_summary", "to_fixed"]

CHECKPOINT_FORMAT = "qkdissect-mining-checkpoint"
FIXED_BITS = 24  # fraction bits of the fixed-point sums
_LIMB = 32
_MASK = (1 << _LIMB) - 1
FIXED_LIMIT = 2.0 ** (62 - FIXED_BITS)  # |per-image sum| below this


def to_fixed(values: Tensor) -> Tensor:
    """float values (...,) -> exact fixed-point (..., 2) int64 limbs (hi, lo), value = (hi·2³² + lo)·2⁻²⁴,
    0 ≤ lo < 2³². QKDissectError for values that are not finite or beyond ±2³⁸ (an overflow upstream)."""
    values = values.double()
    if not bool(torch.isfinite(values).all()) or bool((values.abs() >= FIXED_LIMIT).any()):
        raise QKDissectError("mode projections are not finite or overflow (values beyond 2^38): the model's "
                             "activations are out of range (with --amp fp16, use --amp bf16 or float32).")
    n = torch.round(values * 2.0**FIXED_BITS).to(torch.int64)
    return torch.stack([torch.bitwise_right_shift(n, _LIMB), torch.bitwise_and(n, _MASK)], dim=-1)


def _normalise(limbs: Tensor) -> Tensor:
    hi, lo = limbs[..., 0], limbs[..., 1]
    carry = torch.bitwise_right_shift(lo, _LIMB)
    return torch.stack([hi + carry, torch.bitwise_and(lo, _MASK)], dim=-1)


def fixed_sum(limbs: Tensor, dim: int) -> Tensor:
    """Exact sum of fixed-point numbers (..., 2) over ``dim`` (not the limb axis); normalised limbs. Exact for
    up to 2³⁰ terms per call (lo limbs < 2³² each)."""
    return _normalise(limbs.sum(dim=dim))


def fixed_to_float(limbs: Tensor) -> Tensor:
    """Fixed-point (..., 2) int64 -> float64 (...,): one rounding of the exact value."""
    return limbs[..., 0].double() * 2.0 ** (_LIMB - FIXED_BITS) + limbs[..., 1].double() * 2.0**-FIXED_BITS


@dataclass(frozen=True)
class TopK:
    """Top-k slots; candidates of a batch use the same layout with k = batch size."""

    scores: Tensor
    image: Tensor
    query_pos: Tensor
    key_pos: Tensor
    maps: Tensor | None = None

    @property
    def k(self) -> int:
        return self.scores.shape[-1]

    def to(self, device: Any) -> "TopK":
        return TopK(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                       for f in fields(self)})


@dataclass(frozen=True)
class RunningStats:
    """Sums over every patch token of every image: index 0 of axis 1 is q, 1 is k.

    total Σ value and squares Σ value²: (L, 2, H, r, 2) int64 fixed-point limbs while mining (exact, see
    the module docstring), (L, 2, H, r) float64 as read from a finished mining folder; maximum / minimum
    (L, 2, H, r) float32; tokens, images: int64 scalars.
    """

    total: Tensor
    squares: Tensor
    maximum: Tensor
    minimum: Tensor
    tokens: Tensor
    images: Tensor

    def to(self, device: Any) -> "RunningStats":
        return RunningStats(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def empty_state(n_layers: int, n_heads: int, rank: int, k: int, n_maps: int, n_patches: int,
                device: Any = "cpu") -> tuple[TopK, RunningStats]:
    """An empty top-k (all slots −inf / −1) and zero statistics."""
    shape = (n_layers, n_heads, rank, 2, k)
    topk = TopK(
        scores=torch.full(shape, float("-inf"), dtype=torch.float32, device=device),
        image=torch.full(shape, -1, dtype=torch.int64, device=device),
        query_pos=torch.full(shape, -1, dtype=torch.int32, device=device),
        key_pos=torch.full(shape, -1, dtype=torch.int32, device=device),
        maps=(torch.zeros(n_layers, n_heads, n_maps, 2, k, 2, n_patches, dtype=torch.float16, device=device)
              if n_maps else None))
    stat_shape = (n_layers, 2, n_heads, rank)
    stats = RunningStats(
        total=torch.zeros(*stat_shape, 2, dtype=torch.int64, device=device),
        squares=torch.zeros(*stat_shape, 2, dtype=torch.int64, device=device),
        maximum=torch.full(stat_shape, float("-inf"), dtype=torch.float32, device=device),
        minimum=torch.full(stat_shape, float("inf"), dtype=torch.float32, device=device),
        tokens=torch.zeros((), dtype=torch.int64, device=device),
        images=torch.zeros((), dtype=torch.int64, device=device))
    return topk, stats


def merge_topk(state: TopK, candidates: TopK, map_modes: Tensor | None = None) -> TopK:
    """Exact top-k of the union of ``state`` and ``candidates`` (same layout, any k).

    Vectorised over (L, H, r, 2): concatenate along the slot axis, sort stably by image index,
    then stably by score (descending), keep the first k. ``map_modes`` (m,) are the modes whose
    maps are carried along (needed when both hold maps).
    """
    k = state.k
    scores = torch.cat([state.scores, candidates.scores], dim=-1)
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    image = torch.cat([state.image, candidates.image.expand_as(candidates.scores)], dim=-1)
    by_index = torch.argsort(image, dim=-1, stable=True)
    by_score = torch.argsort(torch.gather(scores, -1, by_index), dim=-1, descending=True, stable=True)[..., :k]
    order = torch.gather(by_index, -1, by_score)  # (L, H, r, 2, k) positions in the concatenation

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.gather(torch.cat([a, b.expand(*a.shape[:-1], b.shape[-1])], dim=-1), -1, order)

    maps = None
    if state.maps is not None and candidates.maps is not None:
        if map_modes is None:
            raise QKDissectError("merge_topk needs map_modes when the states carry maps.")
        map_order = order[:, :, map_modes.to(order.device)]  # (L, H, m, 2, k)
        joined = torch.cat([state.maps, candidates.maps.expand(*state.maps.shape[:4], -1, *state.maps.shape[5:])],
                           dim=4)
        index = map_order[..., None, None].expand(*map_order.shape, *joined.shape[5:])
        maps = torch.gather(joined, 4, index)
    return TopK(scores=torch.gather(scores, -1, order), image=torch.gather(image, -1, order),
                query_pos=pick(state.query_pos, candidates.query_pos), key_pos=pick(state.key_pos, candidates.key_pos),
                maps=maps)


def merge_stats(a: RunningStats, b: RunningStats) -> RunningStats:
    """Statistics of the union (exact fixed-point sums add, extrema combine): associative and commutative."""
    if a.total.dtype != torch.int64 or b.total.dtype != torch.int64:
        raise QKDissectError("internal: merge_stats needs the fixed-point sums of a running state.")
    return RunningStats(total=_normalise(a.total + b.total), squares=_normalise(a.squares + b.squares),
                        maximum=torch.maximum(a.maximum, b.maximum), minimum=torch.minimum(a.minimum, b.minimum),
                        tokens=a.tokens + b.tokens, images=a.images + b.images)


def stats_summary(stats: RunningStats) -> dict[str, Tensor]:
    """Per (L, H, r): q_mean, q_std, k_mean, k_std, q_max, q_min, k_max, k_min over all patch tokens."""
    n = stats.tokens.double().clamp_min(1)
    total, squares = (fixed_to_float(t) if t.dtype == torch.int64 else t.double() for t in (stats.total, stats.squares))
    mean = total / n
    std = (squares / n - mean * mean).clamp_min(0).sqrt()
    out = {}
    for index, side in enumerate("qk"):
        out[f"{side}_mean"], out[f"{side}_std"] = mean[:, index], std[:, index]
        out[f"{side}_max"], out[f"{side}_min"] = stats.maximum[:, index], stats.minimum[:, index]
    return out


def state_tensors(topk: TopK, stats: RunningStats, *, exact: bool = True) -> dict[str, Tensor]:
    """Flat name → tensor dict (CPU, contiguous) for safetensors. ``exact``: keep the fixed-point sums (a
    checkpoint); else write them as float64 (L, 2, H, r) (the documented mined.safetensors layout)."""
    tensors = {f"topk.{f.name}": getattr(topk, f.name) for f in fields(topk) if getattr(topk, f.name) is not None}
    tensors.update({f"stats.{f.name}": getattr(stats, f.name) for f in fields(stats)})
    if not exact:
        for name in ("stats.total", "stats.squares"):
            if tensors[name].dtype == torch.int64:
                tensors[name] = fixed_to_float(tensors[name])
    return {name: value.detach().cpu().contiguous() for name, value in tensors.items()}


def state_from_tensors(tensors: dict[str, Tensor]) -> tuple[TopK, RunningStats]:
    """Inverse of :func:`state_tensors`."""
    try:
        topk = TopK(**{f.name: tensors.get(f"topk.{f.name}") for f in fields(TopK)})
        stats = RunningStats(**{f.name: tensors[f"stats.{f.name}"] for f in fields(RunningStats)})
    except (KeyError, TypeError) as error:
        raise QKDissectError(f"mining state is incomplete (missing {error}).") from None
    if topk.scores is None or topk.image is None:
        raise QKDissectError("mining state is incomplete (no scores).")
    return topk, stats


def save_checkpoint(path: str | os.PathLike, topk: TopK, stats: RunningStats, meta: dict[str, Any]) -> Path:
    """One safetensors file (state + JSON metadata), written atomically."""
    from qkdissect.files import safetensors_bytes
    from qkdissect.testpoints import pause_point

    data = safetensors_bytes(state_tensors(topk, stats),
                             {"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta, default=str)})

    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        pause_point("checkpoint")  # tests kill the process here: the file is written but not yet in place

    return atomic_write(path, write)


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a qkdissect mining checkpoint")
        meta = json.loads(metadata["meta"])
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
        return meta
    except Exception as error:  # noqa: BLE001 — truncated / foreign file
        raise QKDissectError(f"checkpoint {path} is unreadable ({type(error).__name__}: {error}); delete the "
                             "checkpoint folder and start again without --resume.") from None


def load_checkpoint(path: str | os.PathLike) -> tuple[TopK, RunningStats, dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # noqa: BLE001 — truncated / foreign file
        raise QKDissectError(f"checkpoint {path} is unreadable ({type(error).__name__}); delete it and start "
                             "again without --resume.") from None
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise QKDissectError(f"{path} is not a qkdissect mining checkpoint.")
    topk, stats = state_from_tensors(tensors)
    return topk, stats, json.loads(metadata["meta"])
