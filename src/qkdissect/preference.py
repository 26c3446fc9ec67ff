"""Attention preference between objects (spec §4): same object / other objects / background.

Protocol, per image, layer l, head h and query kind (target / distractor, see
:func:`qkdissect.oddoneout.query_maps`):

1. x̃ (B, N, d_model) is captured at the attention input (forward pre-hook, so fused/SDPA
   attention works); the attention row of the query token t is recomputed from the model's
   own parameters (``adapter.attention_layers()``), all heads at once:
       a_h = softmax_j( scale · (W_q x̃_t + b_q)·(W_k x̃_j + b_k) )                 "measured"
   and from the QK modes alone (atlas U, S, V, key_bias; terms constant in j cancel):
       a_h = softmax_j( scale · (Σ_{k<m} σ_k (u_k·x̃_t)(v_k·x̃_j) + key_bias·x̃_j) )  "modes" (all r) / "topM" (m = M)
2. Prefix tokens (CLS, distillation, registers; their number from the model) are dropped and
   the row renormalised over the P patch tokens: a_p ← a_p / Σ_p' a_p'. The dropped mass is
   kept as ``prefix`` (attention the query pays to prefix tokens).
3. With f_c(p) the area fraction of patch p in category c ∈ (same, other, background):
       raw_c    = Σ_p a_p f_c(p)                          (sums to 1 over c)
       area_c   = raw_c / (Σ_p f_c(p) / P)                (per unit area; 1 = uniform attention)
       noself_c = Σ_{p≠t} a_p f_c(p) / (1 − a_t)          (the query token's own attention removed)
4. Per layer: mean over heads; mean and percentile-bootstrap interval over images (resampling
   images, all heads and layers of an image together).

Output folder (:func:`save_preference`, read back by :func:`load_preference`)::

    OUT/preference.json         provenance (model, preprocessing, grid, data, protocol, versions),
                                counts (images listed/used, skipped by reason, problems by name),
                                agreement of "modes" with "measured", per-feature means of generated
                                data ("by_feature"), per-layer means and intervals
                                {layers: [{layer, QUERY: {SOURCE: {VARIANT: {CATEGORY: {mean, lo, hi}}},
                                prefix: {SOURCE: {mean, lo, hi}}}}]}, per-image query patches
    OUT/preference.safetensors  shares (n_images, L, H, Q, S, V, C) float32, NaN = query unavailable;
                                prefix (n_images, L, H, Q, S); layer_{mean,lo,hi} (L, Q, S, V, C);
                                head_{mean,lo,hi} (L, H, Q, S, V, C); prefix_layer_* (L, Q, S);
                                prefix_head_* (L, H, Q, S)   — axes named in preference.json "axes"
    OUT/preference_layers.csv   layer, query, source, variant, category, mean, lo, hi, n_images
                                (variant "prefix" / category "prefix": attention to prefix tokens)
    OUT/preference_heads.csv    the same with a head column (+ .parquet files when pyarrow exists)
    OUT/problems.csv            name, kind, detail of every skipped image or unmatched file
    OUT/preference.png          same / other / background over depth with intervals
    OUT/preference_modes.png    measured vs. predicted from all / the top-m modes (area-normalised)
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from qkdissect.adapters.base import AttentionLayer
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write, write_json
from qkdissect.oddoneout import O3Folder, Problem, load_sample, patch_geometry, problem_kind, query_maps, read_o3_folder
from qkdissect.projection import atlas_input, capture_attention_inputs, project

__all__ = [
    "CATEGORIES", "QUERIES", "VARIANTS", "Interval", "PreferenceResult", "attention_rows", "attention_rows_from_modes",
    "attention_shares", "bootstrap_mean", "load_preference",
    "run_preference", "save_preference",
]

QUERIES = ("target", "distractor")
VARIANTS = ("raw", "area", "noself")
CATEGORIES = ("same", "other", "background")
FORMAT, FORMAT_VERSION = "qkdissect-preference", 1
AXES = ("image", "layer", "head", "query", "source", "variant", "category")


@contextlib.contextmanager
def _quiet():
    """Means of empty or all-NaN slices are NaN by design here: silence numpy's warnings."""
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# ----- attention rows -----------------------------------------------------------------------------------
def _gather_tokens(x: Tensor, tokens: Tensor) -> Tensor:
    """x (B, N, D), tokens (B, Q) -> (B, Q, D)."""
    return torch.gather(x, 1, tokens[..., None].expand(-1, -1, x.shape[-1]))


