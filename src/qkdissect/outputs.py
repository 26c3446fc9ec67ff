"""Ownership of output folders: a command deletes or overwrites only the files it wrote itself.

Every qkdissect output folder ``OUT`` has one *index*: a JSON object (``atlas.json``, ``report.json``,
``manifest.json``, …) whose ``"format"`` is the folder's qkdissect format tag and whose ``"files"`` lists, as
relative POSIX paths, every other file the command wrote there. :class:`OutputFolder` keeps these rules:

* **Claim.** ``--out`` that is a file, or that cannot be created or written, is refused. A folder that is not empty
  and has no index of this format (nor an unfinished run of it, below) is refused: nothing in it is touched. A
  folder that holds a finished output of this format is replaced only when the caller allows it (a command's
  ``--overwrite``, or commands whose documented behaviour is to rebuild their own output).
* **Staging.** New files are written into ``OUT/.qkdissect-tmp/`` (:attr:`OutputFolder.staging`). Only
  :meth:`OutputFolder.finish` puts them in place: it records every file it will own in a journal
  (``.qkdissect-tmp/owned.json``), removes the old index, renames the new files into place, deletes the old files
  the new output no longer has, writes the new index last and removes the staging folder. A run killed at any
  point leaves a folder that the next run recognises as its own and finishes (no temporary files remain).
* **Paths.** Only files listed in the index or the journal are ever replaced or deleted, and only when the path is
  relative, has no ``..``, resolves inside ``OUT`` and passes through no symbolic link; an index with any other
  entry is refused as a whole (nothing is deleted). Files the user added to an output folder stay; a new file that
  would replace one of them is refused.

Use::

    with OutputFolder(out, "qkdissect-report", "report.json").claim(replace=True) as folder:
        write_everything_into(folder.staging)
        folder.finish(document)          # the index: document + {"files": [...]}

or :func:`write_output` for a writer that takes a folder and returns the index document. Long runs that resume
(mining) claim with ``resume=True``, which keeps what the staging folder already holds (e.g. a checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from qkdissect.errors import QKDissectError
from qkdissect.progress import kill_point

__all__ = ["JOURNAL", "STAGING", "OutputFolder", "check_out", "check_writable", "output_files", "write_output"]

STAGING = ".qkdissect-tmp"
JOURNAL = "owned.json"


def _inside(out: Path, relative: str, what: str) -> Path:
    """``out / relative`` after checking that it is a plain relative path inside ``out`` through no symlink."""
    pure = PurePosixPath(relative) if isinstance(relative, str) else None
    if (pure is None or not relative or pure.is_absolute() or "\\" in relative or pure.as_posix() != relative
            or any(part in ("..", ".", "") for part in pure.parts) or pure.parts[0] == STAGING):
        raise QKDissectError(f"{what} lists {relative!r}, which is not a plain relative path inside {out}; qkdissect "
                             "writes no such entry, so nothing was deleted. Remove the folder yourself or choose "
                             "another --out.")
    path = out
    for part in pure.parts:
        path = path / part
        if path.is_symlink():
            raise QKDissectError(f"{what} lists {relative!r}, but {path} is a symbolic link; qkdissect never writes "
                                 "links, so nothing was deleted. Remove the folder yourself or choose another --out.")
    resolved = path.resolve()
    if resolved != out.resolve() and out.resolve() not in resolved.parents:
        raise QKDissectError(f"{what} lists {relative!r}, which resolves outside {out}; nothing was deleted.")
    return path


def _read_list(path: Path, key: str) -> list[str] | None:
    """``document[key]`` of the JSON object at ``path`` when it is a list of strings, else None."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    files = document.get(key)
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return files


