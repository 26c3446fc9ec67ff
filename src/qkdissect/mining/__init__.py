"""Top images per mode over a whole image set: one streaming pass, batched, resumable, sharded.

For every mined layer, head h, mode k and sign s ∈ {+, −} (sign − is the mode (−u_k, −v_k)):

    score_s(image) = max(0, max_p s·q_p) · max(0, max_p' s·k_p'),   q_p = u_k·x̃_p,  k_p = v_k·x̃_p

over the patch tokens p of the image (prefix tokens dropped). The clamp at 0 keeps an image in
which one side of the mode never turns positive from scoring high through a product of two
negative maxima. The top-k images (ties: the image read first) and the patches where the maxima
occur are kept, with running mean / std / extrema of q and k per mode over all patch tokens.

Images come from a folder, a file list, WebDataset shards or Parquet files (:mod:`.sources`),
cut into units that do not depend on the number of processes (a shard, a row group, or
``batch_size`` files); batches never cross units, so a resumed or sharded run sees exactly the
batches of a single run. Top-k merges and the fixed-point statistics are exact, so the result
is the same bits however the work was split or interrupted. Unreadable samples are skipped,
counted and logged — never fatal (policy: ``images.open_image``).

Modules: sources (what ``--images`` names), readers (streaming raw samples, reading back by id),
loader (decoding in DataLoader workers), engine (projections and reductions on the device),
state (top-k, exact statistics, checkpoint files), checkpoints (coverage, listings, resume with
any number of processes), outputs (the output folder, index last), sheets (contact sheets),
run (:func:`mine`), result (:func:`load_mined`).

Folder written by :func:`mine` (read it with :func:`load_mined`)::

    mined.json           format "qkdissect-mined" v2: model, family, fingerprint, preprocessing,
                         prefix tokens, grid, layers, heads, rank, top_k, score definition,
                         map (sheet) modes, image source and counts, bad samples (first 1000),
                         timings, versions, sheets [{layer, head, mode, sign, png}], files
    mined.safetensors    topk.scores / topk.image / topk.query_pos / topk.key_pos (L, H, r, 2, k);
                         topk.maps (L, H, m, 2, k, 2, P) float16 raw (q, k) patch maps of the
                         top images for the sheet modes; stats.total / stats.squares (L, 2, H, r)
                         float64, stats.maximum / stats.minimum, stats.tokens, stats.images
                         (axis 1: 0 = q, 1 = k; sign axis: 0 = +, 1 = −)
    images.txt           the id of every sample read, in reading order (relative path, listed
                         path, <shard>#<key> or <file>#<row>), one per line; topk.image indexes it
    bad_images.log       id<TAB>reason for every skipped sample
    atlas/               the ModeAtlas the projections used
    sheets/L<ll>/H<hh>_m<kkk>_<pos|neg>.png   contact sheets of the sheet modes (unless sheets=False;
                         :func:`add_sheets` draws them later)
    checkpoint/          gGGGG-rRRRR.safetensors / .ids per rank while a run is under way
    .qkdissect-tmp/      staged files while a run is under way (qkdissect.outputs)
"""

from qkdissect.mining.outputs import add_sheets
from qkdissect.mining.result import MinedResult, load_mined
from qkdissect.mining.run import mine
from qkdissect.mining.sheets import render_contact_sheet

__all__ = ["MinedResult", "add_sheets", "load_mined", "mine", "render_contact_sheet"]
