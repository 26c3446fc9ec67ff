"""The output folder of a mining run: what is in it, staging, and writing the result with its index last.

The folder is a :class:`qkdissect.outputs.OutputFolder` of format ``qkdissect-mined`` with index ``mined.json``:
everything a run writes goes first into its staging folder ``OUT/.qkdissect-tmp/``, except the checkpoints,
which live in ``OUT/checkpoint/`` while the run is under way. When the top-k is final, the finished files are
staged in this order — ``images.txt`` and ``bad_images.log`` (from the checkpoints' listings),
``mined.safetensors`` (the final state; its metadata holds the index document, so the run can finish from it
alone) — then the checkpoints are deleted, the atlas and the contact sheets are drawn into the staging folder (a
sheet already there is complete: each is written under a temporary name and renamed), and
:meth:`MiningFolder.finish` moves the files into place and writes ``mined.json`` last. A run killed at any point
is finished by ``--resume`` from what is staged (files that a killed finish had already moved into place are
moved back first); the result is the same bits as an uninterrupted run. An error (not a kill) leaves the staging
folder as it is, so ``--resume`` continues after it too.

A folder is refused when it is not empty and holds neither a ``mined.json`` of format ``qkdissect-mined`` nor a
run of it under way: only qkdissect's own files are ever overwritten or deleted.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write, read_json_document
from qkdissect.mining.checkpoints import NAME, merged_listing
from qkdissect.mining.loader import UNIT_SHIFT
from qkdissect.mining.result import FORMAT, FORMAT_VERSION
from qkdissect.mining.state import RunningStats, TopK, state_tensors
from qkdissect.outputs import OutputFolder, output_files

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["MAX_BAD_IN_INDEX", "MiningFolder", "add_sheets", "save_atlas", "stage_results"]

INDEX = "mined.json"
TIMES = "run-times.json"  # staged, never moved: the times of the mining pass, merged into mined.json
MAX_BAD_IN_INDEX = 1000


class MiningFolder:
    """``out`` of one mining run: :attr:`stage` (new files), :attr:`checkpoints`, and the finished files."""

    def __init__(self, out: str | os.PathLike):
        self.folder = OutputFolder(out, FORMAT, INDEX, noun="mining run")
        self.out = self.folder.out
        self.stage = self.folder.staging
        self.checkpoints = self.out / "checkpoint"

    def index(self) -> dict[str, Any] | None:
        """The finished run's mined.json, or None; one QKDissectError when it is there but unreadable."""
        path = self.out / INDEX
        if not path.exists():
            return None
        return read_json_document(path, missing=f"{self.out} is not a mining folder",
                                  remedy=f"delete {self.out} and mine again (it is not a finished run)",
                                  kind=FORMAT, max_version=FORMAT_VERSION)

    def running(self) -> bool:
        """A run is under way (or was killed): staged files or checkpoints."""
        return self.stage.is_dir() or (self.checkpoints.is_dir() and any(NAME.match(p.name) for p in
                                                                         self.checkpoints.iterdir()))

    def check(self, resume: bool) -> None:
        """Refuse, before any work, an ``out`` that is a file, that holds a run when ``resume`` is off, or that is
        not ours (:meth:`qkdissect.outputs.OutputFolder.check`)."""
        if self.out.exists() and not self.out.is_dir():
            raise QKDissectError(f"--out {self.out} is a file; give a folder for the mining run.")
        if not resume and ((self.out / INDEX).exists() or self.running()):
            raise QKDissectError(f"{self.out} already holds a mining run; pass --resume to continue it, or choose "
                                 "another --out folder.")
        if resume and (self.out / INDEX).exists():
            self.index()
            return
        self.folder.check(replace=False)

    def claim(self) -> None:
        """Take the folder for this run (journal in the staging folder), keeping what an interrupted run staged;
        files a killed :meth:`finish` had moved into place go back to the staging folder."""
        self.folder.claim(replace=False, resume=True)
        for relative in sorted(self.folder.owned):
            target, staged = self.out / relative, self.stage / relative
            if target.is_file() and not target.is_symlink() and not staged.exists():
                staged.parent.mkdir(parents=True, exist_ok=True)
                os.replace(target, staged)

    def staged(self, relative: str) -> Path | None:
        """Where a staged file of this run is, or None."""
        path = self.stage / relative
        return path if path.is_file() else None

    def staged_meta(self) -> dict[str, Any] | None:
        """The index document stored with a staged final state (None when the state is not staged yet)."""
        path = self.staged("mined.safetensors")
        if path is None:
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["meta"])
        except Exception:  # noqa: BLE001 — an older or foreign file: not a state this run can finish from
            return None
        return meta if isinstance(meta, dict) else None

    def save_times(self, times: dict[str, Any]) -> None:
        self.stage.mkdir(parents=True, exist_ok=True)
        atomic_write(self.stage / TIMES, lambda p: p.write_text(json.dumps(times)))

    def load_times(self) -> dict[str, Any]:
        try:
            times = json.loads((self.stage / TIMES).read_text())
        except (OSError, ValueError):
            return {}
        return times if isinstance(times, dict) else {}

    def finish(self, document: dict[str, Any]) -> Path:
        """Move every staged file into place (checkpoints must be gone), write mined.json last, drop the stage."""
        if self.checkpoints.exists():
            raise QKDissectError("internal: finish() while checkpoints remain.")
        for path in list(self.stage.rglob("*")):  # a kill can leave half-written files: never move them
            if path.is_file() and (path.name.endswith(".tmp") or path == self.stage / TIMES):
                path.unlink()
        return self.folder.finish(document)

    def discard(self) -> None:
        """Remove a leftover staging folder of a finished run (a kill after mined.json was written)."""
        if self.stage.is_dir() and not self.stage.is_symlink() and output_files(self.out, INDEX) is not None:
            shutil.rmtree(self.stage)