class OutputFolder:
    """One output folder of format ``format`` (e.g. "qkdissect-atlas") whose index file is ``index``.

    ``noun`` names the output in messages (default: the format without "qkdissect-").
    """

    def __init__(self, out: str | os.PathLike, format: str, index: str, noun: str | None = None):
        self.out = Path(os.path.abspath(out))
        self.format, self.index = format, index
        self.noun = noun or format.removeprefix("qkdissect-")
        self.owned: set[str] = set()
        self.finished = False
        self._claimed = self._created = False

    # ----- paths --------------------------------------------------------------------------------------------
    @property
    def staging(self) -> Path:
        """Where the new files are written (moved into place by :meth:`finish`)."""
        return self.out / STAGING

    @property
    def journal(self) -> Path:
        return self.staging / JOURNAL

    # ----- claiming -----------------------------------------------------------------------------------------
    def check(self, *, replace: bool = True, flag: str | None = None) -> "OutputFolder":
        """Check, without writing anything, that this output may be written into ``out``; QKDissectError if not.

        ``replace``: a finished output of this format in ``out`` may be replaced (else refused, naming ``flag``).
        """
        check_writable(self.out, self.noun)
        if self.out.is_dir():
            self.owned = set(self._owned_files(replace, flag))
        return self

    def _owned_files(self, replace: bool, flag: str | None) -> list[str]:
        out, index = self.out, self.out / self.index
        staging = self.staging
        if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
            raise QKDissectError(f"{staging} is not a folder qkdissect made; remove it yourself or choose another "
                                 "--out.")
        journal = _read_list(self.journal, "files") if self.journal.is_file() else None
        others = [entry for entry in out.iterdir() if entry.name != STAGING]
        if not index.is_file():
            if others and journal is None:
                raise QKDissectError(
                    f"--out {out} is not empty and holds no qkdissect manifest ({self.index} listing the files "
                    f"qkdissect wrote), so it is not a previous qkdissect {self.noun}: nothing in it was touched. "
                    "Give a new or empty folder.")
            files = []
        else:
            try:
                document = json.loads(index.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                document = None
            if not isinstance(document, dict) or document.get("format") != self.format:
                found = document.get("format") if isinstance(document, dict) else None
                raise QKDissectError(
                    f"--out {out} holds {self.index} that is not a qkdissect {self.noun} manifest (format "
                    f"{found!r}, expected {self.format!r}), so it is not a previous qkdissect {self.noun}: nothing in "
                    "it was touched. Give a new or empty folder.")
            files = document.get("files")
            if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
                raise QKDissectError(
                    f"--out {out} holds a {self.noun} without the list of its files (written by an older qkdissect, "
                    "or edited); qkdissect deletes only files it knows it wrote, so nothing was touched. Remove the "
                    "folder yourself or give a new one.")
            if not replace:
                how = f"pass {flag} to replace it (only the files its {self.index} lists are removed)" if flag else \
                    "remove it yourself"
                raise QKDissectError(f"--out {out} already holds a qkdissect {self.noun}; {how}, or choose another "
                                     "--out.")
        owned = sorted(set(files) | set(journal or []))
        for relative in owned:
            _inside(out, relative, f"{index if relative in files else self.journal}")
        return owned

    def claim(self, *, replace: bool = True, resume: bool = False, flag: str | None = None) -> "OutputFolder":
        """:meth:`check`, then create ``out`` and an empty staging folder (``resume``: keep what it holds)."""
        self.check(replace=replace, flag=flag)
        self._created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.staging.is_dir() and not resume:
                shutil.rmtree(self.staging)
            self.staging.mkdir(exist_ok=True)
            self._write_journal(self.owned)
        except OSError as error:
            raise QKDissectError(f"--out {self.out} cannot be written ({error.strerror or error}); choose a folder "
                                 "you can write to.") from None
        self._claimed = True
        return self

    def _write_journal(self, files: set[str]) -> None:
        tmp = self.staging / (JOURNAL + ".tmp")
        tmp.write_text(json.dumps({"format": "qkdissect-owned-files", "files": sorted(files)}, indent=0))
        os.replace(tmp, self.journal)

    # ----- finishing ----------------------------------------------------------------------------------------
    def staged_files(self) -> list[str]:
        """Relative paths of the files written into the staging folder so far (journal excluded)."""
        found = []
        for path in sorted(self.staging.rglob("*")):
            relative = path.relative_to(self.staging).as_posix()
            if relative in (JOURNAL, JOURNAL + ".tmp") or path.is_dir() and not path.is_symlink():
                continue
            if path.is_symlink() or not path.is_file():
                raise QKDissectError(f"{path} is not a plain file; qkdissect writes only files.")
            found.append(relative)
        return found

    def finish(self, document: dict[str, Any]) -> Path:
        """Move the staged files into place and write the index ``document`` (+ ``"files"``) last."""
        if not self._claimed:
            raise QKDissectError("internal: OutputFolder.finish() before claim().")
        out = self.out
        new = self.staged_files()
        if self.index in new:
            raise QKDissectError(f"internal: {self.index} was written into the staging folder; pass it to finish().")
        for relative in new:
            target = _inside(out, relative, "this run")
            if relative not in self.owned and (target.exists() or target.is_symlink()):
                raise QKDissectError(f"--out {out} already holds {relative}, which qkdissect did not write (it is not "
                                     f"in {self.index}); move it away or choose another --out. Nothing was replaced.")
            if target.is_dir():
                raise QKDissectError(f"--out {out}: {relative} is a folder; cannot write the file of that name.")
        try:
            self._write_journal(self.owned | set(new))
            (out / self.index).unlink(missing_ok=True)
            for moved, relative in enumerate(new, start=1):
                target = out / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.staging / relative, target)
                kill_point(f"move:{self.format}", moved)
            for relative in sorted(self.owned - set(new) - {self.index}):
                _remove_file(out, relative)
            kill_point(f"index:{self.format}", 0)
            tmp = self.staging / (self.index.replace("/", "_") + ".tmp")
            tmp.write_text(json.dumps({**document, "format": self.format, "files": new}, indent=1, default=str))
            os.replace(tmp, out / self.index)
            shutil.rmtree(self.staging)
        except OSError as error:
            raise QKDissectError(f"could not write {out} ({error.strerror or error}); the previous files are kept "
                                 "where they were not yet replaced; re-run to finish.") from None
        self.owned, self.finished = set(new), True
        return out / self.index

    def discard(self) -> None:
        """Remove what this run staged (after an error); the journal stays while it records files not in the index."""
        if not self._claimed or self.finished or not self.staging.is_dir():
            return
        listed = set(output_files(self.out, self.index) or [])
        pending = {f for f in self.owned - listed if (self.out / f).exists()}
        if pending:
            for entry in self.staging.iterdir():
                if entry.name != JOURNAL:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        else:
            shutil.rmtree(self.staging, ignore_errors=True)
            if self._created and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()  # this run made the folder and leaves nothing in it

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self.finished:
            self.discard()


