"""The mining folder format (``qkdissect-mined``): :class:`MinedResult`, :func:`load_mined`, fingerprints.

See :mod:`qkdissect.mining` for the files a mining run writes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.mining.state import TopK, state_from_tensors, stats_summary

__all__ = ["FORMAT", "FORMAT_VERSION", "Listing", "MinedResult", "SCORE", "SIGN_FILES", "images_fingerprint",
           "load_mined", "tensors_digest", "weights_fingerprint"]

FORMAT, FORMAT_VERSION = "qkdissect-mined", 2  # 2: any image source (mined.json "source"), ids in images.txt
SIGN_FILES = ("pos", "neg")
SCORE = "score± = max(0, max_p ±q_p)·max(0, max_p' ±k_p') over patch tokens; q = u·x̃, k = v·x̃"


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(value.dtype).encode())
        h.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter and buffer of ``model``."""
    return tensors_digest(dict(model.state_dict()))


def images_fingerprint(root: Path, paths: Sequence[Path]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        h.update(f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\n".encode())
    return h.hexdigest()


class Listing(Sequence[str]):
    """The lines of images.txt, read on demand: only the byte offset of each line is held in memory (8 bytes
    per image), so a mining folder of millions of images loads in constant memory apart from that index."""

    def __init__(self, path: Path):
        import numpy as np

        self.path = path
        starts, position = [0], 0
        with open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                ends = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + position + 1
                starts.extend(ends.tolist())
                position += len(chunk)
        if starts[-1] != position:  # a last line without a newline
            starts.append(position + 1)
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"image {index} out of range (0..{len(self) - 1})")
        start, end = int(self._starts[index]), int(self._starts[index + 1])
        with open(self.path, "rb") as stream:
            stream.seek(start)
            return stream.read(end - start).decode("utf-8").rstrip("\n")

    def __iter__(self):
        with open(self.path, encoding="utf-8") as stream:
            for line in stream:
                yield line.rstrip("\n")

    def index(self, value: str, start: int = 0, stop: int | None = None) -> int:
        for position, line in enumerate(self):
            if position >= start and (stop is None or position < stop) and line == value:
                return position
        raise ValueError(f"{value!r} is not in {self.path}")


@dataclass(frozen=True)
class MinedResult:
    """A mining folder (see the module docstring). Tensors on CPU; ``layers`` are model layer ids
    (axis 0 of every tensor); sign 0 = +, 1 = −; positions are row-major patch indices."""

    directory: Path
    meta: dict[str, Any]
    layers: tuple[int, ...]
    root: Path
    image_paths: Sequence[str]  # images.txt (a Listing: read on demand); topk.image indexes it
    topk: TopK
    stats: dict[str, Tensor]
    map_modes: tuple[int, ...]
    grid: tuple[int, int]
    bad: tuple[tuple[str, str], ...]

    def layer_slot(self, layer: int) -> int:
        if layer not in self.layers:
            raise QKDissectError(f"layer {layer} was not mined; mined layers: {list(self.layers)}.")
        return self.layers.index(layer)

    @property
    def source(self) -> dict[str, Any]:
        """Where the images came from (kind, root, list file, image column): what :class:`ImageReader` needs.
        A folder's root is ``image_root`` (so a moved image folder is found by editing that one field)."""
        source = dict(self.meta.get("source") or {"kind": "folder"})
        if source.get("kind", "folder") == "folder":
            source["root"] = str(self.root)
        return source

    def image_path(self, index: int) -> str:
        """A file path for folders and lists; the id (``shard.tar#key``, ``file.parquet#row``) otherwise."""
        ident = self.image_paths[index]
        kind = self.source.get("kind", "folder")
        if kind == "folder":
            return str(self.root / ident)
        if kind == "list":
            base = Path(self.source.get("list_file", self.root)).parent
            return ident if Path(ident).is_absolute() else str(base / ident)
        return ident

    def top(self, layer: int, head: int, mode: int, sign: int | str = 0) -> list[dict[str, Any]]:
        """The kept images of one (layer, head, mode, sign), best first: rank, image index, path
        (see :meth:`image_path`), id (``relative_path``), score, query/key peak patch (row, col)."""
        s = {"+": 0, "-": 1, "−": 1}.get(sign, sign) if isinstance(sign, str) else int(sign)
        slot = self.layer_slot(layer)
        cols = self.grid[1]
        rows = []
        for rank in range(self.topk.k):
            index = int(self.topk.image[slot, head, mode, s, rank])
            score = float(self.topk.scores[slot, head, mode, s, rank])
            if index < 0 or score == float("-inf"):
                continue
            q_pos, k_pos = int(self.topk.query_pos[slot, head, mode, s, rank]), int(self.topk.key_pos[slot, head, mode, s, rank])
            rows.append({"rank": rank, "image": index, "path": self.image_path(index),
                         "relative_path": self.image_paths[index], "score": score,
                         "query_patch": divmod(q_pos, cols), "key_patch": divmod(k_pos, cols),
                         "query_pos": q_pos, "key_pos": k_pos})
        return rows


def load_mined(directory: str | os.PathLike) -> MinedResult:
    """Read a folder written by ``qkdissect mine`` / :func:`mine`; one QKDissectError naming the file and the field
    (or tensor) when it is incomplete or inconsistent (schema: :mod:`qkdissect.formats.mined`)."""
    from safetensors.torch import load_file

    from qkdissect.formats import check_shapes, read_document
    from qkdissect.formats.mined import MinedDocument, mined_shapes

    directory = Path(directory)
    index = directory / "mined.json"
    if not index.is_file():
        raise QKDissectError(f"{index} not found: {directory} is not a finished `qkdissect mine` folder "
                             "(an interrupted run continues with --resume).")
    remedy = "re-run `qkdissect mine`"
    try:
        meta = json.loads(index.read_text())
        tensors = load_file(str(directory / "mined.safetensors"))
        paths = Listing(directory / "images.txt")
    except Exception as error:  # noqa: BLE001
        raise QKDissectError(f"{directory} is incomplete or corrupt ({type(error).__name__}: {error}); "
                             f"{remedy}.") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > FORMAT_VERSION:
        raise QKDissectError(f"{index} is not a {FORMAT} index this qkdissect reads.")
    meta, checked = read_document(index, MinedDocument, missing=f"{directory} is not a mining folder", remedy=remedy,
                                  kind=FORMAT, max_version=FORMAT_VERSION)
    check_shapes(directory / "mined.safetensors", {k: tuple(v.shape) for k, v in tensors.items()},
                 mined_shapes(checked), remedy=remedy)
    if len(paths) != checked.n_images:
        raise QKDissectError(f"{directory / 'images.txt'} lists {len(paths)} images, mined.json n_images is "
                             f"{checked.n_images}; {remedy}.")
    topk, stats = state_from_tensors(tensors)
    return MinedResult(directory=directory, meta=meta, layers=tuple(checked.layers), root=Path(checked.image_root),
                       image_paths=paths, topk=topk, stats={**stats_summary(stats), "tokens": stats.tokens,
                                                                   "images": stats.images},
                       map_modes=tuple(checked.map_modes), grid=tuple(checked.grid),
                       bad=tuple((b.path, b.reason) for b in checked.bad_images))
