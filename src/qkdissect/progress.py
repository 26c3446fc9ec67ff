"""The one progress-callback type of qkdissect.

Every long-running library function takes ``progress: ProgressFn | None`` and calls
``progress(stage, done, total)``: ``stage`` names the work ("mining", "sheets", "pages", ...),
``done`` counts the items finished so far (absolute, not an increment) out of ``total``.
The command line turns these calls into rich progress bars (``qkdissect.commands.common``).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

__all__ = ["KILL_HOOK", "ProgressFn", "kill_point", "report", "throttled"]

ProgressFn = Callable[[str, int, int], None]
KILL_HOOK = "QKDISSECT_TEST_KILL_AT"  # test hook: "STAGE:N" makes this process SIGKILL itself at that point


def kill_point(stage: str, done: int) -> None:
    """For the kill tests: when the environment variable ``QKDISSECT_TEST_KILL_AT`` is ``f"{stage}:{done}"``, this
    process sends itself SIGKILL here (a real, uncatchable kill at a reproducible point). Does nothing otherwise."""
    if os.environ.get(KILL_HOOK) == f"{stage}:{done}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def report(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    """Call ``progress(stage, done, total)`` when a callback was given (and pass :func:`kill_point`)."""
    kill_point(stage, done)
    if progress is not None:
        progress(stage, done, total)


def throttled(progress: Optional[ProgressFn], stage: str, total: int, updates: int = 100) -> Callable[[int], None]:
    """``tick(done)`` that calls ``progress(stage, done, total)`` about ``updates`` times (and at ``done == total``).

    For loops of many cheap steps (gradient descent, training): the callback costs more than a step.
    """
    every = max(1, int(total) // max(1, int(updates)))

    def tick(done: int) -> None:
        if progress is not None and (done % every == 0 or done == total):
            progress(stage, done, total)

    return tick
