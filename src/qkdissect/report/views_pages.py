"""Image views on the report's head pages: top images of the leading modes (``qkdissect mine`` output,
read with :func:`qkdissect.mining.load_mined`) and per-image maps (``qkdissect maps`` output, read
with :func:`qkdissect.views.load_maps`); folder formats in those modules' docstrings.

Top images: for every mined layer and head, every mode whose maps the mining run kept
(``map_modes``, by default the 4 leading ones), both signs, each kept image becomes one small
JPEG tile under ``img/mined/L<ll>/H<hh>/``: the crop the model saw with the query map (red) and key
map (cyan) of that sign overlaid and rings at the maxima (the drawing code of
:mod:`qkdissect.overlays`, the same as the mining contact sheets), captioned in HTML with rank, file
name and score. Maps: the overlay figures of a maps folder are copied under ``img/maps/<n>/``.
Copied and rendered files get generated names (never the user's file names), so every URL is plain.
Mined images are read back from wherever they were mined — a folder, a file list, WebDataset shards or
Parquet files (:class:`qkdissect.mining.readers.ImageReader`, one pass per shard / row group per head).
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qkdissect.errors import QKDissectError

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["MapsViews", "MinedViews"]

TILE = 168  # longer side of a tile, px
SIGNS = (("+", "pos", 1), ("−", "neg", -1))


def _check_sigmas(ours: list[float], theirs: list[float], what: str, fix: str) -> None:
    """QKDissectError unless two lists of singular values agree (relative 1e-3 of the largest)."""
    scale = max([abs(v) for v in ours] + [1e-30])
    if len(ours) != len(theirs) or any(abs(a - b) > 1e-3 * scale for a, b in zip(ours, theirs)):
        raise QKDissectError(f"{what} were computed from other modes than this atlas (singular values differ). {fix}")


class MinedViews:
    """Top images of one mining folder, rendered lazily per head (tiles are written as pages are)."""

    def __init__(self, mined, atlas: ModeAtlas):
        self.mined = mined
        meta = mined.meta
        if (int(meta["n_heads"]), int(meta["rank"])) != (atlas.n_heads, atlas.rank) or \
                max(mined.layers) >= atlas.n_layers:
            raise QKDissectError(
                f"--mined {mined.directory}: mined with {meta['n_heads']} heads × {meta['rank']} modes on layers "
                f"{list(mined.layers)}, but this atlas has {atlas.n_layers} layers × {atlas.n_heads} heads × "
                f"{atlas.rank} modes. Give the mining folder of this model.")
        self._check_modes(atlas)
        from qkdissect.adapters.base import Preprocessing

        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.grid = tuple(mined.grid)
        self.modes = tuple(int(m) for m in mined.map_modes) if mined.topk.maps is not None else ()
        from qkdissect.mining.readers import ImageReader

        self.reader = ImageReader(mined.source)
        self._payloads: dict[int, Any] = {}
        self._crops: OrderedDict[int, Any] = OrderedDict()
        self.n_tiles = 0
        self.missing: set[str] = set()

    def _check_modes(self, atlas: ModeAtlas) -> None:
        path = self.mined.directory / "atlas" / "atlas.json"
        if not path.is_file():
            return
        try:
            heads = json.loads(path.read_text())["heads"]
        except (OSError, ValueError, KeyError) as error:
            raise QKDissectError(f"{path} is corrupt ({error}); re-run `qkdissect mine`.") from None
        theirs = [s for h in heads if h["layer"] in self.mined.layers for s in h["singular_values"]]
        ours = [float(s) for layer in self.mined.layers for s in atlas.singular_values[layer].flatten()]
        _check_sigmas(ours, theirs, f"--mined {self.mined.directory}: the mined top images",
                      "Mine with `--atlas` pointing at this atlas, or report the atlas the miner used "
                      f"({self.mined.directory / 'atlas'}).")

    def summary(self) -> dict[str, Any]:
        meta = self.mined.meta
        return {"n_images": int(meta.get("n_processed", meta.get("n_images", 0))), "n_bad": int(meta.get("n_bad", 0)),
                "root": str(meta.get("image_root", "?")), "top_k": self.mined.topk.k, "layers": list(self.mined.layers),
                "map_modes": list(self.modes), "score": meta.get("score", ""),
                "sheets": len(meta.get("sheets", [])), "directory": str(self.mined.directory),
                "all_sheets": len(self.mined.layers) * int(meta["n_heads"]) * len(self.mined.map_modes) * 2}

    # ----- tiles -------------------------------------------------------------------------------------------
    def _crop(self, index: int):
        """The image as the model saw it, scaled so that its longer side is TILE px (cached, LRU)."""
        from PIL import Image

        from qkdissect.images import open_image

        if index in self._crops:
            self._crops.move_to_end(index)
            return self._crops[index]
        ident = self.mined.image_paths[index]
        payload = self._payloads.pop(index, None)
        if payload is None:
            payload = self.reader.read([ident])[ident]
        try:
            if isinstance(payload, str):
                raise QKDissectError(payload)
            crop = self.preprocessing.resize_and_crop(open_image(payload, name=ident))
            factor = TILE / max(crop.size)
            crop = crop.resize((max(1, round(crop.size[0] * factor)), max(1, round(crop.size[1] * factor))),
                               Image.Resampling.BICUBIC)
        except (QKDissectError, OSError):
            crop = None
            self.missing.add(self.mined.image_paths[index])
        self._crops[index] = crop
        if len(self._crops) > 2048:
            self._crops.popitem(last=False)
        return crop

    def _tile(self, index: int, q_map, k_map, sign: int, q_pos: int, k_pos: int):
        import numpy as np
        from PIL import Image

        from qkdissect.overlays import draw_markers, overlay_rgb

        crop = self._crop(index)
        if crop is None:
            return Image.new("RGB", (TILE, TILE), "#d0d0d0"), False
        rows, cols = self.grid
        array = overlay_rgb(np.asarray(crop), q_map.reshape(rows, cols), k_map.reshape(rows, cols), sign)
        return draw_markers(Image.fromarray(array), self.grid, q_pos, k_pos), True

    def head(self, layer: int, head: int, images: Path, prefix: str) -> dict[str, Any] | None:
        """Render the tiles of one head into ``images`` (the report's img/ folder) and return the
        template context; ``prefix`` is the URL of img/ from the head page. None if not mined."""
        if layer not in self.mined.layers or not self.modes:
            return None
        slot = self.mined.layer_slot(layer)
        kept = self.mined.topk.image[slot, head, list(self.modes)]  # (m, 2, k) of the modes drawn
        wanted = {int(i) for i in kept.flatten().tolist() if i >= 0} - set(self._crops)
        if wanted:  # one read per shard / row group for the whole head
            idents = {index: self.mined.image_paths[index] for index in sorted(wanted)}
            found = self.reader.read(idents.values())
            self._payloads = {index: found[ident] for index, ident in idents.items()}
        folder = Path("mined") / f"L{layer:02d}" / f"H{head:02d}"
        (images / folder).mkdir(parents=True, exist_ok=True)
        modes = []
        for position, mode in enumerate(self.modes):
            signs = []
            for sign_index, (sign_name, sign_file, factor) in enumerate(SIGNS):
                stored = self.mined.topk.maps[slot, head, position, sign_index].float()  # (k, 2, P)
                tiles = []
                for row in self.mined.top(layer, head, mode, sign_index):
                    picture, readable = self._tile(row["image"], stored[row["rank"], 0].numpy(),
                                                   stored[row["rank"], 1].numpy(), factor, row["query_pos"],
                                                   row["key_pos"])
                    name = folder / f"m{mode:03d}_{sign_file}_{row['rank']:02d}.jpg"
                    picture.save(images / name, format="JPEG", quality=85)
                    self.n_tiles += 1
                    tiles.append({"src": f"{prefix}{name.as_posix()}", "rank": row["rank"] + 1,
                                  "name": Path(row["relative_path"]).name, "path": row["relative_path"],
                                  "score": row["score"], "readable": readable,
                                  "width": picture.size[0], "height": picture.size[1]})
                signs.append({"sign": sign_name, "tiles": tiles})
            modes.append({"mode": mode, "signs": signs})
        return {"modes": modes, **self.summary()}


class MapsViews:
    """Per-image maps folders (one (layer, head) each), copied into the report."""

    def __init__(self, results, atlas: ModeAtlas):
        self.by_head: dict[tuple[int, int], list[tuple[int, Any]]] = {}
        for number, result in enumerate(results):
            meta = result.meta
            layer, head = int(meta["layer"]), int(meta["head"])
            if not (0 <= layer < atlas.n_layers and 0 <= head < atlas.n_heads) or int(meta["rank"]) != atlas.rank:
                raise QKDissectError(f"--maps {result.directory}: maps of layer {layer}, head {head} with "
                                     f"{meta['rank']} modes do not fit this atlas ({atlas.n_layers} layers × "
                                     f"{atlas.n_heads} heads × {atlas.rank} modes).")
            modes = [int(m["mode"]) for m in meta["modes"]]
            _check_sigmas([float(atlas.singular_values[layer, head, m]) for m in modes],
                          [float(m["sigma"]) for m in meta["modes"]], f"--maps {result.directory}: the maps",
                          "Run `qkdissect maps` with `--atlas` pointing at this atlas.")
            self.by_head.setdefault((layer, head), []).append((number, result))

    def heads(self) -> list[tuple[int, int]]:
        return sorted(self.by_head)

    def head(self, layer: int, head: int, images: Path, prefix: str) -> list[dict[str, Any]] | None:
        """Copy the figures of every maps folder of this head; template context (None: no maps)."""
        if (layer, head) not in self.by_head:
            return None
        from qkdissect.report.assets import png_size

        folders = []
        for number, result in self.by_head[(layer, head)]:
            items = []
            for index, item in enumerate(result.items):
                entry = item.entry
                files = ([(str(k), v) for k, v in sorted(entry.get("figures", {}).items(), key=lambda kv: int(kv[0]))]
                         if item.kind == "image" else [("strip", entry["strip"])] if entry.get("strip") else [])
                figures = []
                for key, relative in files:
                    source = result.directory / relative
                    if not source.is_file():
                        continue
                    name = Path("maps") / f"{number:02d}" / f"{index:03d}_{key}.png"
                    (images / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, images / name)
                    width, height = png_size(images / name)
                    figures.append({"src": f"{prefix}{name.as_posix()}", "mode": key, "width": width,
                                    "height": height})
                modes = [{"mode": m["mode"], "sigma": m["sigma"], "cosine": m["cosine"], "share": m["share"],
                          "plus": m["score"]["+"], "minus": m["score"]["-"]} for m in entry.get("modes", [])]
                items.append({"source": item.source, "name": Path(item.source).name, "kind": item.kind,
                              "figures": figures, "modes": modes, "bias_share": entry.get("bias_share"),
                              "logit_variance": entry.get("logit_variance")})
            folders.append({"directory": str(result.directory), "entries": items,
                            "failed": [(f.get("source", "?"), f.get("reason", "?")) for f in result.failed]})
        return folders
