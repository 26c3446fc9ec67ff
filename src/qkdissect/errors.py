"""The one exception type of qkdissect."""

from __future__ import annotations

__all__ = ["QKDissectError"]


class QKDissectError(Exception):
    """Raised for any problem a user can fix: bad input, unknown model, corrupt file.

    The message says what was expected, what was given, and what to do about it.
    The command-line interface prints it without a traceback and exits non-zero.
    """
