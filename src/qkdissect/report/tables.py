"""The atlas as the report shows it: per-head tables, the model card, the heat map and the head-page context."""

from __future__ import annotations

import math
from typing import Any

from qkdissect.decomposition import ModeAtlas
from qkdissect.report.assets import fmt, head_page_name, round_up
from qkdissect.report.charts import cosine_svg, distance_svg, diverging_color, spectrum_svg, text_color

__all__ = ["AtlasTables", "head_context", "heat_rows", "legend", "model_card"]


class AtlasTables:
    """The per-head numbers of an atlas as plain Python lists (fast to template): S, cos (L, H, r),
    C, symmetric fraction (L, H), near-degenerate mask (L, H, r−1)."""

    def __init__(self, atlas: ModeAtlas):
        self.atlas = atlas
        self.L, self.H, self.r = atlas.n_layers, atlas.n_heads, atlas.rank
        self.heads = [atlas.heads_in(layer) for layer in range(self.L)]  # Swin: fewer heads in early stages
        self.order = [(layer, head) for layer in range(self.L) for head in range(self.heads[layer])]
        self.S = atlas.singular_values.double().tolist()
        self.cos = atlas.cosines.double().tolist()
        self.C = atlas.weighted_cosines.double().tolist()
        self.sym = atlas.symmetric_fractions.double().tolist()
        self.degenerate = atlas.degenerate.tolist()
        self.band = tuple(atlas.null.weighted_band)
        self.cos_band = tuple(atlas.null.cosine_band)
        extreme = max([abs(v) for row in self.C for v in row if math.isfinite(v)] + [0.0])
        self.vmax = round_up(max(extreme, abs(self.band[0]), abs(self.band[1]), 1e-3))

    def page(self, layer: int, head: int, prefix: str = "") -> str:
        return prefix + head_page_name(layer, head, self.L, self.H)

    def color(self, value: float) -> tuple[str, str]:
        return diverging_color(value, self.vmax), text_color(value, self.vmax)

    def in_null(self, value: float) -> bool:
        return self.band[0] <= value <= self.band[1]


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def model_card(atlas: ModeAtlas, atlas_dir: str | None) -> tuple[list, list]:
    meta = atlas.meta
    scale = meta.get("scale")
    scale_text = fmt(scale) + (" = 1/√d_head" if meta.get("scale_is_inverse_sqrt_d_head") else "")
    prefix = meta.get("prefix_tokens") or []
    card = [
        ("spec", meta.get("model")), ("checkpoint", meta.get("checkpoint")), ("family", meta.get("family")),
        ("modality", meta.get("modality")),
        ("shape", f"{atlas.n_layers} layers × {atlas.n_heads} heads"
                  + (f" ({meta['n_kv_heads']} key heads)" if meta.get("n_kv_heads", atlas.n_heads) != atlas.n_heads
                     else "")),
        ("d_model · d_head", f"{atlas.d_model} · {atlas.rank}"), ("attention scale", scale_text),
        ("prefix tokens", f"{len(prefix)}: {', '.join(map(str, prefix))}" if prefix else "none"),
        ("x̃ (what the modes act on)", meta.get("x_tilde")), ("LayerNorm folded", meta.get("ln_folded")),
        ("attention forms", ", ".join(meta.get("attention_forms") or ["plain"])),
    ]
    if atlas.ragged:
        card.append(("d_model per layer", " ".join(str(d) for d in atlas.d_models)))
    pre = meta.get("preprocessing")
    if pre:
        size = pre.get("image_size")
        card += [("preprocessing", f"{fmt(size[0])}×{fmt(size[1])} px, {pre.get('interpolation')}, crop_pct "
                                   f"{fmt(pre.get('crop_pct'))} ({pre.get('source')})" if size else str(pre)),
                 ("normalisation", f"mean {fmt(pre.get('mean'))}; std {fmt(pre.get('std'))}")]
    null = atlas.null
    provenance = [
        ("null", f"{null.n_samples} Gaussian heads ({null.method} sampler, seed {null.seed}), "
                 f"central {null.percentile:g}% band"),
        ("null band of C_h", f"[{null.weighted_band[0]:+.4f}, {null.weighted_band[1]:+.4f}]"),
        ("null band per mode", f"[{null.cosine_band[0]:+.4f}, {null.cosine_band[1]:+.4f}]"),
        ("SVD precision", meta.get("dtype")), ("decomposition time", f"{fmt(meta.get('decomposition_seconds'))} s"),
        ("created", meta.get("created")), ("atlas folder", atlas_dir),
        ("versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())),
    ]
    return ([(k, fmt(v)) for k, v in card], [(k, fmt(v)) for k, v in provenance])


def legend(tables: AtlasTables) -> dict[str, Any]:
    vmax = tables.vmax
    stops = [diverging_color(vmax * (2 * i / 10 - 1), vmax) + f" {10 * i}%" for i in range(11)]
    left = 50 * (1 + max(-1.0, tables.band[0] / vmax))
    right = 50 * (1 + min(1.0, tables.band[1] / vmax))
    ticks = [(50 * (1 + t), f"{t * vmax:+g}") for t in (-1, -0.5, 0, 0.5, 1)]
    return {"gradient": ", ".join(stops), "band_left": f"{left:.2f}", "band_width": f"{right - left:.2f}",
            "ticks": [(f"{p:.1f}", text) for p, text in ticks]}


def heat_rows(tables: AtlasTables) -> list[dict[str, Any]]:
    rows = []
    for layer in range(tables.L):
        cells = []
        for head in range(tables.heads[layer]):
            value = tables.C[layer][head]
            bg, fg = tables.color(value)
            cells.append({"head": head, "value": value, "bg": bg, "fg": fg, "in_null": tables.in_null(value),
                          "href": tables.page(layer, head, "heads/")})
        mean = _mean(tables.C[layer][:tables.heads[layer]])
        mean_bg, mean_fg = tables.color(mean)
        rows.append({"layer": layer, "cells": cells, "mean": mean, "mean_bg": mean_bg, "mean_fg": mean_fg})
    return rows


def head_context(tables: AtlasTables, layer: int, head: int) -> dict[str, Any]:
    """Everything a head page shows, from the atlas tables (no tensors)."""
    S, cos, degenerate = tables.S[layer][head], tables.cos[layer][head], tables.degenerate[layer][head]
    defined = [math.isfinite(c) for c in cos]
    total = sum(sigma for sigma, ok in zip(S, defined) if ok) or 1.0
    lo, hi = tables.cos_band
    flagged = {k for k, d in enumerate(degenerate) if d}
    modes, cumulative = [], 0.0
    for k, (sigma, c) in enumerate(zip(S, cos)):
        share = sigma / total if defined[k] else 0.0
        cumulative += share
        modes.append({"k": k, "sigma": sigma, "share": share, "cumulative": cumulative, "cos": c,
                      "where": "undefined" if not defined[k] else "above" if c > hi else "below" if c < lo
                      else "inside",
                      "degenerate": k in flagged or (k - 1) in flagged,
                      "gap": (sigma - S[k + 1]) / (S[0] or 1.0) if k + 1 < len(S) else None})
    weighted = tables.C[layer][head]
    w_lo, w_hi = tables.band
    verdict, verdict_class = (("rank 0 (W_qᵀW_k = 0): no defined mode, left out of every statistic", "undefined")
                              if not math.isfinite(weighted) else
                              ("above the null: attends to similar tokens", "above") if weighted > w_hi else
                              ("below the null: attends to dissimilar tokens", "below") if weighted < w_lo else
                              ("inside the null band", ""))
    L, order = tables.L, tables.order
    index = order.index((layer, head))
    prev_url = tables.page(*order[index - 1]) if index > 0 else None
    next_url = tables.page(*order[index + 1]) if index + 1 < len(order) else None
    up_url = tables.page(layer - 1, min(head, tables.heads[layer - 1] - 1)) if layer > 0 else None
    down_url = tables.page(layer + 1, min(head, tables.heads[layer + 1] - 1)) if layer + 1 < L else None
    strip = []
    for other in range(tables.heads[layer]):
        value = tables.C[layer][other]
        bg, fg = tables.color(value)
        strip.append({"head": other, "value": value, "bg": bg, "fg": fg, "here": other == head,
                      "href": tables.page(layer, other)})
    return {
        "page": "head", "root": "../", "layer": layer, "head": head, "rank": tables.r,
        "nav": {"prev": prev_url, "next": next_url, "up": up_url, "down": down_url, "home": "../index.html"},
        "links": [("prev", "← previous head", prev_url), ("next", "next head →", next_url),
                  ("up", "↑ previous layer", up_url), ("down", "↓ next layer", down_url),
                  ("home", "overview (Esc)", "../index.html")],
        "strip": strip, "weighted": weighted, "verdict": verdict, "verdict_class": verdict_class,
        "symmetric": tables.sym[layer][head], "sigma0": S[0], "stable_rank": sum(s * s for s in S) / (S[0] ** 2 or 1.0),
        "modes90": next((m["k"] + 1 for m in modes if m["cumulative"] >= 0.9 - 1e-12), len(modes)),
        "n_defined": sum(defined), "rank0": not any(defined),
        "n_above": sum(m["where"] == "above" for m in modes), "n_below": sum(m["where"] == "below" for m in modes),
        "degenerate": [f"{k}–{k + 1}" for k in sorted(flagged)], "modes": modes,
        "spectrum_svg": spectrum_svg(S, sorted(flagged)), "cosine_svg": cosine_svg(cos, S, tables.cos_band),
        "mined": None, "mined_modes": (), "maps": None, "preference": None,
        "form": form_context(tables, layer, head),
    }


def form_context(tables: AtlasTables, layer: int, head: int) -> dict[str, Any] | None:
    """What a head page shows about its layer's attention form: the kind and what is exact; for rotary heads
    C_h(|Δ|), the offset-averaged form and the content/position split; for relative-bias heads the bias share."""
    atlas = tables.atlas
    form = atlas.layers[layer].form
    if form is None:
        return None
    described = form.describe()
    out: dict[str, Any] = {"kind": form.kind, "exact": described["exact"], "rotary": None, "bias": None,
                           "qk_norm": None}
    info = atlas.head(layer, head).positional or {}
    band = atlas.null_for(layer).weighted_band
    if "distance_curve" in info:
        curve = info["distance_curve"]
        rotary = described["rotary"]
        out["rotary"] = {
            "layout": rotary["layout"], "rotary_dim": rotary["rotary_dim"], "pairs": rotary["pairs"],
            "coordinates": rotary.get("coordinates"), "per_head": rotary["per_head"],
            "offset_average": info["offset_average"]["weighted_cosine"], "content_share": info["content_share"],
            "position_share": info["position_share"],
            "curve_svg": distance_svg(curve["distance"], curve["weighted_cosine"], band),
            "near": curve["weighted_cosine"][0], "far": curve["weighted_cosine"][-1],
            "far_distance": curve["distance"][-1]}
    if "bias_share" in info:
        out["bias"] = {"variance": info["bias_variance"], "share": info["bias_share"]}
    if form.qk_norm is not None:
        out["qk_norm"] = form.qk_norm.kind
    return out
