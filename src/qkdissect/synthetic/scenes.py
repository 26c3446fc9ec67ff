"""Procedural scenes of flat-coloured shapes with exact per-object masks.

Every object is rasterised by testing each pixel centre against the shape's geometry, and the
image is painted from exactly those masks (no anti-aliasing), so masks and pixels agree exactly.
Objects are placed without overlap (their bounding circles, plus a gap, do not intersect).

Used by the odd-one-out data (``qkdissect oddoneout``) and by the embedded model's training world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qkdissect.errors import QKDissectError

__all__ = [
    "COLOURS", "FEATURES", "SHAPES", "Scene", "SceneObject", "odd_one_out_scene", "place_objects",
    "render_scene", "shape_mask",
]

SHAPES = ("circle", "square", "triangle", "ring", "cross", "bar")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30),
    "magenta": (200, 50, 200), "cyan": (40, 200, 210), "orange": (240, 140, 30), "white": (245, 245, 245),
}
FEATURES = ("colour", "shape", "size", "orientation", "mix")


@dataclass(frozen=True)
class SceneObject:
    """One shape: ``radius`` (px, circumscribed), ``angle`` (degrees), ``center`` (row, col) in px."""

    shape: str
    colour: str
    radius: float
    angle: float
    center: tuple[float, float]

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "radius": self.radius, "angle": self.angle,
                "center": list(self.center), "box": list(self.box)}

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) bounding box of the circumscribed circle, in px."""
        r, (y, x) = self.radius, self.center
        return int(np.floor(y - r)), int(np.floor(x - r)), int(np.ceil(y + r)), int(np.ceil(x + r))


@dataclass(frozen=True)
class Scene:
    """image (H, W, 3) uint8; masks (n_objects, H, W) bool; target index or None."""

    image: np.ndarray
    masks: np.ndarray
    objects: tuple[SceneObject, ...]
    target: int | None = None
    feature: str | None = None

    @property
    def background_mask(self) -> np.ndarray:
        return ~self.masks.any(axis=0)