def check_writable(out: str | os.PathLike, noun: str = "output") -> None:
    """QKDissectError when ``out`` is a file, or neither it nor its nearest existing parent folder is writable."""
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise QKDissectError(f"--out {out} is a file; give a folder for the {noun}.")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise QKDissectError(f"--out {out}: {parent} is a file; give a folder for the {noun}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QKDissectError(f"--out {out}: {parent} is not writable; choose a folder you can write to.")
    if not out.exists():
        probe = out
        while probe.parent != parent:
            probe = probe.parent
        try:  # os.access cannot see read-only mounts (or anything, for root): try it
            probe.mkdir()
            probe.rmdir()
        except OSError as error:
            raise QKDissectError(f"--out {out} cannot be created ({error.strerror or error}); choose a folder you "
                                 "can write to.") from None


def _remove_file(out: Path, relative: str) -> None:
    """Delete one owned file and the folders it leaves empty (up to, not including, ``out``)."""
    path = out / relative
    if path.is_file() and not path.is_symlink():
        path.unlink()
    parent = path.parent
    while parent != out and parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def output_files(out: str | os.PathLike, index: str) -> list[str] | None:
    """The ``"files"`` list of ``out/index``, or None when there is no readable list."""
    path = Path(out) / index
    return _read_list(path, "files") if path.is_file() else None


def check_out(out: str | os.PathLike, format: str, index: str, *, replace: bool = True,
              flag: str | None = None) -> None:
    """Refuse a bad ``--out`` before any work is done (see :meth:`OutputFolder.check`)."""
    OutputFolder(out, format, index).check(replace=replace, flag=flag)


def write_output(out: str | os.PathLike, format: str, index: str, write: Callable[[Path], dict[str, Any]], *,
                 replace: bool = True, flag: str | None = None) -> Path:
    """Claim ``out``, call ``write(staging_folder)`` which returns the index document, and finish.

    Returns the index path.
    """
    with OutputFolder(out, format, index).claim(replace=replace, flag=flag) as folder:
        return folder.finish(write(folder.staging))
