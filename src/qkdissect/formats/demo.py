"""``qkdissect-demo`` (demo.json in a ``qkdissect demo`` folder), version 1: the settings of the run and the index
file of each part (atlas, world, maps, mined, oddoneout, preference, report), each a qkdissect output folder."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import PositiveInt

from qkdissect.formats import Document

__all__ = ["DEMO_FORMAT", "DEMO_INDEX", "DemoDocument"]

DEMO_FORMAT, DEMO_INDEX = "qkdissect-demo", "demo.json"


class DemoDocument(Document):
    what: ClassVar[str] = "qkdissect demo index"
    format: Literal["qkdissect-demo"]
    format_version: PositiveInt
    model: str
    quick: bool
    images: PositiveInt
    odd_images: PositiveInt
    seed: int
    parts: dict[str, str]
