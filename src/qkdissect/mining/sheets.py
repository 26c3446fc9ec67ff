"""Contact sheets of mined modes: the top images of one (layer, head, mode, sign) with their query (red) and key
(cyan) maps overlaid and rings at the peak patches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor

from qkdissect.adapters.loading import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.mining.result import MinedResult, load_mined, weights_fingerprint
from qkdissect.testpoints import pause_point

__all__ = ["draw_sheets", "recompute_maps", "render_contact_sheet"]


def _crop(result: MinedResult, index: int, cache: dict[int, Any]):
    from qkdissect.adapters.base import Preprocessing
    from qkdissect.images import open_image
    from qkdissect.mining.readers import ImageReader

    if index not in cache:
        if len(cache) > 512:
            cache.pop(next(iter(cache)))
        reader = cache.get("reader")
        if reader is None:
            reader = cache["reader"] = ImageReader(result.source)
        preprocessing = Preprocessing.from_dict(result.meta["preprocessing"])
        ident = result.image_paths[index]
        payload = reader.read([ident])[ident]
        try:
            if isinstance(payload, str):
                raise QKDissectError(payload)
            cache[index] = preprocessing.resize_and_crop(open_image(payload, name=ident))
        except QKDissectError:
            cache[index] = None
    return cache[index]


def recompute_maps(result: MinedResult, model: Any, layer: int, head: int, mode: int,
                    rows: list[dict[str, Any]]) -> list[tuple[Tensor, Tensor] | None]:
    """Maps of one mode for the kept images, by running ``model`` again (for modes without stored maps)."""
    from qkdissect.adapters.base import Preprocessing
    from qkdissect.decomposition import ModeAtlas
    from qkdissect.images import open_image
    from qkdissect.mining.readers import ImageReader
    from qkdissect.projection import capture_attention_inputs, project

    loaded = wrap_model(model)
    if weights_fingerprint(loaded.model) != result.meta["fingerprint"]["weights"]:
        raise QKDissectError("this model's weights differ from the mined model's; its maps would not match.")
    atlas = ModeAtlas.load(result.directory / "atlas")
    preprocessing = Preprocessing.from_dict(result.meta["preprocessing"])
    n_prefix = len(result.meta["prefix_tokens"])
    maps: list[tuple[Tensor, Tensor] | None] = []
    for row in rows:
        payload = ImageReader(result.source).read([row["relative_path"]])[row["relative_path"]]
        if isinstance(payload, str):
            raise QKDissectError(payload)
        pixels = preprocessing(open_image(payload, name=row["relative_path"]))[None]
        pixels = pixels.to(next(loaded.model.parameters()).device)
        x = capture_attention_inputs(loaded, pixels, [layer])[layer]
        q, k = project(atlas, layer, x)
        maps.append((q[0, head, n_prefix:, mode].float().cpu(), k[0, head, n_prefix:, mode].float().cpu()))
    return maps


def render_contact_sheet(mined: str | os.PathLike | MinedResult, layer: int, head: int, mode: int, sign: int | str,
                         out_png: str | os.PathLike, *, model: Any = None, tile_size: int = 160,
                         _cache: dict | None = None) -> Path:
    """Draw the top-k images of one (layer, head, mode, sign) as a contact sheet PNG.

    Each tile: the image crop with the query map (red) and key map (cyan) of that sign overlaid
    and rings at the peak patches, captioned with rank, file name and score. Maps come from
    the mining folder for its sheet modes; for other modes they are recomputed with ``model``
    (the mined model; its weights are checked) or, without it, only the peak rings are drawn.
    """
    import numpy as np
    from PIL import Image

    from qkdissect.overlays import contact_sheet, draw_markers, overlay_rgb

    result = mined if isinstance(mined, MinedResult) else load_mined(mined)
    s = {"+": 0, "-": 1, "−": 1}[sign] if isinstance(sign, str) else int(sign)
    if not (0 <= head < result.meta["n_heads"] and 0 <= mode < result.meta["rank"] and s in (0, 1)):
        raise QKDissectError(f"no (head {head}, mode {mode}, sign {sign}) in this mining run "
                             f"({result.meta['n_heads']} heads × {result.meta['rank']} modes, signs + and −).")
    slot = result.layer_slot(layer)
    rows = result.top(layer, head, mode, s)
    cache = {} if _cache is None else _cache
    note = ""
    if mode in result.map_modes:
        position = result.map_modes.index(mode)
        stored = result.topk.maps[slot, head, position, s]  # (k, 2, P)
        maps = [(stored[row["rank"], 0].float(), stored[row["rank"], 1].float()) for row in rows]
    elif model is not None:
        maps = recompute_maps(result, model, layer, head, mode, rows)
    else:
        maps, note = [None] * len(rows), "  (rings only: pass the model to draw maps)"
    rows_, cols = result.grid
    sign_factor = 1 if s == 0 else -1
    tiles, captions = [], []
    for row, pair in zip(rows, maps):
        crop = _crop(result, row["image"], cache)
        if crop is None:
            tile = Image.new("RGB", (tile_size, tile_size), "#dddddd")
        else:
            from qkdissect.overlays import display_size

            array = display_size(np.asarray(crop), tile_size)
            if pair is not None:
                q_map, k_map = (m.reshape(rows_, cols).numpy() for m in pair)
                array = overlay_rgb(array, q_map, k_map, sign_factor)
            else:
                grey = array.mean(axis=-1, keepdims=True).repeat(3, axis=-1) * 0.8
                array = grey.astype(np.uint8)
            tile = draw_markers(Image.fromarray(array), result.grid, row["query_pos"], row["key_pos"])
        tiles.append(tile)
        captions.append(f"#{row['rank'] + 1} {Path(row['relative_path']).name}\nscore {row['score']:.4g}")
    title = (f"layer {layer}  head {head}  mode {mode}  sign {'+−'[s]}\ntop {len(rows)} of "
             f"{int(result.stats['images'])} images; red: query, cyan: key{note}")
    sheet = contact_sheet(tiles, captions, title=title, tile_size=tile_size)
    out_png = Path(out_png)
    atomic_write(out_png, lambda p: sheet.save(p, format="PNG", compress_level=1))
    return out_png


def draw_sheets(result: MinedResult, folder: Path, *, progress=None, workers: int = 0) -> list[dict[str, Any]]:
    """Contact sheets of every mined (layer, head, sheet mode, sign) into ``folder/sheets/``; a sheet already
    there is kept (each is written whole under a temporary name). Returns the index entries."""
    from qkdissect.mining.result import SIGN_FILES

    entries, cache = [], {}
    total = len(result.layers) * result.meta["n_heads"] * len(result.map_modes) * 2
    for layer in result.layers:
        for head in range(result.meta["n_heads"]):
            for mode in result.map_modes:
                for sign in (0, 1):
                    relative = f"sheets/L{layer:02d}/H{head:02d}_m{mode:03d}_{SIGN_FILES[sign]}.png"
                    if not (folder / relative).is_file() and not (result.directory / relative).is_file():
                        render_contact_sheet(result, layer, head, mode, sign, folder / relative, _cache=cache)
                        pause_point("sheet")
                    entries.append({"layer": layer, "head": head, "mode": mode, "sign": "+-"[sign],
                                    "png": relative})
                    if progress is not None:
                        progress("sheets", len(entries), total)
    return entries
