"""Where mined images come from: a folder, a file list, WebDataset shards or Parquet files.

``--images`` names one of (:func:`open_source` decides):

* a **folder** of image files (jpg/jpeg/png/webp/bmp, read recursively in sorted order of their relative paths);
* a **file list**: a ``.txt`` / ``.lst`` file with one path per line, or a ``.csv`` / ``.tsv`` file with a column
  ``path`` / ``file`` / ``filename`` / ``image`` (else the first column); relative paths are relative to the list;
* **WebDataset shards**: local ``.tar`` files, given as a brace pattern (``shards/{000000..000099}.tar``, several
  joined with ``::``), one ``.tar`` file, or a folder holding ``.tar`` files. Samples are grouped by key with the
  webdataset package's rules; the image is the member named by ``--image-column`` (an extension such as ``jpg``)
  or else the first of jpg, jpeg, png, webp, bmp;
* **Parquet**: one ``.parquet`` file or a folder of them, with the encoded image bytes in ``--image-column`` (a
  binary column, or a struct with a ``bytes`` field as the Hugging Face hub writes them; default: the column
  named ``image`` / ``img`` / ``jpg`` / ``png``, or the only one that can hold images).

The data is cut into **units** that never change with the number of processes: one shard, one Parquet row group,
or ``batch_size`` consecutive files of a folder or list. A unit's samples are numbered from 0 (its *positions*);
batches never cross units, so every batch — and hence every floating-point result — is the same however the units
are spread over processes or however often a run is interrupted. Every sample has a stable id: the relative path
(folder), the path as listed (list), ``<shard>#<key>`` (WebDataset) or ``<file>#<row>`` (Parquet, row within the
file). Reading (streaming, without unpacking) is in :mod:`qkdissect.mining.readers`.
"""

from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from qkdissect.errors import QKDissectError

__all__ = ["ImageSource", "KINDS", "Unit", "open_source"]

KINDS = ("folder", "list", "webdataset", "parquet")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv")
PATH_COLUMNS = ("path", "file", "filename", "file_name", "image", "image_path")
IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class Unit:
    """One unit of work. ``path``: the shard / Parquet file (None for folders and lists); ``name``: its path
    relative to the source root, the prefix of its samples' ids; ``row_group`` / ``first_row`` / ``rows``:
    the Parquet row group, the file row of its position 0 and its number of rows; ``files``: (first, end)
    indices into the source's file list for folders and lists; ``size``: samples if known up front."""

    name: str
    path: Path | None = None
    row_group: int = -1
    first_row: int = 0
    files: tuple[int, int] | None = None
    size: int | None = None


