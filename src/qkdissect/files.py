"""Small file helpers: atomic writes, JSON."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "canonical_safetensors", "library_versions", "read_json_document", "safetensors_bytes",
           "timestamp", "write_json"]


def timestamp(pattern: str = "%Y-%m-%dT%H:%M:%S%z") -> str:
    """The current time formatted with ``pattern``; with ``SOURCE_DATE_EPOCH`` set (reproducible builds), that time
    in UTC instead, so that two runs write identical files."""
    import time

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.strip().isdigit():
        return time.strftime(pattern, time.gmtime(int(epoch)))
    return time.strftime(pattern)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    text = json.dumps(data, indent=1, default=str)
    return atomic_write(path, lambda p: p.write_text(text))


def canonical_safetensors(data: bytes) -> bytes:
    """A safetensors file with its JSON header written in sorted key order.

    The safetensors library writes the ``__metadata__`` entries in hash order, which changes from process to
    process; the same tensors and metadata then give different bytes. Re-ordering the header (tensor data and
    offsets unchanged) makes the file a function of its content alone.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with the header in a fixed order (:func:`canonical_safetensors`)."""
    from safetensors.torch import save

    return canonical_safetensors(save(tensors, metadata=metadata))


def read_json_document(path: str | os.PathLike, *, missing: str, remedy: str, kind: str | None = None,
                       key: str = "format", max_version: int | None = None) -> dict[str, Any]:
    """Read a JSON index written by qkdissect, or raise one QKDissectError that says what to do.

    ``missing``: what a missing file means ("DIR is not an atlas folder"); ``remedy``: how to get a good
    file ("re-run `qkdissect dissect`"); ``kind``: the value ``document[key]`` must have;
    ``max_version``: the newest ``format_version`` this qkdissect reads.
    """
    from qkdissect.errors import QKDissectError

    path = Path(path)
    if not path.is_file():
        raise QKDissectError(f"{path} not found: {missing}. {remedy[:1].upper()}{remedy[1:]}.")
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QKDissectError(f"{path} is corrupt ({error}); {remedy}.") from None
    if not isinstance(document, dict):
        raise QKDissectError(f"{path} is corrupt (not a JSON object); {remedy}.")
    if kind is not None and document.get(key) != kind:
        raise QKDissectError(f"{path} is not a {kind} file ({key} {document.get(key)!r}).")
    if max_version is not None and int(document.get("format_version", -1)) > max_version:
        raise QKDissectError(f"{path} has format version {document.get('format_version')}, newer than this "
                             f"qkdissect reads ({max_version}); upgrade qkdissect.")
    return document


def library_versions(required: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the libraries that shape a result: qkdissect, python, torch, numpy, the ``required`` libraries
    (imported if need be), and the installed timm / transformers / safetensors / scipy / matplotlib / pillow.

    The optional ones are looked up as installed distributions, not as "imported so far", so that the same command
    in the same environment records the same versions however it was started (a rerun writes identical files).
    """
    import importlib
    import platform

    from qkdissect._version import __version__

    versions = {"qkdissect": __version__, "python": platform.python_version()}
    for name in ("torch", "numpy", *required):
        versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
    for name, distribution in (("timm", "timm"), ("transformers", "transformers"), ("safetensors", "safetensors"),
                               ("scipy", "scipy"), ("matplotlib", "matplotlib"), ("pillow", "pillow")):
        if name not in versions and (version := _installed_version(distribution)) is not None:
            versions[name] = version
    return versions


@functools.lru_cache(maxsize=None)
def _installed_version(distribution: str) -> str | None:
    """The installed distribution's version, or None (read once per process: ~2 ms each from its metadata)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