def attention_rows(layer: AttentionLayer, x: Tensor, tokens: Tensor) -> Tensor:
    """The model's attention rows of the query ``tokens``, from its own W_q, W_k, b_q, b_k.

    x: x̃ (B, N, d_model); tokens: (B, Q) sequence positions -> (B, heads, Q, N), rows summing to 1:
    softmax_j(scale · (W_q x̃_t + b_q)·(W_k x̃_j + b_k)).
    """
    layer = layer.expanded()
    W_q, W_k = layer.W_q.to(x), layer.W_k.to(x)
    q = torch.einsum("bqd,hed->bhqe", _gather_tokens(x, tokens), W_q)
    k = torch.einsum("bnd,hed->bhne", x, W_k)
    if layer.b_q is not None:
        q = q + layer.b_q.to(x)[None, :, None, :]
    if layer.b_k is not None:
        k = k + layer.b_k.to(x)[None, :, None, :]
    return (layer.scale * torch.einsum("bhqe,bhne->bhqn", q, k)).softmax(dim=-1)


def attention_rows_from_modes(atlas, layer: int, x: Tensor, tokens: Tensor,
                              n_modes: Sequence[int | None] = (None,)) -> Tensor:
    """Attention rows predicted from the leading modes of each head.

    x: x̃ (B, N, d_model); tokens (B, Q) -> (len(n_modes), B, heads, Q, N):
    softmax_j(scale · (Σ_{k<m} σ_k (u_k·x̃_t)(v_k·x̃_j) + key_bias·x̃_j)) for each m in ``n_modes``
    (None = all r modes, which reproduces the model's attention exactly).
    """
    modes = atlas.layers[layer]
    q, k = project(atlas, layer, x)  # (B, H, N, r)
    q = torch.gather(q, 2, tokens[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    q = q * modes.S.to(q)[None, :, None, :]  # σ_k (u_k·x̃_t)
    salience = torch.einsum("bnd,hd->bhn", atlas_input(atlas, layer, x), modes.key_bias.to(q))[:, :, None, :]
    rows = []
    for m in n_modes:
        m = q.shape[-1] if m is None else min(int(m), q.shape[-1])
        bilinear = torch.einsum("bhqr,bhnr->bhqn", q[..., :m], k[..., :m])
        rows.append((atlas.scale * (bilinear + salience)).softmax(dim=-1))
    return torch.stack(rows)


def attention_shares(rows: Tensor, n_prefix: int, maps: Tensor, query_patch: Tensor) -> tuple[Tensor, Tensor]:
    """Shares of attention per category, in the three variants of the module docstring.

    rows (..., B, H, Q, N) attention over all tokens; maps (B, Q, C, P) area fractions on the
    P = N − n_prefix patches; query_patch (B, Q) the query's patch index (−1: unavailable).
    Returns (shares (..., B, H, Q, 3 variants, C), prefix (..., B, H, Q)), NaN where the query is
    unavailable (and area-normalised shares of a category with zero area).
    """
    patch = rows[..., n_prefix:].double()
    if patch.shape[-1] != maps.shape[-1]:
        raise QKDissectError(f"the model has {patch.shape[-1]} patch tokens but the masks give {maps.shape[-1]} "
                             "patches; the patch grid does not match the model's token count.")
    maps = maps.to(patch)
    prefix = rows[..., :n_prefix].double().sum(dim=-1)
    a = patch / patch.sum(dim=-1, keepdim=True)
    raw = torch.einsum("...bhqp,bqcp->...bhqc", a, maps)
    area = maps.mean(dim=-1)[:, None]  # (B, 1, Q, C)
    area_norm = raw / torch.where(area > 0, area, torch.nan)
    index = query_patch.clamp_min(0).to(a.device)[:, None, :, None].expand(*a.shape[:-1], 1)
    own = torch.gather(a, -1, index)
    without = a.scatter(-1, index, 0.0) / (1.0 - own)
    noself = torch.einsum("...bhqp,bqcp->...bhqc", without, maps)
    shares = torch.stack([raw, area_norm, noself], dim=-2)
    missing = (query_patch < 0).to(a.device)[:, None, :]
    shares = shares.masked_fill(missing[..., None, None], torch.nan)
    return shares, prefix.masked_fill(missing, torch.nan)


# ----- statistics -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """Mean over images and its percentile-bootstrap interval [lo, hi]; arrays of equal shape."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def __getitem__(self, index) -> "Interval":
        return Interval(self.mean[index], self.lo[index], self.hi[index])


def bootstrap_mean(values: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0,
                   chunk: int = 4096) -> Interval:
    """Mean over axis 0 (images, NaN ignored) with a percentile bootstrap interval.

    values (n, ...) -> Interval of arrays (...). Each of ``n_boot`` resamples draws n images with
    replacement (multinomial counts c), its mean is Σ c_i v_i / Σ c_i [v_i finite]. The same
    resamples (same ``seed``) are used for every entry, so intervals of linear combinations
    of entries are consistent.
    """
    if not 0 < confidence < 1:
        raise QKDissectError(f"confidence must be in (0, 1), got {confidence}.")
    values = np.asarray(values, dtype=np.float64)
    n, shape = values.shape[0], values.shape[1:]
    flat = values.reshape(n, int(np.prod(shape, dtype=np.int64)))
    finite = np.isfinite(flat)
    with _quiet():
        mean = np.where(finite, flat, 0.0).sum(axis=0) / finite.sum(axis=0)
    if n == 0 or n_boot < 1:
        return Interval(mean.reshape(shape), np.full(shape, np.nan), np.full(shape, np.nan))
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    tails = [50 * (1 - confidence), 100 - 50 * (1 - confidence)]
    lo, hi = np.empty(flat.shape[1]), np.empty(flat.shape[1])
    for start in range(0, flat.shape[1], chunk):
        part = slice(start, start + chunk)
        with _quiet():
            boot = (counts @ np.where(finite[:, part], flat[:, part], 0.0)) / (counts @ finite[:, part])
            percentile = np.nanpercentile if np.isnan(boot).any() else np.percentile
            lo[part], hi[part] = percentile(boot, tails, axis=0)
    return Interval(mean.reshape(shape), lo.reshape(shape), hi.reshape(shape))


# ----- the result ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceResult:
    """Attention preference of one model on one data set.

    ``shares`` (n_images, L, H, Q, S, V, C) and ``prefix`` (n_images, L, H, Q, S) per image (NaN:
    query unavailable); ``layer``/``head`` intervals (L, Q, S, V, C) / (L, H, Q, S, V, C);
    ``prefix_layer``/``prefix_head`` (L, Q, S) / (L, H, Q, S). Axis labels: ``layers`` (the
    model's layer indices), ``sources`` ("measured", "modes", "top1", ...), :data:`QUERIES`,
    :data:`VARIANTS`, :data:`CATEGORIES`. ``meta`` is preference.json without the big tables.
    """

    meta: dict[str, Any]
    layers: tuple[int, ...]
    sources: tuple[str, ...]
    names: tuple[str, ...]
    shares: np.ndarray
    prefix: np.ndarray
    layer: Interval
    head: Interval
    prefix_layer: Interval
    prefix_head: Interval
    skipped: dict[str, int] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()

    def curve(self, query: str = "target", source: str = "measured", variant: str = "raw",
              category: str = "same", head: int | None = None) -> Interval:
        """One curve over depth: arrays (L,), for the head mean or one ``head``."""
        index = (_index(QUERIES, query, "query"), _index(self.sources, source, "source"),
                 _index(VARIANTS, variant, "variant"), _index(CATEGORIES, category, "category"))
        if head is None:
            return self.layer[(slice(None), *index)]
        return self.head[(slice(None), head, *index)]

    def n_images(self, query: str = "target") -> int:
        """Images with an available query of this kind."""
        column = self.shares[:, 0, 0, _index(QUERIES, query, "query"), 0, 0, 0]
        return int(np.isfinite(column).sum())


def _index(names: Sequence[str], name: str, what: str) -> int:
    if name not in names:
        raise QKDissectError(f"unknown {what} {name!r}; expected one of {', '.join(names)}.")
    return list(names).index(name)


def summarise(shares: np.ndarray, prefix: np.ndarray, n_boot: int, confidence: float,
              seed: int) -> tuple[Interval, Interval, Interval, Interval]:
    """(layer, head, prefix_layer, prefix_head) intervals; layer values are head means per image."""
    def stats(values):
        return bootstrap_mean(values, n_boot, confidence, seed)

    with _quiet():
        layer_shares, layer_prefix = np.nanmean(shares, axis=2), np.nanmean(prefix, axis=2)
    return stats(layer_shares), stats(shares), stats(layer_prefix), stats(prefix)


# ----- running ------------------------------------------------------------------------------------------
def run_preference(model: Any, data: str | os.PathLike | O3Folder, *, atlas=None, top_modes: Sequence[int] = (1, 2, 4),
                   threshold: float = 0.25, batch_size: int = 16, layers: Sequence[int] | None = None,
                   n_boot: int = 1000, confidence: float = 0.95, seed: int = 0, limit: int | None = None,
                   on_batch: Callable[[int], None] | None = None) -> PreferenceResult:
    """Measure and predict the attention preference of ``model`` on an odd-one-out folder.

    ``model``: LoadedModel or supported nn.Module (image family); ``data``: a folder in the O3
    layout (or a read :class:`O3Folder`); ``atlas``: its ModeAtlas (computed when None);
    ``top_modes``: the m of the "topM" predictions; ``threshold``: the smallest own-object
    fraction a query patch needs; ``on_batch(n)``: called with the images done per batch.
    Bad images are skipped and recorded, never raised.
    """
    from qkdissect.adapters.loading import wrap_model
    from qkdissect.decomposition import dissect
    from qkdissect.files import library_versions

    started = time.perf_counter()
    loaded = wrap_model(model)
    adapter = loaded.adapter
    if adapter.modality != "image" or loaded.preprocessing is None:
        raise QKDissectError(f"{loaded.spec} is a {adapter.modality} model; attention preference between objects "
                             "needs an image model (ViT family).")
    if not 0 < threshold <= 1:
        raise QKDissectError(f"threshold must be in (0, 1], got {threshold}.")
    if batch_size < 1:
        raise QKDissectError(f"batch size must be ≥ 1, got {batch_size}.")
    top_modes = tuple(sorted({int(m) for m in top_modes}))
    if any(m < 0 for m in top_modes):
        raise QKDissectError(f"top modes must be ≥ 0 (0 = key bias only), got {top_modes}.")
    preprocessing = loaded.preprocessing
    grid = adapter.patch_grid(preprocessing.image_size)
    n_prefix = len(adapter.prefix_tokens)
    all_layers = adapter.attention_layers()
    layers = tuple(range(len(all_layers))) if layers is None else tuple(sorted(set(int(l) for l in layers)))
    if not layers or layers[0] < 0 or layers[-1] >= len(all_layers):
        raise QKDissectError(f"layers must be within 0..{len(all_layers) - 1}, got {list(layers)}.")
    if atlas is None:
        atlas = dissect(loaded, null_samples=64)
    elif (atlas.n_layers, atlas.n_heads, atlas.d_model) != (len(all_layers), all_layers[0].n_heads,
                                                            all_layers[0].d_model):
        raise QKDissectError(f"the atlas ({atlas.n_layers} layers × {atlas.n_heads} heads, d_model {atlas.d_model}) "
                             f"does not belong to {loaded.spec}; dissect this model or drop --atlas.")
    folder = data if isinstance(data, O3Folder) else read_o3_folder(data)
    items = folder.items if limit is None else folder.items[: max(0, int(limit))]
    sources = ("measured", "modes") + tuple(f"top{m}" for m in top_modes)
    device = next(iter(loaded.model.parameters())).device
    problems = list(folder.problems)
    distractor_missing: Counter = Counter()
    names, images, share_parts, prefix_parts = [], [], [], []
    max_difference = np.zeros(len(layers))
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        samples, sample_maps = [], []
        for item in batch:
            try:
                sample = load_sample(item)
                maps = query_maps(sample, patch_geometry(preprocessing, sample.target.shape, grid), threshold)
            except QKDissectError as error:
                problems.append(Problem(item.name, problem_kind(str(error)), str(error)))
                continue
            if maps.query_patch[0] < 0:
                problems.append(Problem(item.name, "target vanishes at patch resolution",
                                        f"largest target fraction of a patch {maps.max_fraction[0]:.3f} < threshold "
                                        f"{threshold:g} on the {grid[0]}×{grid[1]} grid (too small or cropped)"))
                continue
            if maps.query_patch[1] < 0:
                distractor_missing["no distractor" if maps.n_distractors == 0
                                   else "distractors vanish at patch resolution"] += 1
            samples.append(sample)
            sample_maps.append(maps)
        if samples:
            pixels = torch.stack([preprocessing(s.image) for s in samples]).to(device)
            query_patch = torch.from_numpy(np.stack([m.query_patch for m in sample_maps]))
            maps = torch.from_numpy(np.stack([m.maps for m in sample_maps]))
            tokens = (query_patch.clamp_min(0) + n_prefix).to(device)
            captured = capture_attention_inputs(loaded, pixels, layers=layers)
            per_layer_shares, per_layer_prefix = [], []
            for position, layer in enumerate(layers):
                x = captured[layer].float()  # half-precision models: recompute attention in float32
                measured = attention_rows(all_layers[layer], x, tokens)
                predicted = attention_rows_from_modes(atlas, layer, x, tokens, (None, *top_modes))
                valid = (query_patch >= 0).to(device)[:, None, :, None]
                difference = ((predicted[0].to(measured) - measured).abs() * valid).amax().item()
                max_difference[position] = max(max_difference[position], difference)
                rows = torch.cat([measured[None], predicted.to(measured)])  # (S, B, H, Q, N)
                shares, prefix = attention_shares(rows, n_prefix, maps, query_patch)
                per_layer_shares.append(shares.permute(1, 2, 3, 0, 4, 5).cpu())  # (B, H, Q, S, V, C)
                per_layer_prefix.append(prefix.permute(1, 2, 3, 0).cpu())  # (B, H, Q, S)
            share_parts.append(torch.stack(per_layer_shares, dim=1).float().numpy())
            prefix_parts.append(torch.stack(per_layer_prefix, dim=1).float().numpy())
            for sample, maps_ in zip(samples, sample_maps):
                names.append(sample.name)
                images.append({"name": sample.name, "query_patch": [int(p) for p in maps_.query_patch],
                               "own_fraction": [round(float(f), 4) for f in maps_.max_fraction],
                               "n_distractors": maps_.n_distractors})
        if on_batch is not None:
            on_batch(len(batch))
    n_heads = all_layers[0].n_heads
    if share_parts:
        shares_all, prefix_all = np.concatenate(share_parts), np.concatenate(prefix_parts)
    else:
        shares_all = np.zeros((0, len(layers), n_heads, 2, len(sources), 3, 3), dtype=np.float32)
        prefix_all = np.zeros((0, len(layers), n_heads, 2, len(sources)), dtype=np.float32)
    layer_stats, head_stats, prefix_layer, prefix_head = summarise(shares_all, prefix_all, n_boot, confidence, seed)
    skipped = Counter(p.kind for p in problems if p.kind != "orphan mask")
    features = {e["name"]: e.get("feature") for e in (folder.manifest or {}).get("images", [])}
    for entry in images:
        if entry["name"] in features:
            entry["feature"] = features[entry["name"]]
    description = adapter.describe()
    by_feature = _by_feature(shares_all, [entry.get("feature") for entry in images])
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": loaded.spec, "checkpoint": loaded.checkpoint, "info": loaded.info, **description,
        "preprocessing": preprocessing.to_dict(), "patch_grid": list(grid),
        "data": {"root": str(folder.root), "kind": folder.kind,
                 "manifest": None if folder.manifest is None else
                 {k: folder.manifest.get(k) for k in ("seed", "feature", "size", "objects", "noise", "n", "features")}},
        "protocol": {
            "threshold": threshold, "attention_input": "x̃ captured at the attention module input (forward pre-hook)",
            "renormalisation": f"{n_prefix} prefix tokens {list(adapter.prefix_tokens)} dropped, row renormalised "
                               "over patch tokens",
            "target_query": "patch with the largest target area fraction (ties: nearest the target centroid)",
            "distractor_query": "best patch of the distractor object (8-connected component) whose best patch has "
                                "the largest fraction; 'same' = that object, 'other' = target + other distractors",
            "variants": {"raw": "Σ_p a_p f_c(p)", "area": "raw / mean_p f_c(p) (1 = uniform attention)",
                         "noself": "query token removed, row renormalised"},
            "sources": {"measured": "softmax(scale·(W_q x̃+b_q)·(W_k x̃+b_k)) from the model's parameters",
                        "modes": "softmax from all modes U, S, V and key_bias",
                        **{f"top{m}": f"softmax from the {m} leading modes per head and key_bias" for m in top_modes}},
            "atlas_ln_folded": bool(atlas.meta.get("ln_folded")),
        },
        "bootstrap": {"samples": n_boot, "confidence": confidence, "seed": seed, "unit": "image",
                      "layer_statistic": "mean over heads per image, then mean over images"},
        "axes": list(AXES), "layers_analysed": list(layers), "sources": list(sources), "queries": list(QUERIES),
        "variants": list(VARIANTS), "categories": list(CATEGORIES),
        "n_images": {"listed": folder.n_listed, "analysed": len(items), "used": len(names),
                     "target_query": len(names), "distractor_query": len(names) - sum(distractor_missing.values())},
        "skipped": dict(sorted(skipped.items())),
        "distractor_query_unavailable": dict(sorted(distractor_missing.items())),
        "agreement": {"max_abs_diff_modes_vs_measured": [float(d) for d in max_difference],
                      "what": "largest |a_modes − a_measured| over all attention entries of the query rows"},
        "versions": library_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - started, 2), "by_feature": by_feature, "images": images,
    }
    return PreferenceResult(meta=meta, layers=layers, sources=sources, names=tuple(names), shares=shares_all,
                            prefix=prefix_all, layer=layer_stats, head=head_stats, prefix_layer=prefix_layer,
                            prefix_head=prefix_head, skipped=dict(skipped), problems=tuple(problems))


