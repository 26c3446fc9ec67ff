"""The one progress-callback type of qkdissect.

Every long-running library function takes ``progress: ProgressFn | None`` and calls
``progress(stage, done, total)``: ``stage`` names the work ("mining", "sheets", "pages", ...),
``done`` counts the items finished so far (absolute, not an increment) out of ``total``.
The command line turns these calls into rich progress bars (``qkdissect.commands.common``).
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["ProgressFn", "report", "throttled"]

ProgressFn = Callable[[str, int, int], None]


def report(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    """Call ``progress(stage, done, total)`` when a callback was given."""
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
