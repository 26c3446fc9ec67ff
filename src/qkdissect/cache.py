"""A small on-disk cache of JSON results that are expensive to compute and a pure function of their key.

Used for the Gaussian null (:func:`qkdissect.metrics.gaussian_null`): the bands depend only on
(d_model, d_head, samples, seed, percentile, method, sampler version), so they are computed once per
shape and reused by every later ``dissect``.

Where: ``$QKDISSECT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/qkdissect``, else ``~/.cache/qkdissect``;
one file per entry, ``<namespace>/<blake2b of the key>.json``. Set ``QKDISSECT_CACHE=0`` (or pass
``use=False``) to neither read nor write it; deleting the folder is always safe.

Never silently wrong: an entry stores its full key and a checksum of its value; an entry whose key differs
(a hash collision), whose checksum fails, or that is not valid JSON is ignored and recomputed. Safe under
concurrency: each writer writes its own temporary file (unique name) and renames it into place, so a reader
sees either no entry or a whole one, and two processes computing the same entry write the same value.
A cache that cannot be written (read-only home, full disk) is skipped without a word: the result is
computed as if there were no cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["cache_dir", "cached_json"]

FORMAT = "qkdissect-cache"


def cache_dir() -> Path:
    """The cache folder (see the module docstring); not created here."""
    explicit = os.environ.get("QKDISSECT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qkdissect"


def _enabled(use: bool | None) -> bool:
    if use is not None:
        return use
    return os.environ.get("QKDISSECT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _checksum(value: Any) -> str:
    return hashlib.blake2b(_canonical(value).encode(), digest_size=16).hexdigest()


def _read(path: Path, key: dict[str, Any]) -> Any | None:
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
        return None
    value = entry.get("value")
    if entry.get("checksum") != _checksum(value):
        return None
    return value


def _write(path: Path, key: dict[str, Any], value: Any) -> None:
    text = json.dumps({"format": FORMAT, "key": key, "value": value, "checksum": _checksum(value)}, indent=1,
                      sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # an unwritable cache is no cache


def cached_json(namespace: str, key: dict[str, Any], compute: Callable[[], Any], *, use: bool | None = None) -> Any:
    """``compute()`` (a JSON-serialisable value, a pure function of ``key``), read from the cache when present.

    ``key``: JSON-serialisable dict naming everything the value depends on (include a version of the code).
    """
    if not _enabled(use):
        return compute()
    key = json.loads(_canonical(key))  # the form it has when read back
    path = cache_dir() / namespace / f"{hashlib.blake2b(_canonical(key).encode(), digest_size=16).hexdigest()}.json"
    found = _read(path, key)
    if found is not None:
        return found
    value = compute()
    value = json.loads(_canonical(value))
    _write(path, key, value)
    return value
