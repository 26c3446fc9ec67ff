"""The procedural training world of the embedded model ``builtin:oddvit``.

Each image is an odd-one-out scene (``qkdissect.synthetic.scenes.odd_one_out_scene``): 3–5 flat-coloured
objects on a noisy grey background, all identical except one *target* that differs in colour,
shape, size or orientation. Four labels per image, each needing the model to group the
objects and compare them (the target is only "odd" in the context of the others):

    shape     the target's shape      (6 classes: scenes.SHAPES)
    colour    the target's colour     (8 classes: scenes.COLOURS)
    position  where the target is     (9 classes: 3×3 bins of its centre, row-major)
    feature   what makes it odd       (4 classes: colour, shape, size, orientation)

Determinism: sample ``i`` of a set with seed ``s`` is drawn from its own generator
``numpy.random.default_rng([s, i])``, so any range of any set is regenerated exactly (and in
any order, in any number of chunks). Training uses one seed, held-out evaluation another.

The model reads one logit vector of length ``sum(task sizes)`` = 27, split per task in the
order of ``TASKS`` (``split_logits``); inputs are ``to_tensor(images)``: uint8 RGB scaled to
[0, 1] and normalised with ``MEAN``/``STD``.

Image folder written by :func:`write_world_images` (read back with :func:`read_world_folder`):

    FOLDER/world_00000.png …   n RGB PNG images (size × size), sample i of seed ``seed``
    FOLDER/world.json          {"format": "qkdissect-world", "version": 1, "seed", "n",
                                "config": WorldConfig fields, "tasks": {task: [class names]},
                                "images": [{"file", "index", "labels": {task: class name},
                                            "objects": [SceneObject.to_dict(), target first]}],
                                "files": [the PNG files]}
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, report
from qkdissect.synthetic.scenes import COLOURS, FEATURES, SHAPES, SceneObject, odd_one_out_scene

__all__ = [
    "MEAN", "STD", "TASKS", "Task", "WorldBatch", "WorldConfig", "accuracy", "chance_levels", "evaluate",
    "generate", "iterate", "patch_fractions", "position_bin", "read_world_folder", "split_logits", "to_tensor",
    "world_sample", "write_world_images",
]

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
POSITIONS = tuple(f"{row}-{col}" for row in ("top", "middle", "bottom") for col in ("left", "centre", "right"))
WORLD_FORMAT = "qkdissect-world"


@dataclass(frozen=True)
class Task:
    """One classification task: its name and class names (label = index into ``classes``)."""

    name: str
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


TASKS = (
    Task("shape", tuple(SHAPES)),
    Task("colour", tuple(COLOURS)),
    Task("position", POSITIONS),
    Task("feature", tuple(FEATURES[:-1])),
)


@dataclass(frozen=True)
class WorldConfig:
    """Scene parameters: square images of ``image_size`` px, ``min_objects``–``max_objects``
    objects with a base radius drawn uniformly in ``radius`` × image_size, pixel noise std ``noise``."""

    image_size: int = 64
    min_objects: int = 3
    max_objects: int = 5
    radius: tuple[float, float] = (0.10, 0.13)
    noise: float = 8.0

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise QKDissectError(f"world images must be at least 16 px, got {self.image_size}.")
        if not 3 <= self.min_objects <= self.max_objects:
            raise QKDissectError(
                f"need 3 ≤ min_objects ≤ max_objects (an odd one out needs two identical others), "
                f"got {self.min_objects}, {self.max_objects}."
            )
        if not 0 < self.radius[0] <= self.radius[1] < 0.25:
            raise QKDissectError(f"radius fractions must satisfy 0 < lo ≤ hi < 0.25, got {self.radius}.")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "radius": list(self.radius)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorldConfig":
        return cls(**{**data, "radius": tuple(data["radius"])})


@dataclass(frozen=True)
class WorldBatch:
    """``images`` (B, H, W, 3) uint8; ``labels`` {task: (B,) int64}; ``target_masks`` and
    ``distractor_masks`` (B, H, W) bool (the odd object; the union of the others); ``objects`` per
    image (target first); ``indices`` (B,) sample indices within the seed's set."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    target_masks: np.ndarray
    distractor_masks: np.ndarray
    objects: tuple[tuple[SceneObject, ...], ...]
    indices: np.ndarray
    seed: int
    config: WorldConfig = field(default_factory=WorldConfig)

    def __len__(self) -> int:
        return len(self.images)

    def label_names(self, i: int) -> dict[str, str]:
        """Class names of image ``i``'s labels."""
        return {task.name: task.classes[int(self.labels[task.name][i])] for task in TASKS}


