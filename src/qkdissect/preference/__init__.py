"""Attention preference between objects: same object / other objects / background.

Protocol, per image, layer l, head h and query kind (target / distractor, see
:func:`qkdissect.synthetic.oddoneout.query_maps`):

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
    OUT/preference_heads.csv    the same with a head column (+ the same tables as .parquet files)
    OUT/problems.csv            name, kind, detail of every skipped image or unmatched file
    OUT/preference.png          same / other / background over depth with intervals
    OUT/preference_modes.png    measured vs. predicted from all / the top-m modes (area-normalised)
"""

from qkdissect.preference.attention import attention_rows, attention_rows_from_modes, attention_shares
from qkdissect.preference.io import load_preference, save_preference
from qkdissect.preference.result import CATEGORIES, QUERIES, VARIANTS, Interval, PreferenceResult, bootstrap_mean
from qkdissect.preference.run import run_preference

__all__ = [
    "CATEGORIES", "QUERIES", "VARIANTS", "Interval", "PreferenceResult", "attention_rows", "attention_rows_from_modes",
    "attention_shares", "bootstrap_mean", "load_preference", "run_preference", "save_preference",
]