@dataclass(frozen=True)
class ImageSource:
    """A resolved ``--images``: kind, root (ids are relative to it), units in their fixed order, and for
    folders and lists the files (``ids`` as written; relative ones are relative to ``root``: :meth:`path`)."""

    kind: str
    spec: str
    root: Path
    units: tuple[Unit, ...]
    image_column: str | None = None
    ids: tuple[str, ...] = field(default=(), repr=False)

    def path(self, index: int) -> Path:
        """The file of sample ``index`` of a folder or list (made on demand: no Path per file is held)."""
        ident = self.ids[index]
        return Path(ident) if os.path.isabs(ident) else self.root / ident

    @property
    def known_size(self) -> int | None:
        """Number of samples when known without reading the data (all kinds but WebDataset)."""
        sizes = [unit.size for unit in self.units]
        return None if any(s is None for s in sizes) else sum(sizes)

    def fingerprint(self) -> str:
        """Hash of what the run reads: kind, column, and per file its relative name and size (folders: every
        image; lists: the list's content and every listed file's size; shards / Parquet: every file and, for
        Parquet, its row groups)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{self.kind}\t{self.image_column}\n".encode())
        if self.kind in ("folder", "list"):
            for index, ident in enumerate(self.ids):
                path = self.path(index)
                size = path.stat().st_size if path.is_file() else -1
                h.update(f"{ident}\t{size}\n".encode())
        else:
            seen: set[Path] = set()
            for unit in self.units:
                if unit.path not in seen:
                    seen.add(unit.path)
                    h.update(f"{unit.path.relative_to(self.root).as_posix()}\t{unit.path.stat().st_size}\n".encode())
                h.update(f"{unit.name}\t{unit.row_group}\t{unit.first_row}\t{unit.size}\n".encode())
        return h.hexdigest()

    def to_meta(self) -> dict[str, Any]:
        """What mined.json records to read images back (:func:`qkdissect.mining.readers.read_back`)."""
        meta: dict[str, Any] = {"kind": self.kind, "spec": self.spec, "root": str(self.root.resolve()),
                                "image_column": self.image_column, "units": len(self.units)}
        if self.kind == "list":
            meta["list_file"] = str(Path(self.spec).resolve())
        return meta

    def describe(self) -> str:
        what = {"folder": "image folder", "list": "file list", "webdataset": "WebDataset shards",
                "parquet": "Parquet data"}[self.kind]
        count = self.known_size
        return f"{what} {self.spec} ({len(self.units)} units{'' if count is None else f', {count} images'})"


# ----- resolving --images --------------------------------------------------------------------------------------
def open_source(spec: str | os.PathLike, *, batch_size: int, image_column: str | None = None) -> ImageSource:
    """Resolve ``--images`` (see the module docstring); QKDissectError naming what is wrong."""
    if batch_size < 1:
        raise QKDissectError("--batch-size must be at least 1.")
    text = os.fspath(spec)
    path = Path(text)
    if "{" in text or "::" in text:
        return _webdataset(text, _expand(text), image_column)
    if path.is_dir():
        from qkdissect.images import list_images

        files = [f.relative_to(path).as_posix() for f in list_images(path)]
        if files:
            if image_column is not None:
                raise QKDissectError(f"--image-column is for WebDataset shards and Parquet files; {path} is a "
                                     "folder of image files.")
            return _files("folder", text, path, files, batch_size)
        parquet = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        if parquet:
            return _parquet(text, path, parquet, image_column)
        shards = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(".tar"))
        if shards:
            return _webdataset(text, [str(s) for s in shards], image_column, root=path)
        raise QKDissectError(f"no images (jpg/jpeg/png/webp/bmp), .parquet or .tar files found below {path}.")
    if not path.exists():
        raise QKDissectError(f"--images {text}: no such file or folder.")
    name = path.name.lower()
    if name.endswith(".tar"):
        return _webdataset(text, [text], image_column)
    if name.endswith(".parquet"):
        return _parquet(text, path.parent, [path], image_column)
    if name.endswith(LIST_SUFFIXES):
        ids = _read_list(path)
        if image_column is not None:
            raise QKDissectError("--image-column is for WebDataset shards and Parquet files, not a file list.")
        return _files("list", text, path.parent, ids, batch_size)
    raise QKDissectError(f"--images {text}: give an image folder, a file list (.txt, .lst, .csv, .tsv), WebDataset "
                         ".tar shards (a brace pattern such as shards/{{000000..000099}}.tar) or Parquet files.")


def _files(kind: str, spec: str, root: Path, ids: Sequence[str], batch_size: int) -> ImageSource:
    if not ids:
        raise QKDissectError(f"--images {spec}: no images listed.")
    units = tuple(Unit(name=f"{start}", files=(start, min(start + batch_size, len(ids))),
                       size=min(start + batch_size, len(ids)) - start) for start in range(0, len(ids), batch_size))
    return ImageSource(kind=kind, spec=spec, root=root, units=units, ids=tuple(ids))


def _read_list(path: Path) -> list[str]:
    """The paths as written in a .txt/.lst (one per line) or .csv/.tsv file list."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise QKDissectError(f"cannot read the file list {path} ({error}).") from None
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = [row for row in csv.reader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
                if row and any(cell.strip() for cell in row)]
        if not rows:
            raise QKDissectError(f"the file list {path} is empty.")
        header = [cell.strip().lower() for cell in rows[0]]
        column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
        if column is None:
            column, body = 0, rows  # no header naming a path column: first column, every row
        else:
            body = rows[1:]
        entries = [row[column].strip() if column < len(row) else "" for row in body]
    else:
        entries = [line.strip() for line in text.splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    if not entries:
        raise QKDissectError(f"the file list {path} lists no files.")
    if any(not e for e in entries):
        raise QKDissectError(f"the file list {path} has rows without a path; fill them or remove them.")
    return entries


def _expand(spec: str) -> list[str]:
    """Brace / ``::`` expansion with the webdataset package's rules (order kept, duplicates refused)."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(spec)
    if len(set(urls)) != len(urls):
        raise QKDissectError(f"--images {spec} names some shards twice.")
    return urls


def _webdataset(spec: str, shards: list[str], image_column: str | None, root: Path | None = None) -> ImageSource:
    missing = [s for s in shards if "://" in s or s.startswith("pipe:") or not Path(s).is_file()]
    if missing:
        raise QKDissectError(f"WebDataset shard {missing[0]} is not a local file ({len(missing)} of {len(shards)} "
                             "missing); qkdissect reads local .tar shards (copy or mount them first).")
    not_tar = [s for s in shards if not s.endswith(".tar")]
    if not_tar:
        raise QKDissectError(f"{not_tar[0]} is not a .tar shard (compressed shards cannot be read in parallel by "
                             "position; unpack .tar.gz to .tar).")
    paths = [Path(s).resolve() for s in shards]
    if root is None:
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    root = root.resolve()
    units = tuple(Unit(name=p.relative_to(root).as_posix(), path=p) for p in paths)
    if image_column is not None and (not image_column or "/" in image_column):
        raise QKDissectError(f"--image-column {image_column!r}: give the member extension of the images, e.g. jpg.")
    return ImageSource(kind="webdataset", spec=spec, root=root, units=units,
                       image_column=None if image_column is None else image_column.lower().lstrip("."))


def _parquet(spec: str, root: Path, files: list[Path], image_column: str | None) -> ImageSource:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = root.resolve()
    units, column = [], image_column
    for file in files:
        file = file.resolve()
        try:
            handle = pq.ParquetFile(file)
        except Exception as error:  # noqa: BLE001 — pyarrow raises several types for a bad file
            raise QKDissectError(f"{file} is not a readable Parquet file ({type(error).__name__}: {error}).") from None
        schema = handle.schema_arrow
        column = _image_column(schema, column, file, pa)
        first = 0
        for group in range(handle.metadata.num_row_groups):
            rows = handle.metadata.row_group(group).num_rows
            if rows:
                units.append(Unit(name=file.relative_to(root).as_posix(), path=file, row_group=group, first_row=first,
                                  size=rows))
            first += rows
    if not units:
        raise QKDissectError(f"--images {spec}: the Parquet data has no rows.")
    return ImageSource(kind="parquet", spec=spec, root=root, units=tuple(units), image_column=column)


def _image_column(schema, wanted: str | None, file: Path, pa) -> str:
    """The column holding encoded images: binary, or a struct with a binary ``bytes`` field."""
    def holds_images(kind) -> bool:
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return True
        return pa.types.is_struct(kind) and any(kind.field(i).name == "bytes" and (
            pa.types.is_binary(kind.field(i).type) or pa.types.is_large_binary(kind.field(i).type))
            for i in range(kind.num_fields))

    names = schema.names
    if wanted is not None:
        if wanted not in names:
            raise QKDissectError(f"{file} has no column {wanted!r} (columns: {', '.join(names)}); pass "
                                 "--image-column with the column that holds the encoded images.")
        if not holds_images(schema.field(wanted).type):
            raise QKDissectError(f"column {wanted!r} of {file} is {schema.field(wanted).type}, not image bytes "
                                 "(binary, or a struct with a 'bytes' field).")
        return wanted
    candidates = [n for n in names if holds_images(schema.field(n).type)]
    for name in IMAGE_COLUMNS:
        if name in candidates:
            return name
    if len(candidates) == 1:
        return candidates[0]
    raise QKDissectError(f"{file}: cannot tell which column holds the images (columns: {', '.join(names)}; "
                         f"binary: {', '.join(candidates) or 'none'}); pass --image-column NAME.")