def position_bin(center: tuple[float, float], image_size: int) -> int:
    """3×3 bin (row-major, 0 = top-left) of a (row, col) centre in a square image."""
    row = min(int(3 * center[0] / image_size), 2)
    col = min(int(3 * center[1] / image_size), 2)
    return 3 * row + col


def world_sample(seed: int, index: int, config: WorldConfig = WorldConfig()):
    """Scene ``index`` of the set with ``seed`` (a ``scenes.Scene``; target is object 0) and its labels."""
    rng = np.random.default_rng([int(seed), int(index)])
    size = config.image_size
    for _ in range(20):  # a rare failed placement draws again from the same (deterministic) stream
        n_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
        radius = size * float(rng.uniform(*config.radius))
        try:
            scene = odd_one_out_scene(rng, (size, size), n_objects, "mix", radius=radius, noise=config.noise)
            break
        except QKDissectError:
            continue
    else:  # pragma: no cover — only for configs far outside the defaults
        raise QKDissectError(f"could not place the objects of world sample {index} (seed {seed}) in "
                             f"{size}×{size} px; use fewer or smaller objects.")
    target = scene.objects[0]
    labels = {
        "shape": SHAPES.index(target.shape),
        "colour": list(COLOURS).index(target.colour),
        "position": position_bin(target.center, size),
        "feature": FEATURES.index(scene.feature),
    }
    return scene, labels


def generate(seed: int, start: int, stop: int, config: WorldConfig = WorldConfig()) -> WorldBatch:
    """Samples ``start … stop−1`` of the set with ``seed``, as one batch."""
    if not 0 <= start <= stop:
        raise QKDissectError(f"expected 0 ≤ start ≤ stop, got start={start}, stop={stop}.")
    n, size = stop - start, config.image_size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    others = np.empty((n, size, size), dtype=bool)
    labels = {task.name: np.empty(n, dtype=np.int64) for task in TASKS}
    objects = []
    for row, index in enumerate(range(start, stop)):
        scene, label = world_sample(seed, index, config)
        images[row], masks[row], others[row] = scene.image, scene.masks[0], scene.masks[1:].any(axis=0)
        for name, value in label.items():
            labels[name][row] = value
        objects.append(scene.objects)
    return WorldBatch(images, labels, masks, others, tuple(objects), np.arange(start, stop), int(seed), config)


def iterate(seed: int, n: int, batch_size: int, config: WorldConfig = WorldConfig(),
            start: int = 0) -> Iterator[WorldBatch]:
    """Batches covering samples ``start … start+n−1`` of the set with ``seed``."""
    for first in range(start, start + n, batch_size):
        yield generate(seed, first, min(first + batch_size, start + n), config)