def _remap(image: torch.Tensor, packed: list[int], ordinals: list[int]) -> torch.Tensor:
    """Packed ids (unit·2³² + position) -> ordinals in images.txt; −1 stays −1."""
    if not packed:
        return image.clone()
    keys = torch.tensor(packed, dtype=torch.int64)
    values = torch.tensor(ordinals, dtype=torch.int64)
    position = torch.searchsorted(keys, image.clamp_min(0))
    position = position.clamp_max(len(packed) - 1)
    if bool(((keys[position] != image) & (image >= 0)).any()):
        raise QKDissectError("internal: a top-k image is missing from the sample listings.")
    return torch.where(image >= 0, values[position], image)


def stage_results(folder: MiningFolder, listings: Iterable[tuple[str, int]], topk: TopK, stats: RunningStats,
                  meta: dict[str, Any]) -> tuple[TopK, dict[str, Any]]:
    """Write images.txt, bad_images.log and mined.safetensors into the stage (see the module docstring) from the
    checkpoints' listings; returns the top-k with ordinals and ``meta`` completed with counts and bad samples."""
    from qkdissect.files import safetensors_bytes

    referenced = sorted(set(int(i) for i in torch.unique(topk.image).tolist() if i >= 0))
    wanted, ordinals = iter(referenced), []
    target = next(wanted, None)
    n_images, n_bad, bad_first = 0, 0, []
    folder.stage.mkdir(parents=True, exist_ok=True)

    def write_lists(images_path: Path, bad_path: Path) -> None:
        nonlocal n_images, n_bad, target
        with open(images_path, "w", encoding="utf-8") as images, open(bad_path, "w", encoding="utf-8") as bad:
            for unit, position, ident, reason in merged_listing(folder.checkpoints, listings):
                packed = (unit << UNIT_SHIFT) | position
                if target is not None and target < packed:
                    raise QKDissectError(f"internal: top-k image {target} is not in the sample listings.")
                if target == packed:
                    ordinals.append(n_images)
                    target = next(wanted, None)
                images.write(ident.replace("\n", " ") + "\n")
                n_images += 1
                if reason is not None:
                    n_bad += 1
                    bad.write(f"{ident}\t{reason}".replace("\n", " ") + "\n")
                    if len(bad_first) < MAX_BAD_IN_INDEX:
                        bad_first.append({"path": ident, "reason": reason})

    bad_tmp = folder.stage / "bad_images.log.tmp"
    atomic_write(folder.stage / "images.txt", lambda p: write_lists(p, bad_tmp))
    os.replace(bad_tmp, folder.stage / "bad_images.log")
    if target is not None or len(ordinals) != len(referenced):
        raise QKDissectError("internal: some top-k images are not in the sample listings.")
    topk = TopK(scores=topk.scores, image=_remap(topk.image, referenced, ordinals), query_pos=topk.query_pos,
                key_pos=topk.key_pos, maps=topk.maps)
    meta = {**meta, "n_images": n_images, "n_processed": int(stats.images), "n_bad": n_bad, "bad_images": bad_first}
    data = safetensors_bytes(state_tensors(topk, stats, exact=False),
                             {"format": FORMAT, "meta": json.dumps(meta, default=str)})
    atomic_write(folder.stage / "mined.safetensors", lambda p: p.write_bytes(data))
    return topk, meta


def save_atlas(atlas: ModeAtlas, folder: Path) -> None:
    """``atlas.save(folder)`` with the safetensors header in a fixed order, so that the file is the same bytes in
    every process (a resumed run writes it again)."""
    from qkdissect.files import canonical_safetensors

    atlas.save(folder)
    for path in folder.glob("*.safetensors"):
        data = canonical_safetensors(path.read_bytes())
        atomic_write(path, lambda p, data=data: p.write_bytes(data))


def add_sheets(directory: str | os.PathLike, *, workers: int = 0, progress=None) -> Path:
    """Draw the contact sheets a finished mining run does not have yet (mined with ``sheets=False``, or
    interrupted while adding them) and record them in its mined.json; returns the index path.

    The sheets are staged, then every file of the run is staged with them and :meth:`MiningFolder.finish` puts
    them back in place with the new index written last; a kill at any point is finished by running this again.
    """
    from qkdissect.mining.result import load_mined
    from qkdissect.mining.sheets import draw_sheets

    folder = MiningFolder(directory)
    if not (folder.out / INDEX).exists():
        raise QKDissectError(f"{folder.out} holds no finished mining run (no {INDEX}); finish it with "
                             "`qkdissect mine ... --resume` first.")
    if folder.checkpoints.exists():
        raise QKDissectError(f"{folder.out} has a mining run under way (checkpoint/); finish it with --resume first.")
    result = load_mined(folder.out)
    document = dict(result.meta)
    folder.folder.claim(replace=True, resume=True)
    entries = draw_sheets(result, folder.stage, progress=progress, workers=workers)
    for relative in sorted(folder.folder.owned - {INDEX}):
        target, staged = folder.out / relative, folder.stage / relative
        if target.is_file() and not target.is_symlink() and not staged.exists():
            staged.parent.mkdir(parents=True, exist_ok=True)
            os.replace(target, staged)
    document["sheets"] = entries
    return folder.finish({key: value for key, value in document.items() if key not in ("files", "format")} |
                         {"format": FORMAT})
