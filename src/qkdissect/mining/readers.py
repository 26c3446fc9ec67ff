"""Reading the samples of an :class:`~qkdissect.mining.sources.ImageSource`: streaming a unit from a position
(main process: raw bytes only, nothing decoded, nothing unpacked to disk), cutting it into batches, and reading
chosen images back by id (contact sheets, the report).

A raw sample is ``(unit, position, id, payload, reason)``: ``payload`` is a file path (folders, lists) or the
encoded bytes (a WebDataset member, a Parquet cell); ``reason`` is set (and ``payload`` None) for a sample that
has no image to decode — a WebDataset sample without an image member, an empty Parquet cell, or the place where
a truncated shard stops. Decoding happens in the DataLoader workers (:mod:`qkdissect.mining.loader`).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from qkdissect.errors import QKDissectError
from qkdissect.mining.sources import ImageSource, Unit

__all__ = ["Batch", "ImageReader", "RawSample", "WDS_IMAGE_SUFFIXES", "plan_batches", "read_unit"]

WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp", "bmp")
PARQUET_CHUNK = 256  # rows per Arrow record batch while streaming a row group
GROUP_CACHE_BYTES = 256 * 2**20  # image columns of recently read row groups kept for reading back


class RawSample(NamedTuple):
    unit: int
    position: int
    id: str
    payload: Any  # Path | bytes | None
    reason: str | None


class Batch(NamedTuple):
    """Consecutive samples of one unit; ``last``: the unit ends with this batch (it may then be empty)."""

    unit: int
    samples: list[RawSample]
    last: bool


# ----- streaming --------------------------------------------------------------------------------------------
def read_unit(source: ImageSource, index: int, start: int = 0) -> Iterator[RawSample]:
    """The samples of unit ``index`` from position ``start`` on, in order."""
    unit = source.units[index]
    if source.kind in ("folder", "list"):
        first, end = unit.files
        for i in range(first + start, end):
            yield RawSample(index, i - first, source.ids[i], source.path(i), None)
    elif source.kind == "webdataset":
        yield from _tar_unit(source, index, unit, start)
    else:
        yield from _parquet_unit(source, index, unit, start)


def _pick(members: dict[str, Any], wanted: str | None) -> tuple[str | None, str | None]:
    """(suffix of the image member, or None with the reason)."""
    if wanted is not None:
        if wanted in members:
            return wanted, None
        return None, f"no '{wanted}' member (has: {', '.join(sorted(members)) or 'nothing'})"
    for suffix in WDS_IMAGE_SUFFIXES:
        if suffix in members:
            return suffix, None
    return None, f"no image member ({'/'.join(WDS_IMAGE_SUFFIXES)}; has: {', '.join(sorted(members)) or 'nothing'})"


def _tar_members(path: Path, keep: Iterable[str]) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {suffix: data}) per sample of a shard, streamed with the webdataset package; only the data of the
    suffixes in ``keep`` is held (others map to None). Raises on a truncated or corrupt shard."""
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    keep = set(keep)
    key, members = None, {}
    with open(path, "rb") as stream:
        for item in tar_file_iterator(stream):
            prefix, suffix = base_plus_ext(item["fname"])
            if prefix is None:  # no extension: not part of a sample (webdataset skips these too)
                continue
            suffix = suffix.lower()
            if prefix != key:
                if key is not None:
                    yield key, members
                key, members = prefix, {}
            if suffix in members:
                members.setdefault("__duplicate__", suffix)
            members[suffix] = item["data"] if suffix in keep else None
    if key is not None:
        yield key, members


def _tar_unit(source: ImageSource, index: int, unit: Unit, start: int) -> Iterator[RawSample]:
    keep = (source.image_column,) if source.image_column else WDS_IMAGE_SUFFIXES
    position = 0
    try:
        for key, members in _tar_members(unit.path, keep):
            if position >= start:
                ident = f"{unit.name}#{key}"
                duplicate = members.pop("__duplicate__", None)
                suffix, reason = _pick(members, source.image_column)
                if duplicate is not None:
                    suffix, reason = None, f"two members with extension '{duplicate}'"
                yield RawSample(index, position, ident, members[suffix] if suffix else None, reason)
            position += 1
    except Exception as error:  # noqa: BLE001 — tarfile raises ReadError, EOFError, OSError, ValueError…
        if position >= start:
            yield RawSample(index, position, f"{unit.name}#<end of readable data>", None,
                            f"{unit.name}: shard is truncated or corrupt after {position} samples "
                            f"({type(error).__name__}: {error})")


def _parquet_unit(source: ImageSource, index: int, unit: Unit, start: int) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(unit.path)
    position = 0
    for batch in handle.iter_batches(batch_size=PARQUET_CHUNK, row_groups=[unit.row_group],
                                     columns=[source.image_column], use_threads=False):
        rows = batch.num_rows
        if position + rows <= start:
            position += rows
            continue
        skip = max(0, start - position)
        for offset, value in enumerate(_cell_bytes(batch.column(0).slice(skip)), start=position + skip):
            ident = f"{unit.name}#{unit.first_row + offset}"
            if value is None:
                yield RawSample(index, offset, ident, None, f"{ident}: no image in this row (empty cell)")
            else:
                yield RawSample(index, offset, ident, value, None)
        position += rows