def shape_mask(obj: SceneObject, hw: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W) mask of pixels whose centre lies inside ``obj``."""
    if obj.shape not in SHAPES:
        raise QKDissectError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}.")
    rows, cols = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float64) + 0.5
    dy, dx = rows - obj.center[0], cols - obj.center[1]
    theta = np.deg2rad(obj.angle)
    x = np.cos(theta) * dx + np.sin(theta) * dy  # coordinates in the shape's own frame
    y = -np.sin(theta) * dx + np.cos(theta) * dy
    r = obj.radius
    if obj.shape == "circle":
        return x * x + y * y <= r * r
    if obj.shape == "square":
        half = r / np.sqrt(2)
        return (np.abs(x) <= half) & (np.abs(y) <= half)
    if obj.shape == "ring":
        rho2 = x * x + y * y
        return (rho2 <= r * r) & (rho2 >= (0.5 * r) ** 2)
    if obj.shape == "triangle":  # equilateral, apex up (−y), circumradius r
        s3 = np.sqrt(3.0)
        return (y <= r / 2) & (s3 * x - y <= r) & (-s3 * x - y <= r)
    if obj.shape == "cross":
        arm = r / 3
        return ((np.abs(x) <= arm) & (np.abs(y) <= r * 0.9)) | ((np.abs(y) <= arm) & (np.abs(x) <= r * 0.9))
    # bar: long along x, so its angle is visible
    return (np.abs(x) <= r * 0.95) & (np.abs(y) <= r * 0.28)


def place_objects(radii: list[float], hw: tuple[int, int], rng: np.random.Generator, gap: float = 2.0,
                  tries: int = 2000) -> list[tuple[float, float]]:
    """Centres (row, col) for discs of ``radii`` inside the image, pairwise ≥ r_i + r_j + gap apart."""
    centres: list[tuple[float, float]] = []
    for radius in radii:
        if not (math.isfinite(radius) and radius > 0) or 2 * (radius + 1) >= min(hw):
            raise QKDissectError(f"an object of radius {radius:g} px does not fit into a {hw[0]}×{hw[1]} image; use "
                                 f"a radius between 0 and {min(hw) / 2 - 1:g} px (smaller still for several objects).")
        for _ in range(tries):
            y = rng.uniform(radius + 1, hw[0] - radius - 1)
            x = rng.uniform(radius + 1, hw[1] - radius - 1)
            if all((y - cy) ** 2 + (x - cx) ** 2 >= (radius + r2 + gap) ** 2
                   for (cy, cx), r2 in zip(centres, radii)):
                centres.append((float(y), float(x)))
                break
        else:
            raise QKDissectError(f"could not place {len(radii)} objects of radii up to {max(radii):.1f}px without "
                                 f"overlap in a {hw[0]}×{hw[1]} image; use fewer or smaller objects, or larger images.")
    return centres


def render_scene(objects: list[SceneObject], hw: tuple[int, int], rng: np.random.Generator,
                 background: tuple[int, int, int] = (110, 110, 110), noise: float = 12.0,
                 target: int | None = None, feature: str | None = None) -> Scene:
    """Paint ``objects`` (flat colours) on a background with Gaussian pixel noise of std ``noise``."""
    height, width = hw
    grain = rng.normal(0.0, noise, (height, width, 1)) if noise > 0 else np.zeros((height, width, 1))
    image = np.clip(np.asarray(background, dtype=np.float64)[None, None, :] + grain, 0, 255)
    masks = np.zeros((len(objects), height, width), dtype=bool)
    for index, obj in enumerate(objects):
        masks[index] = shape_mask(obj, hw)
        image[masks[index]] = COLOURS[obj.colour]
    return Scene(image=image.astype(np.uint8), masks=masks, objects=tuple(objects), target=target, feature=feature)


def odd_one_out_scene(rng: np.random.Generator, hw: tuple[int, int] = (224, 224), n_objects: int = 5,
                      feature: str = "mix", radius: float | None = None, noise: float = 12.0) -> Scene:
    """One target that differs from ``n_objects − 1`` identical distractors in ``feature``.

    feature: colour | shape | size | orientation | mix (one of the four, drawn at random).
    The target is object 0 of the returned scene; radii default to ~min(hw)/14.
    """
    if feature not in FEATURES:
        raise QKDissectError(f"unknown feature {feature!r}; expected one of {FEATURES}.")
    if n_objects < 2:
        raise QKDissectError(f"an odd-one-out scene needs at least 2 objects, got {n_objects}.")
    if feature == "mix":
        feature = str(rng.choice(FEATURES[:-1]))
    base_radius = radius if radius is not None else min(hw) / 14
    colours, shapes = list(COLOURS), list(SHAPES)
    turn = {"bar": 90.0, "triangle": 180.0, "cross": 45.0}  # a visible change of orientation per shape
    shape = str(rng.choice(shapes if feature != "orientation" else list(turn)))
    colour = str(rng.choice(colours))
    angle = float(rng.choice([0.0, 90.0])) if feature == "orientation" else 0.0
    t_shape, t_colour, t_radius, t_angle = shape, colour, base_radius, angle
    if feature == "colour":
        t_colour = str(rng.choice([c for c in colours if c != colour]))
    elif feature == "shape":
        t_shape = str(rng.choice([s for s in shapes if s != shape]))
    elif feature == "size":
        t_radius = base_radius * float(rng.choice([0.55, 1.6]))
    else:
        t_angle = angle + turn[shape]
    radii = [t_radius] + [base_radius] * (n_objects - 1)
    centres = place_objects(radii, hw, rng)
    objects = [SceneObject(t_shape, t_colour, t_radius, t_angle, centres[0])]
    objects += [SceneObject(shape, colour, base_radius, angle, c) for c in centres[1:]]
    return render_scene(objects, hw, rng, noise=noise, target=0, feature=feature)
