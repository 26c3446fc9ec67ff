"""The file formats qkdissect writes and reads, one module per format, each a pydantic schema with its format tag
and version: :mod:`.atlas`, :mod:`.compare`, :mod:`.views` (maps, rank), :mod:`.preference`, :mod:`.report`,
:mod:`.synthetic` (odd-one-out manifest, world.json), :mod:`.mined`, :mod:`.dynamics`, :mod:`.demo`, :mod:`.survey`.

Every reader goes through :func:`read_document` (file present, JSON object, format tag, version, then the schema)
and checks its tensors with :func:`check_shapes`; a problem is one QKDissectError naming the file and the field.
Writers validate their document with :func:`validated` before writing it, so that what is written can be read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from qkdissect.errors import QKDissectError

__all__ = ["Document", "Strict", "check_shapes", "field_path", "finite_or_none", "read_document", "validated"]

M = TypeVar("M", bound=BaseModel)


class Document(BaseModel):
    """A qkdissect JSON document: known keys are checked, other keys (provenance, notes) are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)


class Strict(BaseModel):
    """A nested record whose keys are all known (extra keys kept, types checked)."""

    model_config = ConfigDict(extra="allow", frozen=True)


def field_path(location: Sequence[Any]) -> str:
    """('heads', 3, 'cosines', 2) -> 'heads[3].cosines[2]'."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def _problem(error: ValidationError) -> str:
    first = error.errors()[0]
    given = repr(first.get("input"))
    given = given if len(given) <= 60 else given[:57] + "..."
    more = error.error_count() - 1
    text = f"field {field_path(first['loc'])!s}: {first['msg']}"
    if first.get("type") != "missing":
        text += f" (got {given})"
    return text + (f"; and {more} more problem{'s' if more > 1 else ''}" if more > 0 else "")


def validated(model: type[M], document: Mapping[str, Any], path: str | os.PathLike, remedy: str) -> M:
    """``model`` validated from ``document``; QKDissectError "PATH: field F: what is wrong; REMEDY." otherwise."""
    try:
        return model.model_validate(document)
    except ValidationError as error:
        what = getattr(model, "what", model.__name__)
        raise QKDissectError(f"{path} is not a readable {what}: {_problem(error)}; {remedy}.") from None


def read_document(path: str | os.PathLike, model: type[M], *, missing: str, remedy: str, kind: str | None = None,
                  key: str = "format", max_version: int | None = None, version_key: str = "format_version",
                  ) -> tuple[dict[str, Any], M]:
    """Read a JSON index (see ``files.read_json_document``: present, JSON, object, format tag, version) and
    validate it with ``model``. Returns (the raw document, the validated model)."""
    from qkdissect.files import read_json_document

    path = Path(path)
    document = read_json_document(path, missing=missing, remedy=remedy, kind=kind, key=key)
    if max_version is not None:
        version = document.get(version_key)
        if not isinstance(version, int) or isinstance(version, bool):
            raise QKDissectError(f"{path} is not readable: field {version_key}: expected an integer version, got "
                                 f"{version!r}; {remedy}.")
        if version > max_version:
            raise QKDissectError(f"{path} has format version {version}, newer than this qkdissect reads "
                                 f"({max_version}); upgrade qkdissect.")
    return document, validated(model, document, path, remedy)


def check_shapes(path: str | os.PathLike, found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                 *, optional: Sequence[str] = (), exact: bool = True, remedy: str = "") -> None:
    """QKDissectError naming the tensor when a tensor of ``expected`` is missing (unless ``optional``) or has
    another shape; with ``exact`` also for tensors in ``found`` that ``expected`` does not name."""
    tail = f"; {remedy}" if remedy else ""
    for name, shape in expected.items():
        if name not in found:
            if name in optional:
                continue
            raise QKDissectError(f"{path} lacks the tensor {name!r} (shape {tuple(shape)} expected){tail}.")
        if tuple(found[name]) != tuple(shape):
            raise QKDissectError(f"{path}: tensor {name!r} has shape {tuple(found[name])}, but the JSON index "
                                 f"implies {tuple(shape)}{tail}.")
    if exact:
        unknown = sorted(set(found) - set(expected))
        if unknown:
            raise QKDissectError(f"{path} holds tensor(s) the JSON index does not describe: "
                                 f"{', '.join(unknown[:5])}{tail}.")


def finite_or_none(value: float | None) -> float | None:
    """JSON has no NaN: an undefined number is written as null (and read back as NaN by the readers)."""
    return value if value is None or math.isfinite(value) else None
