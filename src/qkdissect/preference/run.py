"""Measuring the attention preference of odd-one-out images: :func:`run_preference`."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from qkdissect.errors import QKDissectError
from qkdissect.positional import refuse_windows
from qkdissect.preference.attention import attention_rows, attention_rows_from_modes, attention_shares
from qkdissect.preference.result import (
    AXES,
    CATEGORIES,
    FORMAT,
    FORMAT_VERSION,
    QUERIES,
    VARIANTS,
    PreferenceResult,
    json_number,
    quiet_nan_means,
    summarise,
)
from qkdissect.progress import ProgressFn, report
from qkdissect.projection import capture_attention_inputs
from qkdissect.synthetic.oddoneout import (
    O3Folder,
    Problem,
    load_sample,
    patch_geometry,
    problem_kind,
    query_maps,
    read_o3_folder,
)

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["run_preference"]


def run_preference(model: Any, data: str | os.PathLike | O3Folder, *, atlas: ModeAtlas | None = None, top_modes: Sequence[int] = (1, 2, 4),
                   threshold: float = 0.25, batch_size: int = 16, layers: Sequence[int] | None = None,
                   n_boot: int = 1000, confidence: float = 0.95, seed: int = 0, limit: int | None = None,
                   progress: ProgressFn | None = None) -> PreferenceResult:
    """Measure and predict the attention preference of ``model`` on an odd-one-out folder.

    ``model``: LoadedModel or supported nn.Module (image family); ``data``: a folder in the O3
    layout (or a read :class:`O3Folder`); ``atlas``: its ModeAtlas (computed when None);
    ``top_modes``: the m of the "topM" predictions; ``threshold``: the smallest own-object
    fraction a query patch needs; ``progress("preference", done, total)``: called after each batch of images.
    Bad images are skipped and recorded, never raised.
    """
    from qkdissect.adapters.loading import wrap_model
    from qkdissect.decomposition import dissect
    from qkdissect.files import library_versions, timestamp

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
    for layer in layers:  # window attention (Swin) is refused with its reason
        refuse_windows(atlas, layer)
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
        report(progress, "preference", start + len(batch), len(items))
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
        "versions": library_versions(), "created": timestamp(),
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
        with quiet_nan_means():
            means = np.nanmean(np.nanmean(shares[chosen, :, :, :, 0].astype(np.float64), axis=2), axis=0)
        table[feature] = {"n": int(chosen.sum()), **{
            query: {variant: {category: [json_number(v) for v in means[:, qi, VARIANTS.index(variant), ci]]
                              for ci, category in enumerate(CATEGORIES)} for variant in ("raw", "area")}
            for qi, query in enumerate(QUERIES)}}
    return table


