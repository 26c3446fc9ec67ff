"""Per-input views of a head's modes: query/key maps (``qkdissect maps``) and the ranking of
modes by the share of the head's logit variance they explain (``qkdissect rank``).

For head h of layer l and mode k (atlas U, S, V, key_bias; x̃ captured with hooks):
query map q_p = u_k·x̃_p, key map k_p = v_k·x̃_p, contribution to the logits
C_k[p, p'] = scale·σ_k·q_p·k_p', score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p') over patch
tokens (image) or valid tokens (text); the share of logit variance is defined in
:class:`qkdissect.projection.LogitVarianceShares`. Layers with another attention form use their
exact logits: QK-norm maps are divided by each token's factor ρ, contributions of rotary and
normalised heads are the exact ones of ``qkdissect.projection.mode_contributions``, and the rest
of their logits (query/key offsets, relative position bias) is stored as residual_logits; masked
pairs (causal, Swin's shift mask) do not count. Window attention (Swin): maps are put back on the
layer's own grid, contributions and residual logits are kept per window (with each window token's
grid index), and shares sum over the windows of an image.

Folder written by :func:`run_maps` (read it with :func:`load_maps`)::

    maps.json                  format "qkdissect-maps": model, layer, head, modes (σ, cos u·v),
                               preprocessing, prefix tokens, patch grid, scale, versions;
                               "items": one per input (kind, source, folder, files, per-mode
                               scores / shares / argmax positions); "failed": [{source, reason}]
    000_<stem>/crop.png        the image as the model saw it (resized, centre-cropped)
    000_<stem>/mode_<k>.png    overlay: query map red, key map cyan (both signs, or the stronger)
    000_<stem>/maps.safetensors  q, k (m, rows, cols) patch maps; q_prefix, k_prefix (m, n_prefix);
                               contributions (m, N, N) over all tokens; key_bias_logits (N,) — or,
                               for other attention forms, residual_logits (N, N) and for QK-norm
                               layers rho (2, N); mode_shares (r,) of all modes of the head;
                               bias_share, logit_variance ()
    text_000/strip.png         text input: per-token q (red) and k (cyan) of every mode, values printed
    text_000/values.csv        token, mode, q, k
    text_000/maps.safetensors  q, k (m, T); contributions (m, T, T); input_ids (T,); shares as above

Folder written by :func:`run_rank` (read it with :func:`load_rank`)::

    rank.json                  format "qkdissect-rank": model, layers, "items": per input the top
                               rows and its figure; "failed"
    rank.csv                   every (input, layer, head, mode): σ, cos, share, explained variance,
                               the head's logit variance and key-bias share
    000_<stem>.png             bar chart of the top (layer, head, mode) of one input
"""

from qkdissect.views.context import HeadMaps, ViewContext, head_maps, prepare_view, scores_from_maps, token_strings
from qkdissect.views.maps import MapsItem, MapsResult, load_maps, run_maps
from qkdissect.views.rank import RankResult, load_rank, run_rank

__all__ = ["HeadMaps", "MapsItem", "MapsResult", "RankResult", "ViewContext", "head_maps", "load_maps",
           "load_rank", "prepare_view", "run_maps", "run_rank", "scores_from_maps", "token_strings"]
