"""What every ``qkdissect dynamics`` experiment shares: its results file, output folder, seeds and clock.

Every runner writes ``OUT/results.json``::

    {"format": "qkdissect-dynamics", "format_version": 1, "command": "saxe" | "depth-sweep" | …,
     "parameters": {…the experiment's config…}, …the numbers behind every figure…,
     "timings_seconds": {…, "total"}, "load_average": {"start", "end"}, "torch_threads",
     "versions": {library: version}}

NaN and ±inf are written as ``null``. :func:`load_results` reads it back (and refuses other files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from qkdissect.dynamics.incontext.setting import concurrency
from qkdissect.errors import QKDissectError
from qkdissect.files import atomic_write, library_versions, read_json_document

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RunClock",
    "config_dict",
    "derive_seeds",
    "jsonable",
    "load_average",
    "load_results",
    "output_folder",
    "recovery_curve",
    "subsample",
    "versions",
    "write_results",
]

FORMAT = "qkdissect-dynamics"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    """Library versions recorded in every results.json (scipy and matplotlib always included)."""
    return library_versions(required=("scipy", "matplotlib"))


def jsonable(x: Any) -> Any:
    """``x`` with numpy arrays / scalars as lists / numbers, tuples as lists, non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if np.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def write_results(out: Path, command: str, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``out/results.json`` (format tag, version, command, ``results``, versions), checked against
    :class:`qkdissect.formats.dynamics.DynamicsDocument`; return what was written."""
    from qkdissect.formats import validated
    from qkdissect.formats.dynamics import DynamicsDocument

    data = jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, "command": command, **results,
                     "versions": versions()})
    validated(DynamicsDocument, data, out / "results.json", "this is a bug in qkdissect: please report it")
    text = json.dumps(data, indent=1, allow_nan=False)
    atomic_write(out / "results.json", lambda path: path.write_text(text))
    return data


def load_results(folder: str | Path, command: str) -> dict[str, Any]:
    """Read the results.json of a ``qkdissect dynamics COMMAND`` folder; one QKDissectError naming the file and the
    field if it is not one (schema: :mod:`qkdissect.formats.dynamics`)."""
    from qkdissect.formats import read_document
    from qkdissect.formats.dynamics import DynamicsDocument

    path = Path(folder) / "results.json"
    remedy = f"re-run `qkdissect dynamics {command}`"
    document = read_json_document(path, missing=f"{folder} is not a `qkdissect dynamics {command}` folder",
                                  remedy=remedy, max_version=FORMAT_VERSION)
    if document.get("format") != FORMAT or document.get("command") != command:
        raise QKDissectError(
            f"{path} is not the result of `qkdissect dynamics {command}` (format {document.get('format')!r}, "
            f"command {document.get('command')!r}); {remedy}."
        )
    document, _ = read_document(path, DynamicsDocument, missing=f"{folder} is not a `qkdissect dynamics {command}` "
                                "folder", remedy=remedy, max_version=FORMAT_VERSION)
    return document


def output_folder(out: str | Path) -> Path:
    """``out`` as a directory (created if missing), or a QKDissectError that says why not."""
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QKDissectError(
            f"--out: cannot create directory {str(p)!r} ({exc}). Choose a writable path."
        ) from exc
    return p


def config_dict(config: Any) -> dict[str, Any]:
    """The fields of a config dataclass as a dictionary (for ``results["parameters"]``)."""
    return dataclasses.asdict(config)


def subsample(n: int, k: int = 1500) -> np.ndarray:
    """About ``k`` evenly spaced indices of ``range(n)``, always including the last."""
    idx = np.arange(0, n, max(1, n // k))
    return idx if idx[-1] == n - 1 else np.append(idx, n - 1)


def derive_seeds(seed: int, names: Sequence[str]) -> dict[str, int]:
    """One independent seed per name, all derived from ``seed`` (recorded in results.json)."""
    g = np.random.default_rng(seed)
    return {name: int(g.integers(2**31 - 1)) for name in names}


def load_average() -> list[float]:
    """The machine's 1/5/15-minute load averages ([] where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


class RunClock:
    """Wall-clock seconds of the parts of a run, with the machine load at its start and end."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.load_start = load_average()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the block as ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - t0

    def summary(self) -> dict[str, Any]:
        """``timings_seconds`` (parts and total), ``load_average`` (start, end) and ``torch_threads``."""
        return {"timings_seconds": {**self.seconds, "total": time.perf_counter() - self.started},
                "load_average": {"start": self.load_start, "end": load_average()},
                "torch_threads": torch.get_num_threads()}


def recovery_curve(steps: np.ndarray, per_task: np.ndarray, strengths: np.ndarray) -> dict[str, Any]:
    """Mean and standard error over tasks of ``per_task`` ``(T, B, r)`` at ``steps`` ``(T,)``, with its
    concurrency block (:func:`~qkdissect.dynamics.incontext.setting.concurrency`)."""
    mean = per_task.mean(1)
    b = per_task.shape[1]
    sem = per_task.std(1, ddof=1) / np.sqrt(b) if b > 1 else np.zeros_like(mean)
    return {"x": steps, "mean": mean, "sem": sem, "concurrency": concurrency(steps, mean, strengths).to_dict()}