def _cell_bytes(column) -> list[bytes | None]:
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def plan_batches(source: ImageSource, pending: Iterable[tuple[int, int]], batch_size: int) -> Iterator[Batch]:
    """Batches of ``batch_size`` consecutive samples of each pending ``(unit, start)``, in order; the last batch
    of a unit has ``last`` set (an empty one if the unit has nothing left)."""
    for index, start in pending:
        batch: list[RawSample] = []
        for sample in read_unit(source, index, start):
            if len(batch) == batch_size:
                yield Batch(index, batch, False)
                batch = []
            batch.append(sample)
        yield Batch(index, batch, True)


# ----- reading back by id -----------------------------------------------------------------------------------
class ImageReader:
    """Encoded images (or file paths) of chosen samples of a mined source, by id; grouped per shard / row group,
    with small caches (the member index of the last shards, the image column of the last row groups).

    ``source``: mined.json's ``source`` entry (kind, root, list file, image column).
    """

    def __init__(self, source: dict[str, Any]):
        self.kind = source.get("kind", "folder")
        self.root = Path(source.get("root", "."))
        self.column = source.get("image_column")
        self.list_dir = Path(source["list_file"]).parent if source.get("list_file") else self.root
        self._tar_index: OrderedDict[Path, dict[str, dict[str, Any]]] = OrderedDict()
        self._groups: OrderedDict[tuple[Path, int], Any] = OrderedDict()

    def read(self, ids: Iterable[str]) -> dict[str, Any]:
        """id -> Path (folders, lists) or bytes, or a ``str`` reason when it cannot be read back."""
        ids = list(dict.fromkeys(ids))
        if self.kind == "folder":
            return {i: self.root / i for i in ids}
        if self.kind == "list":
            return {i: Path(i) if Path(i).is_absolute() else self.list_dir / i for i in ids}
        out: dict[str, Any] = {}
        groups: dict[str, list[tuple[str, str]]] = {}
        for ident in ids:
            found = ident.rfind(".tar#") if self.kind == "webdataset" else ident.rfind("#")
            if found < 0:
                out[ident] = f"{ident}: not an id of this {self.kind} source"
                continue
            cut = found + 4 if self.kind == "webdataset" else found
            groups.setdefault(ident[:cut], []).append((ident, ident[cut + 1:]))
        for name, members in groups.items():
            path = self.root / name
            try:
                if self.kind == "webdataset":
                    out.update(self._from_tar(path, members))
                else:
                    out.update(self._from_parquet(path, members))
            except QKDissectError as error:
                out.update({ident: str(error) for ident, _ in members})
            except Exception as error:  # noqa: BLE001 — a shard or file that changed or vanished since mining
                out.update({ident: f"{path}: {type(error).__name__}: {error}" for ident, _ in members})
        return out

    def _from_tar(self, path: Path, members: list[tuple[str, str]]) -> dict[str, Any]:
        import tarfile

        from webdataset.tariterators import base_plus_ext

        index = self._tar_index.get(path)
        if index is None:
            index = {}
            with tarfile.open(path, "r:") as tar:  # headers only: seeks over the data
                for info in tar:
                    if info.isreg():
                        prefix, suffix = base_plus_ext(info.name)
                        if prefix is not None:
                            index.setdefault(prefix, {})[suffix.lower()] = (info.offset_data, info.size)
            self._tar_index[path] = index
            if len(self._tar_index) > 8:
                self._tar_index.popitem(last=False)
        out: dict[str, Any] = {}
        with open(path, "rb") as stream:
            for ident, key in members:
                found = index.get(key)
                suffix, reason = _pick(found, self.column) if found is not None else (None, "no such key")
                if suffix is None:
                    out[ident] = f"{ident}: {reason}"
                    continue
                offset, size = found[suffix]
                stream.seek(offset)
                out[ident] = stream.read(size)
        return out

    def _from_parquet(self, path: Path, members: list[tuple[str, str]]) -> dict[str, Any]:
        import bisect

        import pyarrow.parquet as pq

        handle = pq.ParquetFile(path)
        starts, total = [], 0
        for group in range(handle.metadata.num_row_groups):
            starts.append(total)
            total += handle.metadata.row_group(group).num_rows
        by_group: dict[int, list[tuple[str, int]]] = {}
        out: dict[str, Any] = {}
        for ident, row in members:
            if not row.isdigit() or int(row) >= total:
                out[ident] = f"{ident}: no such row in {path}"
                continue
            group = bisect.bisect_right(starts, int(row)) - 1
            by_group.setdefault(group, []).append((ident, int(row) - starts[group]))
        for group, rows in by_group.items():
            column = self._groups.get((path, group))
            if column is None:
                column = handle.read_row_group(group, columns=[self.column]).column(0).combine_chunks()
                self._groups[(path, group)] = column
                while len(self._groups) > 1 and sum(c.nbytes for c in self._groups.values()) > GROUP_CACHE_BYTES:
                    self._groups.popitem(last=False)
            values = _cell_bytes(column.take([offset for _, offset in rows]))
            for (ident, _), value in zip(rows, values):
                out[ident] = value if value is not None else f"{ident}: no image in this row (empty cell)"
        return out