def _by_feature(shares: np.ndarray, features: list[str | None]) -> dict[str, Any]:
    """Measured raw and area-normalised shares per layer, averaged over the images of each
    feature of a generated data set (head mean, no intervals): {feature: {"n", QUERY: {VARIANT:
    {CATEGORY: [per layer]}}}}."""
    table: dict[str, Any] = {}
    for feature in sorted({f for f in features if f}):
        chosen = np.array([f == feature for f in features])
        with _quiet():
            means = np.nanmean(np.nanmean(shares[chosen, :, :, :, 0].astype(np.float64), axis=2), axis=0)
        table[feature] = {"n": int(chosen.sum()), **{
            query: {variant: {category: [_number(v) for v in means[:, qi, VARIANTS.index(variant), ci]]
                              for ci, category in enumerate(CATEGORIES)} for variant in ("raw", "area")}
            for qi, query in enumerate(QUERIES)}}
    return table


# ----- files --------------------------------------------------------------------------------------------
def _number(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 6)


def _layer_document(result: PreferenceResult) -> list[dict[str, Any]]:
    rows = []
    for li, layer in enumerate(result.layers):
        entry: dict[str, Any] = {"layer": layer}
        for qi, query in enumerate(QUERIES):
            block: dict[str, Any] = {}
            for si, source in enumerate(result.sources):
                block[source] = {variant: {category: {k: _number(getattr(result.layer, k)[li, qi, si, vi, ci])
                                                      for k in ("mean", "lo", "hi")}
                                           for ci, category in enumerate(CATEGORIES)}
                                 for vi, variant in enumerate(VARIANTS)}
            block["prefix"] = {source: {k: _number(getattr(result.prefix_layer, k)[li, qi, si]) for k in ("mean", "lo", "hi")}
                               for si, source in enumerate(result.sources)}
            entry[query] = block
        rows.append(entry)
    return rows


