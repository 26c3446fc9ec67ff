"""``qkdissect-report`` (report.json in a report folder, written by ``report.build_report``), version 1.

report.json: model, n_layers, n_heads, sections, inputs, pages (relative paths of the HTML pages), n_files, bytes,
warnings, build_seconds, created, versions, files (every other file of the report).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import NonNegativeInt, PositiveInt

from qkdissect.formats import Document

__all__ = ["REPORT_FORMAT", "REPORT_VERSION", "ReportDocument"]

REPORT_FORMAT, REPORT_VERSION = "qkdissect-report", 1


class ReportDocument(Document):
    what: ClassVar[str] = "qkdissect report manifest"
    format: Literal["qkdissect-report"]
    format_version: PositiveInt
    model: Optional[str] = None
    n_layers: PositiveInt
    n_heads: PositiveInt
    sections: list[str]
    pages: list[str]
    n_files: NonNegativeInt
    bytes: NonNegativeInt
    warnings: list[str] = []
    files: Optional[list[str]] = None
