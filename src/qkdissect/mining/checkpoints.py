"""Checkpoints of a mining run: what each holds, which are current, and the list of every sample read.

Files in the checkpoint folder (all written by this module; a run's generation G is one more than any found)::

    gGGGG-rRRRR.safetensors   rank R's state (top-k + exact statistics) and, in its metadata: the run's
                              fingerprint, its coverage, its listings, the checkpoints it absorbed, seconds
    gGGGG-rRRRR.ids           rank R's listing: one JSON line [unit, position, id, reason or null] per sample
                              read, in reading order (sorted by (unit, position))

**Coverage**: per unit, the positions [start, end) whose images are in the state and whether end is the unit's
end. The coverages of the current checkpoints are disjoint and together cover a prefix of every unit; what is
left is the pending work. **Listings**: (file, bytes) pairs; only the first ``bytes`` bytes of a listing belong
to the checkpoint (a killed rank may have written more). **Absorbing**: on resume, rank 0 starts from the merge
of all current checkpoints; its first new checkpoint names them in ``absorbs`` (and inherits their listings), and
from then on they are not current even if still on disk. So a kill at any moment leaves a consistent set, for
any number of processes before and after: states merge exactly (:mod:`qkdissect.mining.state`), so the result is
the same bits however the work was split.
"""

from __future__ import annotations

import heapq
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from qkdissect.errors import QKDissectError
from qkdissect.mining.state import checkpoint_meta

__all__ = ["NAME", "Coverage", "ListingWriter", "checkpoint_name", "current_checkpoints", "merged_listing",
           "next_generation", "remove_checkpoint_files"]

NAME = re.compile(r"^g(\d{4,})-r(\d{4,})\.(safetensors|ids)(\.tmp)?$")


def checkpoint_name(generation: int, rank: int) -> str:
    return f"g{generation:04d}-r{rank:04d}"