def _table_rows(result: PreferenceResult, per_head: bool) -> list[list[Any]]:
    stats, prefix = (result.head, result.prefix_head) if per_head else (result.layer, result.prefix_layer)
    counts = [result.n_images(q) for q in QUERIES]
    rows = []
    for index in np.ndindex(stats.mean.shape):
        li, rest = index[0], index[1:]
        head = [rest[0]] if per_head else []
        qi, si, vi, ci = rest[-4:]
        rows.append([result.layers[li], *head, QUERIES[qi], result.sources[si], VARIANTS[vi], CATEGORIES[ci],
                     *(_number(getattr(stats, k)[index]) for k in ("mean", "lo", "hi")), counts[qi]])
    for index in np.ndindex(prefix.mean.shape):
        li, rest = index[0], index[1:]
        head = [rest[0]] if per_head else []
        qi, si = rest[-2:]
        rows.append([result.layers[li], *head, QUERIES[qi], result.sources[si], "prefix", "prefix",
                     *(_number(getattr(prefix, k)[index]) for k in ("mean", "lo", "hi")), counts[qi]])
    return rows


def _write_table(path: Path, header: list[str], rows: list[list[Any]]) -> list[Path]:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(["" if v is None else v for v in row] for row in rows)

    written = [atomic_write(path, write)]
    try:  # optional: parquet only when pyarrow (and pandas) are installed
        import pandas
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    frame = pandas.DataFrame(rows, columns=header)
    written.append(atomic_write(path.with_suffix(".parquet"), lambda p: frame.to_parquet(p, index=False)))
    return written


