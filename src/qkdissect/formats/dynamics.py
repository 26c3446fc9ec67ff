"""``qkdissect-dynamics`` (results.json of a ``qkdissect dynamics COMMAND`` folder, written by
``dynamics.runs.common.write_results``), version 1.

Every results.json: ``command``, ``parameters`` (the experiment's config), ``timings_seconds`` (parts and
``total``), ``versions``, and the numbers behind every figure (NaN and ±inf written as null). The commands whose
results are read back name the blocks their readers need (:data:`REQUIRED`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import PositiveInt, model_validator

from qkdissect.formats import Document

__all__ = ["DYNAMICS_FORMAT", "DYNAMICS_VERSION", "REQUIRED", "DynamicsDocument"]

DYNAMICS_FORMAT, DYNAMICS_VERSION = "qkdissect-dynamics", 1
REQUIRED = {"icl": ("definitions", "variants", "summary", "findings", "figures"),
            "metalearn": ("definitions", "systems", "concurrency_summary", "findings", "figures")}


class DynamicsDocument(Document):
    what: ClassVar[str] = "qkdissect dynamics result"
    format: Literal["qkdissect-dynamics"]
    format_version: PositiveInt
    command: str
    parameters: dict[str, Any]
    timings_seconds: dict[str, Optional[float]]
    versions: dict[str, str]
    figures: Optional[list[str]] = None

    @model_validator(mode="after")
    def _blocks(self) -> "DynamicsDocument":
        missing = [key for key in REQUIRED.get(self.command, ()) if key not in (self.model_extra or {})
                   and getattr(self, key, None) is None]
        if missing:
            raise ValueError(f"the {self.command} results lack {', '.join(missing)}")
        if "total" not in self.timings_seconds:
            raise ValueError("timings_seconds lacks 'total'")
        return self
