"""``qkdissect-survey`` (survey.json, written by ``qkdissect.survey``), version 1.

survey.json: ``options`` (the dissect options every model shares), ``planned`` (the list of {spec, label} the
survey covers, written at the start so a killed run resumes its own list), ``models`` (per model: spec, label,
status "done" | "failed", reason, atlas — a folder under ``atlases/`` — seconds, shapes, trend), ``files``.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

from pydantic import PositiveInt, field_validator

from qkdissect.formats import Document, Strict

__all__ = ["SURVEY_FORMAT", "SURVEY_VERSION", "PlannedModel", "SurveyDocument", "SurveyRecord"]

SURVEY_FORMAT, SURVEY_VERSION = "qkdissect-survey", 1


class SurveyRecord(Strict):
    spec: str
    label: str
    status: Literal["done", "failed"]
    reason: str = ""
    atlas: str = ""
    seconds: float = 0.0

    @field_validator("atlas")
    @classmethod
    def _inside_atlases(cls, atlas: str) -> str:
        path = PurePosixPath(atlas)
        if atlas and (path.is_absolute() or ".." in path.parts or path.parts[0] != "atlases"):
            raise ValueError(f"{atlas!r} is not a folder under atlases/ (qkdissect writes no such entry)")
        return atlas


class PlannedModel(Strict):
    spec: str
    label: str


class SurveyDocument(Document):
    what: ClassVar[str] = "survey"
    format: Literal["qkdissect-survey"]
    format_version: PositiveInt
    options: dict[str, Any]
    planned: list[PlannedModel] = []
    models: list[SurveyRecord]