def save_preference(result: PreferenceResult, out: str | os.PathLike, figures: bool = True) -> list[Path]:
    """Write the output folder described in the module docstring; returns the files written."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {"shares": result.shares, "prefix": result.prefix}
    for name, interval in (("layer", result.layer), ("head", result.head), ("prefix_layer", result.prefix_layer),
                           ("prefix_head", result.prefix_head)):
        for key in ("mean", "lo", "hi"):
            arrays[f"{name}_{key}"] = getattr(interval, key)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
    written = [atomic_write(out / "preference.safetensors",
                            lambda p: save_file(arrays, str(p), metadata={"format": FORMAT}))]
    document = {**result.meta, "names": list(result.names),
                "problems": [p.to_dict() for p in result.problems], "layers": _layer_document(result)}
    written.append(write_json(out / "preference.json", document))
    columns = ["layer", "query", "source", "variant", "category", "mean", "lo", "hi", "n_images"]
    written += _write_table(out / "preference_layers.csv", columns, _table_rows(result, per_head=False))
    written += _write_table(out / "preference_heads.csv", columns[:1] + ["head"] + columns[1:],
                            _table_rows(result, per_head=True))
    written += _write_table(out / "problems.csv", ["name", "kind", "detail"],
                            [[p.name, p.kind, p.detail] for p in result.problems])
    if figures and len(result.names):
        from qkdissect.preference_plots import plot_preference, plot_preference_modes

        written.append(plot_preference(result, out / "preference.png"))
        written.append(plot_preference_modes(result, out / "preference_modes.png"))
    return written


def load_preference(directory: str | os.PathLike) -> PreferenceResult:
    """Read a folder written by :func:`save_preference` (QKDissectError when missing or corrupt)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    json_path, array_path = directory / "preference.json", directory / "preference.safetensors"
    for path in (json_path, array_path):
        if not path.is_file():
            raise QKDissectError(f"{path} not found: {directory} is not a preference folder. Create one with "
                                 "`qkdissect preference MODEL --data DIR --out OUT`.")
    try:
        document = json.loads(json_path.read_text())
        arrays = load_file(str(array_path))
    except Exception as error:  # noqa: BLE001 — any reader failure means a corrupt file
        raise QKDissectError(f"{directory} holds a corrupt preference result ({type(error).__name__}: {error}); "
                             "re-run `qkdissect preference`.") from None
    if document.get("format") != FORMAT:
        raise QKDissectError(f"{json_path} is not a qkdissect preference file.")
    if int(document.get("format_version", -1)) > FORMAT_VERSION:
        raise QKDissectError(f"{json_path} has format version {document.get('format_version')}, newer than this "
                             f"qkdissect reads ({FORMAT_VERSION}); upgrade qkdissect.")

    def interval(name: str) -> Interval:
        return Interval(*(arrays[f"{name}_{k}"].astype(np.float64) for k in ("mean", "lo", "hi")))

    problems = tuple(Problem(p["name"], p["kind"], p["detail"]) for p in document.get("problems", []))
    meta = {k: v for k, v in document.items() if k not in ("layers", "problems", "names")}
    return PreferenceResult(meta=meta, layers=tuple(document["layers_analysed"]), sources=tuple(document["sources"]),
                            names=tuple(document.get("names", [])), shares=arrays["shares"], prefix=arrays["prefix"],
                            layer=interval("layer"), head=interval("head"), prefix_layer=interval("prefix_layer"),
                            prefix_head=interval("prefix_head"), skipped=dict(document.get("skipped", {})),
                            problems=problems)