def patch_fractions(masks: np.ndarray, patch: int) -> np.ndarray:
    """Share of each ``patch`` × ``patch`` cell covered by ``masks`` (B, H, W) bool -> (B, H/patch, W/patch)."""
    batch, height, width = masks.shape
    if height % patch or width % patch:
        raise QKDissectError(f"mask size {height}×{width} is not a multiple of the patch size {patch}.")
    cells = masks.reshape(batch, height // patch, patch, width // patch, patch)
    return cells.mean(axis=(2, 4), dtype=np.float32)


def to_tensor(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float32 tensor (B, 3, H, W), (x/255 − MEAN)/STD — the model input."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[None, :, None, None]
    return (x - mean) / std


def split_logits(logits) -> dict[str, Any]:
    """(B, 27) logits -> {task: (B, n_classes)}, in ``TASKS`` order."""
    total = sum(task.n_classes for task in TASKS)
    if logits.shape[-1] != total:
        raise QKDissectError(f"expected {total} logits (one block per task {[t.name for t in TASKS]}), "
                             f"got {logits.shape[-1]}.")
    out, first = {}, 0
    for task in TASKS:
        out[task.name] = logits[..., first : first + task.n_classes]
        first += task.n_classes
    return out


def accuracy(predictions: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of correct predictions per task."""
    return {name: float(np.mean(predictions[name] == labels[name])) for name in labels}


def chance_levels(labels: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per task: ``uniform`` = 1/n_classes and ``majority`` = frequency of the commonest class in ``labels``
    (the accuracy of always guessing it; the honest chance level when classes are unbalanced)."""
    out = {}
    for task in TASKS:
        values = labels[task.name]
        counts = np.bincount(values, minlength=task.n_classes)
        out[task.name] = {"uniform": 1.0 / task.n_classes, "majority": float(counts.max() / max(len(values), 1))}
    return out


def evaluate(model: Callable, seed: int, n: int, config: WorldConfig = WorldConfig(), batch_size: int = 250,
             progress: ProgressFn | None = None) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Accuracy per task of ``model`` (pixel tensor (B, 3, H, W) -> logits (B, 27)) on samples
    ``0 … n−1`` of the set with ``seed``; also the chance levels of that set. Runs in float32, no grad."""
    import torch

    predicted = {task.name: [] for task in TASKS}
    truth = {task.name: [] for task in TASKS}
    with torch.no_grad():
        for batch in iterate(seed, n, batch_size, config):
            logits = split_logits(model(to_tensor(batch.images)))
            for task in TASKS:
                predicted[task.name].append(logits[task.name].argmax(-1).numpy())
                truth[task.name].append(batch.labels[task.name])
            report(progress, "evaluate", int(batch.indices[-1]) + 1, n)
    predicted = {k: np.concatenate(v) for k, v in predicted.items()}
    truth = {k: np.concatenate(v) for k, v in truth.items()}
    return accuracy(predicted, truth), chance_levels(truth)


def write_world_images(folder: str | os.PathLike, n: int, seed: int = 2, size: int = 64,
                       config: WorldConfig | None = None, progress: ProgressFn | None = None) -> Path:
    """Write samples ``0 … n−1`` of the world with ``seed`` as PNGs plus ``world.json`` (see module doc).

    A previous world folder there is replaced (only its listed files; :mod:`qkdissect.outputs`), so a re-run is
    harmless; any other non-empty folder is refused. Returns the folder.
    """
    from PIL import Image

    from qkdissect.outputs import OutputFolder

    if n < 1:
        raise QKDissectError(f"expected at least one image, got n={n}.")
    config = config or WorldConfig(image_size=size)
    if config.image_size != size:
        raise QKDissectError(f"size={size} disagrees with config.image_size={config.image_size}.")
    with OutputFolder(folder, WORLD_FORMAT, "world.json", noun="world image folder").claim(replace=True) as output:
        records = []
        for batch in iterate(seed, n, 100, config):
            for row, index in enumerate(batch.indices):
                name = f"world_{int(index):05d}.png"
                Image.fromarray(batch.images[row]).save(output.staging / name, format="PNG")
                records.append({"file": name, "index": int(index), "labels": batch.label_names(row),
                                "objects": [obj.to_dict() for obj in batch.objects[row]]})
            report(progress, "world", len(records), n)
        output.finish({
            "format": WORLD_FORMAT, "version": 1, "seed": int(seed), "n": int(n), "config": config.to_dict(),
            "tasks": {task.name: list(task.classes) for task in TASKS}, "images": records,
        })
    return Path(folder)


def read_world_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``world.json`` of a folder written by :func:`write_world_images` (with ``config`` as a
    WorldConfig and each image's ``path``); QKDissectError when it is missing or not a world folder."""
    from qkdissect.formats import read_document
    from qkdissect.formats.synthetic import WorldDocument

    data, _ = read_document(Path(folder) / "world.json", WorldDocument,
                            missing=f"{folder} has no world.json, so it was not written by write_world_images",
                            remedy="write the folder again", kind=WORLD_FORMAT, max_version=1, version_key="version")
    try:
        data["config"] = WorldConfig.from_dict(data["config"])
    except (TypeError, KeyError, ValueError) as error:
        raise QKDissectError(f"{Path(folder) / 'world.json'}: field config is not a world configuration ({error}); "
                             "write the folder again.") from None
    for record in data["images"]:
        record["path"] = Path(folder) / record["file"]
    return data

