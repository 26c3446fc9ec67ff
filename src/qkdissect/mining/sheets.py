"""Contact sheets of mined modes: the top images of one (layer, head, mode, sign) with their query (red) and key
(cyan) maps overlaid and rings at the peak patches.

Drawing is vectorised per sheet (:func:`qkdissect.overlays.overlay_tiles`: the k tiles of a sheet are upsampled,
scaled and coloured as one numpy array), crops are decoded once per image (an LRU cache of tile-sized crops) and
read back from the mined source in one pass per shard / row group (:class:`~qkdissect.mining.readers.ImageReader`),
and :func:`draw_sheets` spreads the sheets over worker processes. A sheet is a pure function of the mining result,
so it is the same bits whatever the number of workers or interruptions.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable

from torch import Tensor

from qkdissect.adapters.loading import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write
from qkdissect.mining.result import SIGN_FILES, MinedResult, load_mined, weights_fingerprint
from qkdissect.testpoints import pause_point

__all__ = ["draw_sheets", "recompute_maps", "render_contact_sheet", "sheet_path"]

TILE = 160
CROP_CACHE = 1024  # tile-sized crops kept (≈ 77 MB at 160 px)


def sheet_path(layer: int, head: int, mode: int, sign: int) -> str:
    """The relative path of a sheet inside the mining folder."""
    return f"sheets/L{layer:02d}/H{head:02d}_m{mode:03d}_{SIGN_FILES[sign]}.png"


class _Crops:
    """Tile-sized crops (uint8 (h, w, 3), or None for an unreadable image) of mined images, by image index."""

    def __init__(self, result: MinedResult, tile: int):
        from qkdissect.adapters.base import Preprocessing
        from qkdissect.mining.readers import ImageReader

        self.result, self.tile = result, tile
        self.preprocessing = Preprocessing.from_dict(result.meta["preprocessing"])
        self.reader = ImageReader(result.source)
        self.cache: OrderedDict[int, Any] = OrderedDict()

    def load(self, indices: Iterable[int]) -> None:
        """Read and crop every image of ``indices`` not cached yet (one pass per shard / row group)."""
        import numpy as np
        from PIL import Image

        from qkdissect.images import open_image

        missing = sorted({int(i) for i in indices if i >= 0} - set(self.cache))
        if not missing:
            return
        idents = {index: self.result.image_paths[index] for index in missing}
        payloads = self.reader.read(idents.values())
        for index, ident in idents.items():
            payload = payloads[ident]
            try:
                if isinstance(payload, str):
                    raise QKDissectError(payload)
                crop = self.preprocessing.resize_and_crop(open_image(payload, name=ident))
                height = max(1, round(self.tile * crop.size[1] / crop.size[0]))
                crop = np.asarray(crop.resize((self.tile, height), Image.Resampling.BICUBIC))
            except QKDissectError:
                crop = None
            self.cache[index] = crop
        while len(self.cache) > max(CROP_CACHE, len(missing)):
            self.cache.popitem(last=False)

    def get(self, index: int):
        if index not in self.cache:
            self.load([index])
        self.cache.move_to_end(index)
        return self.cache[index]


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
    payloads = ImageReader(result.source).read(row["relative_path"] for row in rows)
    maps: list[tuple[Tensor, Tensor] | None] = []
    for row in rows:
        payload = payloads[row["relative_path"]]
        if isinstance(payload, str):
            raise QKDissectError(payload)
        pixels = preprocessing(open_image(payload, name=row["relative_path"]))[None]
        pixels = pixels.to(next(loaded.model.parameters()).device)
        x = capture_attention_inputs(loaded, pixels, [layer])[layer]
        q, k = project(atlas, layer, x)
        maps.append((q[0, head, n_prefix:, mode].float().cpu(), k[0, head, n_prefix:, mode].float().cpu()))
    return maps


def _sheet_image(result: MinedResult, crops: _Crops, layer: int, head: int, mode: int, s: int, model: Any = None):
    """The PIL image of one contact sheet (see :func:`render_contact_sheet`)."""
    import numpy as np
    from PIL import Image

    from qkdissect.overlays import contact_sheet, draw_markers, overlay_tiles

    slot = result.layer_slot(layer)
    rows = result.top(layer, head, mode, s)
    note = ""
    if mode in result.map_modes:
        stored = result.topk.maps[slot, head, result.map_modes.index(mode), s]  # (k, 2, P)
        maps = [(stored[row["rank"], 0].float(), stored[row["rank"], 1].float()) for row in rows]
    elif model is not None:
        maps = recompute_maps(result, model, layer, head, mode, rows)
    else:
        maps, note = [None] * len(rows), "  (rings only: pass the model to draw maps)"
    crops.load(row["image"] for row in rows)
    grid_rows, grid_cols = result.grid
    pictures = [crops.get(row["image"]) for row in rows]
    drawn = [i for i, (picture, pair) in enumerate(zip(pictures, maps)) if picture is not None and pair is not None]
    shapes = {pictures[i].shape for i in drawn}
    coloured: dict[int, Any] = {}
    if drawn and len(shapes) == 1:
        stack = np.stack([pictures[i] for i in drawn])
        q = np.stack([maps[i][0].reshape(grid_rows, grid_cols).numpy() for i in drawn])
        k = np.stack([maps[i][1].reshape(grid_rows, grid_cols).numpy() for i in drawn])
        coloured = dict(zip(drawn, overlay_tiles(stack, q, k, 1 if s == 0 else -1)))
    elif drawn:  # crops of different shapes (cannot happen with one preprocessing): one by one
        for i in drawn:
            q = maps[i][0].reshape(1, grid_rows, grid_cols).numpy()
            k = maps[i][1].reshape(1, grid_rows, grid_cols).numpy()
            coloured[i] = overlay_tiles(pictures[i][None], q, k, 1 if s == 0 else -1)[0]
    tiles, captions = [], []
    for i, row in enumerate(rows):
        picture = pictures[i]
        if picture is None:
            tile = Image.new("RGB", (crops.tile, crops.tile), "#dddddd")
        else:
            array = coloured.get(i)
            if array is None:  # rings only
                array = (picture.mean(axis=-1, keepdims=True).repeat(3, axis=-1) * 0.8).astype(np.uint8)
            tile = draw_markers(Image.fromarray(array), result.grid, row["query_pos"], row["key_pos"])
        tiles.append(tile)
        captions.append(f"#{row['rank'] + 1} {Path(row['relative_path']).name}\nscore {row['score']:.4g}")
    title = (f"layer {layer}  head {head}  mode {mode}  sign {'+−'[s]}\ntop {len(rows)} of "
             f"{int(result.stats['images'])} images; red: query, cyan: key{note}")
    return contact_sheet(tiles, captions, title=title, tile_size=crops.tile)


def _save(sheet, path: Path) -> Path:
    import numpy as np

    from qkdissect.overlays import encode_png

    data = encode_png(np.asarray(sheet.convert("RGB")))
    return atomic_write(path, lambda p: p.write_bytes(data))


def render_contact_sheet(mined: str | os.PathLike | MinedResult, layer: int, head: int, mode: int, sign: int | str,
                         out_png: str | os.PathLike, *, model: Any = None, tile_size: int = TILE,
                         _cache: dict | None = None) -> Path:
    """Draw the top-k images of one (layer, head, mode, sign) as a contact sheet PNG.

    Each tile: the image crop with the query map (red) and key map (cyan) of that sign overlaid
    and rings at the peak patches, captioned with rank, file name and score. Maps come from
    the mining folder for its sheet modes; for other modes they are recomputed with ``model``
    (the mined model; its weights are checked) or, without it, only the peak rings are drawn.
    """
    result = mined if isinstance(mined, MinedResult) else load_mined(mined)
    s = {"+": 0, "-": 1, "−": 1}[sign] if isinstance(sign, str) else int(sign)
    if not (0 <= head < result.meta["n_heads"] and 0 <= mode < result.meta["rank"] and s in (0, 1)):
        raise QKDissectError(f"no (head {head}, mode {mode}, sign {sign}) in this mining run "
                             f"({result.meta['n_heads']} heads × {result.meta['rank']} modes, signs + and −).")
    cache = {} if _cache is None else _cache
    crops = cache.get(("crops", tile_size))
    if crops is None:
        crops = cache[("crops", tile_size)] = _Crops(result, tile_size)
    return _save(_sheet_image(result, crops, layer, head, mode, s, model), Path(out_png))


# ----- every sheet of a run ----------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the process that started it dies (a killed run leaves no workers)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_start(result: MinedResult, folder: Path, tile: int) -> None:
    import torch

    _die_with_parent()
    torch.set_num_threads(1)  # a forked child never enters the parent's thread pool
    _WORKER.update(result=result, folder=folder, crops=_Crops(result, tile))


def _draw_group(tasks: list[tuple[int, int, int, int]]) -> int:
    """Draw a group of sheets (one head) in a worker; returns how many."""
    result, folder, crops = _WORKER["result"], _WORKER["folder"], _WORKER["crops"]
    for layer, head, mode, s in tasks:
        _save(_sheet_image(result, crops, layer, head, mode, s), folder / sheet_path(layer, head, mode, s))
    return len(tasks)


def draw_sheets(result: MinedResult, folder: Path, *, progress=None, workers: int = 0, tile_size: int = TILE,
                heads: Iterable[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """Contact sheets of every mined (layer, head, sheet mode, sign) — or of the (layer, head) pairs in ``heads``
    — into ``folder/sheets/``; a sheet already there (or already in the mining folder) is kept: each is written
    whole under a temporary name. ``workers`` > 1: drawn by that many processes (fork; one head per task).
    Returns the index entries of the sheets drawn or kept."""
    folder = Path(folder)
    chosen = None if heads is None else {(int(layer), int(head)) for layer, head in heads}
    entries, groups = [], []
    for layer in result.layers:
        for head in range(result.meta["n_heads"]):
            if chosen is not None and (layer, head) not in chosen:
                continue
            group = []
            for mode in result.map_modes:
                for s in (0, 1):
                    relative = sheet_path(layer, head, mode, s)
                    entries.append({"layer": layer, "head": head, "mode": mode, "sign": "+-"[s], "png": relative})
                    if not (folder / relative).is_file() and not (result.directory / relative).is_file():
                        group.append((layer, head, mode, s))
            if group:
                groups.append(group)
    total, done = len(entries), len(entries) - sum(len(g) for g in groups)
    if progress is not None:
        progress("sheets", done, total)
    import multiprocessing

    if workers > 1 and len(groups) > 1 and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(groups)), initializer=_worker_start,
                          initargs=(result, folder, tile_size)) as pool:
            for count in pool.imap_unordered(_draw_group, groups):
                done += count
                pause_point("sheet")  # tests kill the process here, with sheets half drawn
                if progress is not None:
                    progress("sheets", done, total)
        return entries
    crops = _Crops(result, tile_size)
    for group in groups:
        for layer, head, mode, s in group:
            _save(_sheet_image(result, crops, layer, head, mode, s), folder / sheet_path(layer, head, mode, s))
            done += 1
            pause_point("sheet")
            if progress is not None:
                progress("sheets", done, total)
    return entries
