"""Named points where a test can stop a real process, to kill it there (SIGKILL) and check that ``--resume``
finishes the same result. Off unless ``QKDISSECT_TEST_PAUSE_AT`` is set; then a process that reaches the
named point for the N-th time (``point`` or ``point:N``) writes its pid to ``QKDISSECT_TEST_PAUSE_FILE`` and
sleeps until it is killed. Costs one environment lookup per call when off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["PAUSE_AT", "PAUSE_FILE", "pause_point"]

PAUSE_AT = "QKDISSECT_TEST_PAUSE_AT"
PAUSE_FILE = "QKDISSECT_TEST_PAUSE_FILE"
_reached: dict[str, int] = {}


def pause_point(name: str) -> None:
    """Pause here forever if the environment asks for it (see the module docstring)."""
    spec = os.environ.get(PAUSE_AT)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] < int(count or 1):
        return
    marker = Path(os.environ.get(PAUSE_FILE, "qkdissect-paused"))
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)
    while True:
        time.sleep(3600)
