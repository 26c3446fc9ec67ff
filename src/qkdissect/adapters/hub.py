"""Weights named by the Hugging Face hub: taken from the local cache first, fetched only when the hub is reachable.

A name that is neither in the local cache nor reachable must end quickly with one QKDissectError, not with a
minute of retries. So, before any download is attempted:

* :func:`cached_file` looks the file up in the hub cache (``HF_HOME`` / ``HF_HUB_CACHE``, laid out as
  ``models--ORG--NAME/{refs/main, snapshots/HASH/FILE}``) without touching the network;
* :func:`hub_offline` says whether offline mode is on (``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``);
* :func:`probe_hub` opens one TCP connection to the hub (or to the HTTPS proxy) with a short timeout,
  once per process;
* :func:`quiet_hub` silences the retry messages of huggingface_hub while a download runs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlsplit

from qkdissect.errors import QKDissectError

__all__ = ["PROBE_TIMEOUT", "cache_folder", "cached_file", "hub_offline", "hub_reachable", "probe_hub", "quiet_hub",
           "require_hub", "split_revision"]

PROBE_TIMEOUT = 3.0  # seconds for the one connection attempt of hub_reachable
_TRUE = {"1", "on", "yes", "true"}


def split_revision(repo: str) -> tuple[str, str | None]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``; ``'org/name'`` -> ``('org/name', None)``."""
    name, _, revision = repo.partition("@")
    return name, revision or None


def cache_folder() -> Path:
    """The hub cache in use (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_file(repo: str, filenames: Sequence[str]) -> Path | None:
    """The first of ``filenames`` found in the local hub cache for ``repo`` (``org/name[@revision]``), or None.

    Reads only the cache folder (no network).
    """
    from huggingface_hub import try_to_load_from_cache

    repo_id, revision = split_revision(repo)
    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
        except Exception:  # noqa: BLE001 — a malformed id or cache entry is simply "not cached"
            found = None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def hub_offline() -> bool:
    """True when the user switched the hub off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``, read now or at
    huggingface_hub's import)."""
    if any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)  # huggingface_hub ≥ 1.0; before: the constant
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def _probe_target() -> tuple[str, int]:
    """(host, port) that a hub request would connect to first: the HTTPS proxy if one is set, else the hub."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    no_proxy = [part.strip().lstrip(".") for part in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy")
                                                      or "").split(",") if part.strip()]
    if "*" in no_proxy or any(host == part or host.endswith("." + part) for part in no_proxy):
        return host, port
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(name)
        if proxy:
            parsed = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if parsed.hostname:
                return parsed.hostname, parsed.port or 8080
    return host, port


@lru_cache(maxsize=1)
def probe_hub(timeout: float = PROBE_TIMEOUT) -> str | None:
    """Open one TCP connection to the hub (or the HTTPS proxy): None when it opens within ``timeout`` seconds,
    else why not ("huggingface.co:443: [Errno -2] Name or service not known", "…: no answer within 3 s").

    Name resolution runs in a daemon thread, so a hanging DNS lookup also ends after ``timeout``. The answer is
    kept for the life of the process (``probe_hub.cache_clear()`` forgets it).
    """
    host, port = _probe_target()
    result: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as error:
            result.append(f"{host}:{port}: {error}")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"{host}:{port}: no answer within {timeout:g} s"


def hub_reachable() -> bool:
    """Whether the hub (or the HTTPS proxy) accepts a connection; see :func:`probe_hub`."""
    return probe_hub() is None


def require_hub(what: str, remedy: str) -> None:
    """Raise the one-line QKDissectError for ``what`` (e.g. "timm:NAME (weights from hub repo timm/NAME)")
    when the hub is switched off or unreachable; return when a download may be tried."""
    if hub_offline():
        why = "offline mode is on (HF_HUB_OFFLINE=1)"
    else:
        problem = probe_hub()
        if problem is None:
            return
        why = f"the hub cannot be reached ({problem})"
    raise QKDissectError(f"{what}: not in the local Hugging Face cache ({cache_folder()}), and {why}. {remedy}")


@contextmanager
def quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's and transformers' retry / download warnings (errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers", "timm")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
