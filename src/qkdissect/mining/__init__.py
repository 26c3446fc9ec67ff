"""Top images per mode over a whole image folder: one streaming pass, batched, resumable, sharded.

For every mined layer, head h, mode k and sign s ∈ {+, −} (sign − is the mode (−u_k, −v_k)):

    score_s(image) = max(0, max_p s·q_p) · max(0, max_p' s·k_p'),   q_p = u_k·x̃_p,  k_p = v_k·x̃_p

over the patch tokens p of the image (prefix tokens dropped). The clamp at 0 keeps an image in
which one side of the mode never turns positive from scoring high through a product of two
negative maxima. The top-k images (ties: smaller index first) and the patches where the maxima
occur are kept, with running mean / std / extrema of q and k per mode over all patch tokens.

Files are read in sorted order (``images.list_images``) and cut into batches of ``batch_size``
consecutive files; a run (or a shard) processes whole batches, so a resumed or sharded run
sees exactly the batches of a single run and gives the same top-k. Unreadable files are
skipped, counted and logged — never fatal (policy: ``images.open_image``).

Folder written by :func:`mine` (read it with :func:`load_mined`)::

    mined.json           format "qkdissect-mined": model, family, fingerprint, preprocessing,
                         prefix tokens, grid, layers, heads, rank, top_k, score definition,
                         map (sheet) modes, image root and counts, bad files, timings, versions,
                         sheets [{layer, head, mode, sign, png}]
    mined.safetensors    topk.scores / topk.image / topk.query_pos / topk.key_pos (L, H, r, 2, k);
                         topk.maps (L, H, m, 2, k, 2, P) float16 raw (q, k) patch maps of the
                         top images for the sheet modes; stats.total / stats.squares (L, 2, H, r)
                         float64, stats.maximum / stats.minimum, stats.tokens, stats.images
                         (axis 1: 0 = q, 1 = k; sign axis: 0 = +, 1 = −)
    images.txt           the sorted image list (paths relative to the image root), one per line;
                         topk.image indexes it
    bad_images.log       path<TAB>reason for every skipped file
    atlas/               the ModeAtlas the projections used
    sheets/L<ll>/H<hh>_m<kkk>_<pos|neg>.png   contact sheets of the sheet modes
    checkpoint/          rank-<r>-of-<w>.safetensors while a run is under way (removed at the end)
"""

from qkdissect.mining.result import MinedResult, load_mined
from qkdissect.mining.run import mine
from qkdissect.mining.sheets import render_contact_sheet

__all__ = ["MinedResult", "load_mined", "mine", "render_contact_sheet"]
