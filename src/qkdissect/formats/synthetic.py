"""The data-set indexes qkdissect generates: ``qkdissect-oddoneout`` (manifest.json of an odd-one-out folder, written
by ``synthetic.generate_oddoneout``, version 1) and ``qkdissect-world`` (world.json of a world image folder, written
by ``synthetic.write_world_images``, version 1). The folder layouts are described in those modules."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from qkdissect.formats import Document, Strict

__all__ = ["ODDONEOUT_FORMAT", "WORLD_FORMAT", "OddOneOutManifest", "WorldDocument"]

ODDONEOUT_FORMAT, WORLD_FORMAT = "qkdissect-oddoneout", "qkdissect-world"


class SceneObjectRecord(Strict):
    shape: str
    colour: str
    radius: float
    angle: float
    center: tuple[float, float]
    box: tuple[int, int, int, int]


class OddOneOutImage(Strict):
    name: str = Field(min_length=1)
    feature: str
    target: SceneObjectRecord
    distractors: list[SceneObjectRecord]


class OddOneOutManifest(Document):
    what: ClassVar[str] = "qkdissect odd-one-out manifest"
    format: Literal["qkdissect-oddoneout"]
    format_version: PositiveInt
    seed: int
    feature: str
    size: tuple[PositiveInt, PositiveInt]
    objects: tuple[PositiveInt, PositiveInt]
    noise: float
    radius: Optional[float] = None
    n: PositiveInt
    features: dict[str, NonNegativeInt]
    images: list[OddOneOutImage]

    @model_validator(mode="after")
    def _count(self) -> "OddOneOutManifest":
        if len(self.images) != self.n:
            raise ValueError(f"n is {self.n} but {len(self.images)} images are listed")
        return self


class WorldImage(Strict):
    file: str = Field(min_length=1)
    index: NonNegativeInt
    labels: dict[str, str]
    objects: list[dict[str, Any]]


class WorldDocument(Document):
    what: ClassVar[str] = "qkdissect world index"
    format: Literal["qkdissect-world"]
    version: PositiveInt
    seed: int
    n: PositiveInt
    config: dict[str, Any]
    tasks: dict[str, list[str]]
    images: list[WorldImage]

    @model_validator(mode="after")
    def _count(self) -> "WorldDocument":
        if len(self.images) != self.n:
            raise ValueError(f"n is {self.n} but {len(self.images)} images are listed")
        return self
