"""Parameter checks shared by the dynamics modules.

Every check raises :class:`~qkdissect.errors.QKDissectError` with a message that says
what was expected, what was given, and what to do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qkdissect.errors import QKDissectError

__all__ = ["aspect_ratio", "count", "depth", "fraction", "initial_strength", "positive", "strengths", "times",
           "unit_interval"]


def _fmt(value: Any) -> str:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return repr(arr.item())
    if arr.size > 8:
        return f"array of shape {arr.shape}"
    return repr(arr.tolist())


def strengths(value: Any, name: str = "strengths", *, allow_zero: bool = False) -> np.ndarray:
    """Return ``value`` as a 1-D float64 array of positive (or non-negative) finite numbers."""
    try:
        arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise QKDissectError(
            f"{name}: expected a list of numbers, got {value!r}. Pass e.g. [5, 4, 3, 2, 1]."
        ) from exc
    if arr.ndim != 1 or arr.size == 0:
        raise QKDissectError(
            f"{name}: expected a non-empty 1-D list of numbers, got {_fmt(value)}. "
            "Pass e.g. [5, 4, 3, 2, 1]."
        )
    if not np.all(np.isfinite(arr)):
        raise QKDissectError(f"{name}: expected finite numbers, got {_fmt(arr)}. Remove NaN/inf entries.")
    bad = arr < 0 if allow_zero else arr <= 0
    if np.any(bad):
        kind = "non-negative" if allow_zero else "positive"
        raise QKDissectError(
            f"{name}: every value must be {kind} (a singular value / mode strength), got {_fmt(arr)}. "
            "Use the absolute values; the sign of a mode belongs to its singular vectors."
        )
    return arr


def _float(value: Any, name: str, expected: str) -> float:
    """``float(value)``, or a QKDissectError "NAME: expected EXPECTED, got VALUE"."""
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise QKDissectError(f"{name}: expected {expected}, got {value!r}.") from exc


def positive(value: Any, name: str) -> float:
    """Return ``value`` as a positive finite float."""
    x = _float(value, name, "a positive number")
    if not np.isfinite(x) or x <= 0:
        raise QKDissectError(f"{name}: expected a positive finite number, got {value!r}. Pass a value > 0.")
    return x


def depth(value: Any) -> int:
    """Return the number of weight matrices N as an int >= 1."""
    if (
        isinstance(value, bool)
        or not _is_number(value)
        or not float(value).is_integer()
        or int(value) < 1
    ):
        raise QKDissectError(
            f"depth: expected an integer number of weight matrices >= 1, got {value!r}. "
            "Use depth=1 for a single linear map, 2 for one hidden layer."
        )
    return int(value)


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def initial_strength(a0: Any, s: np.ndarray) -> np.ndarray:
    """Check 0 < a0 < s (elementwise) and return a0 broadcast to the shape of ``s``."""
    try:
        a = np.broadcast_to(np.asarray(a0, dtype=np.float64), s.shape).copy()
    except (TypeError, ValueError) as exc:
        raise QKDissectError(
            f"a0: expected a number or one number per mode ({s.size}), got {a0!r}."
        ) from exc
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise QKDissectError(
            f"a0: the initial mode strength must be positive (a mode that starts at 0 is never learned), "
            f"got {_fmt(a0)}. Use a small value such as 1e-6."
        )
    if np.any(a >= s):
        raise QKDissectError(
            f"a0: the initial strength must be smaller than every target strength s (the mode is then "
            f"learned, a0 < s), got a0={_fmt(a0)} for s={_fmt(s)}. Use a small value such as 1e-6."
        )
    return a


def aspect_ratio(value: Any) -> float:
    """Check 0 < A <= 1 for A = N_o / N_i."""
    a = positive(value, "aspect_ratio")
    if a > 1:
        raise QKDissectError(
            f"aspect_ratio: the random-matrix formulas here need A = N_o/N_i <= 1, got {a!r}. "
            "Transpose the problem (swap the number of outputs and inputs) so that N_o <= N_i."
        )
    return a


def fraction(value: Any, name: str = "fraction") -> float:
    """Check 0 < f < 1."""
    f = positive(value, name)
    if f >= 1:
        raise QKDissectError(f"{name}: expected a number strictly between 0 and 1, got {value!r}.")
    return f


def unit_interval(value: Any, name: str) -> float:
    """Check 0 <= x <= 1."""
    x = _float(value, name, "a number in [0, 1]")
    if not (0.0 <= x <= 1.0):
        raise QKDissectError(f"{name}: expected a number in [0, 1], got {value!r}.")
    return x


def count(value: Any, name: str, minimum: int = 1) -> int:
    """Check an integer count >= minimum."""
    if isinstance(value, bool) or not _is_number(value) or not float(value).is_integer():
        raise QKDissectError(f"{name}: expected an integer >= {minimum}, got {value!r}.")
    n = int(value)
    if n < minimum:
        raise QKDissectError(f"{name}: expected an integer >= {minimum}, got {value!r}.")
    return n


def times(t: Any) -> np.ndarray:
    """Return non-negative finite times as a 1-D float64 array."""
    arr = np.atleast_1d(np.asarray(t, dtype=np.float64))
    if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise QKDissectError(f"t: expected a 1-D array of times >= 0 (epochs), got {_fmt(t)}.")
    return arr
