"""The one progress-callback type of qkdissect.

Every long-running library function takes ``progress: ProgressFn | None`` and calls
``progress(stage, done, total)``: ``stage`` names the work ("mining", "sheets", "pages", ...),
``done`` counts the items finished so far (absolute, not an increment) out of ``total``.
The command line turns these calls into rich progress bars (``qkdissect.commands.common``).
"""

from __future__ import annotations

from typing import Callable, Optional

__all__ = ["ProgressFn", "report"]

ProgressFn = Callable[[str, int, int], None]


def report(progress: Optional[ProgressFn], stage: str, done: int, total: int) -> None:
    """Call ``progress(stage, done, total)`` when a callback was given."""
    if progress is not None:
        progress(stage, done, total)