class Coverage:
    """Covered positions per unit: ``whole`` units (from 0 to their end) and ``parts`` {unit: [start, end,
    finished]}."""

    def __init__(self, whole: Iterable[int] = (), parts: dict[int, list] | None = None):
        self.whole: set[int] = set(int(u) for u in whole)
        self.parts: dict[int, list] = {int(u): list(p) for u, p in (parts or {}).items()}

    def add(self, unit: int, start: int, end: int, finished: bool) -> None:
        """Extend by positions [start, end) of ``unit`` (contiguous with what this coverage has of it)."""
        if unit in self.whole:
            raise QKDissectError(f"internal: unit {unit} is already covered whole.")
        part = self.parts.get(unit)
        if part is None:
            part = self.parts[unit] = [start, start, False]
        if part[1] != start or part[2]:
            raise QKDissectError(f"internal: positions {start}.. of unit {unit} do not continue its coverage {part}.")
        part[1], part[2] = end, bool(finished)
        if part[2] and part[0] == 0:
            del self.parts[unit]
            self.whole.add(unit)

    def to_json(self) -> dict[str, Any]:
        runs, ordered = [], sorted(self.whole)
        for unit in ordered:
            if runs and runs[-1][1] == unit:
                runs[-1][1] = unit + 1
            else:
                runs.append([unit, unit + 1])
        return {"whole": runs, "parts": [[u, *p] for u, p in sorted(self.parts.items())]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Coverage":
        try:
            whole = [u for a, b in data["whole"] for u in range(int(a), int(b))]
            parts = {int(u): [int(s), int(e), bool(f)] for u, s, e, f in data["parts"]}
        except (KeyError, TypeError, ValueError) as error:
            raise QKDissectError(f"a checkpoint's coverage is malformed ({error}).") from None
        return cls(whole, parts)

    @classmethod
    def union(cls, coverages: Iterable["Coverage"], where: Path) -> "Coverage":
        """The union of disjoint coverages that fit together (each unit covered from 0 without gaps)."""
        whole: set[int] = set()
        intervals: dict[int, list[list]] = {}
        for coverage in coverages:
            overlap = whole & (coverage.whole | set(coverage.parts))
            overlap |= coverage.whole & set(intervals)
            if overlap:
                raise _misfit(where, min(overlap))
            whole |= coverage.whole
            for unit, part in coverage.parts.items():
                intervals.setdefault(unit, []).append(part)
        merged = cls(whole)
        for unit, parts in intervals.items():
            position = 0
            for start, end, finished in sorted(parts):
                if start != position or merged.parts.get(unit, [0, 0, False])[2]:
                    raise _misfit(where, unit)
                merged.parts[unit] = [0, end, finished]
                position = end
            if merged.parts[unit][2]:
                del merged.parts[unit]
                merged.whole.add(unit)
        return merged

    def start_of(self, unit: int) -> int | None:
        """Where unit's pending work starts; None when it is done."""
        if unit in self.whole:
            return None
        part = self.parts.get(unit)
        if part is None:
            return 0
        return None if part[2] else part[1]

    def complete(self, n_units: int) -> bool:
        return len(self.whole) == n_units and not self.parts


def _misfit(where: Path, unit: int) -> QKDissectError:
    return QKDissectError(f"the checkpoints in {where} do not fit together (unit {unit} is covered twice or with a "
                          "gap); they were not all written by one qkdissect run. Delete that folder and start again "
                          "without --resume.")


def next_generation(folder: Path) -> int:
    """One more than the largest generation of any checkpoint file in ``folder``."""
    found = [int(m.group(1)) for p in folder.glob("g*") if (m := NAME.match(p.name))] if folder.is_dir() else []
    return max(found, default=0) + 1


def current_checkpoints(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, metadata) of the checkpoints that are current (not absorbed by another), sorted by name."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.glob("g*-r*.safetensors") if NAME.match(p.name))
    metas = {path: checkpoint_meta(path) for path in files}
    absorbed = {name for meta in metas.values() for name in meta.get("absorbs", [])}
    return [(path, meta) for path, meta in metas.items() if path.name not in absorbed]


def remove_checkpoint_files(folder: Path, *, keep: Iterable[str] = ()) -> None:
    """Delete the files of this module in ``folder`` (never other files) except ``keep``; the folder too if it
    ends up empty."""
    keep = set(keep)
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if NAME.match(path.name) and path.name not in keep and path.is_file() and not path.is_symlink():
            path.unlink()
    try:
        folder.rmdir()
    except OSError:
        pass


class ListingWriter:
    """Appends one JSON line per sample to ``gGGGG-rRRRR.ids``; :attr:`size` is what a checkpoint records."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stream = open(path, "ab")
        self.size = self._stream.tell()

    def write(self, unit: int, samples: Iterable[tuple[int, str, str | None]]) -> None:
        data = b"".join(json.dumps([unit, position, ident, reason], ensure_ascii=False).encode() + b"\n"
                        for position, ident, reason in samples)
        self._stream.write(data)
        self.size += len(data)

    def flush(self) -> int:
        self._stream.flush()
        return self.size

    def close(self) -> int:
        if not self._stream.closed:
            self._stream.close()
        return self.size


def _read_listing(path: Path, size: int) -> Iterator[tuple[int, int, str, str | None]]:
    if not path.is_file() or path.stat().st_size < size:
        raise QKDissectError(f"the sample listing {path} is missing or shorter than its checkpoint says; delete the "
                             "checkpoint folder and start again without --resume.")
    with open(path, "rb") as stream:
        remaining = size
        for line in stream:
            if remaining <= 0:
                break
            remaining -= len(line)
            if remaining < 0 or not line.endswith(b"\n"):
                raise QKDissectError(f"the sample listing {path} is cut in a line; delete the checkpoint folder and "
                                     "start again without --resume.")
            unit, position, ident, reason = json.loads(line)
            yield unit, position, ident, reason


def merged_listing(folder: Path, listings: Iterable[tuple[str, int]]) -> Iterator[tuple[int, int, str, str | None]]:
    """Every sample of the listings, in (unit, position) order; QKDissectError on a sample listed twice."""
    streams = [_read_listing(folder / name, int(size)) for name, size in listings]
    previous = None
    for entry in heapq.merge(*streams, key=lambda e: (e[0], e[1])):
        if previous is not None and (entry[0], entry[1]) <= previous:
            raise QKDissectError(f"the sample listings in {folder} list unit {entry[0]} position {entry[1]} twice; "
                                 "delete the checkpoint folder and start again without --resume.")
        previous = (entry[0], entry[1])
        yield entry
