"""Odd-one-out data: a generator with exact masks, and a reader for the O3 folder layout.

Folder format (written by :func:`generate_oddoneout`, the layout of the O3 data set of Kotseruba
et al., BMVC 2019, plus a manifest)::

    DIR/images/NAME.png        RGB image (H, W)
    DIR/targ_images/NAME.png   target mask: 8-bit grey, 255 = target pixel, 0 = elsewhere
    DIR/dist_images/NAME.png   union of the distractor masks, same encoding
    DIR/manifest.json          {"format": "qkdissect-oddoneout", "format_version", "seed", "feature",
                                "size": [H, W], "objects", "noise", "radius", "n",
                                "features": {feature: count},
                                "images": [{"name", "feature", "target": OBJECT, "distractors": [OBJECT, ...]}]}
                               OBJECT = {"shape", "colour", "radius", "angle", "center": [row, col],
                                         "box": [top, left, bottom, right]} in pixels.

Image ``i`` is drawn from ``numpy.random.default_rng([seed, i])``, so a run with ``n`` images is a
prefix of a run with more, and the same seed gives byte-identical files. Masks are the exact
pixel sets the renderer painted (``qkdissect.synthetic.scenes``): no anti-aliasing, no overlap.

Reading (:func:`read_o3_folder`): the three folders are matched by file stem (relative path
without extension, so ``images/a.jpg`` pairs with ``targ_images/a.png``). A mask pixel is "on"
when its grey value is ≥ 128 (robust to JPEG-compressed masks). Problems — a missing or
ambiguous mask, an unreadable file, a mask of another size than its image, an empty target —
are collected as (name, kind, detail) and the image is skipped; nothing raises for one bad file.

Masks on the patch grid (:func:`patch_geometry`, :func:`patch_fractions`): a mask undergoes
exactly the image's geometry (``Preprocessing.resize_and_crop``: resize so the shorter side is
max(image_size)/crop_pct, centre crop), and each patch gets the exact area fraction of its
pre-image rectangle covered by the mask, the mask being constant on each source pixel:

    F = A_r · mask · A_cᵀ,   A_r[i, y] = |[s_i, e_i) ∩ [y, y+1)| / (e_i − s_i)

with [s_i, e_i) the source rows that patch row i covers (same for columns). Query selection
(:func:`query_maps`) and the same / other / background maps are described there.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qkdissect.errors import QKDissectError
from qkdissect.images import IMAGE_EXTENSIONS, open_image
from qkdissect.progress import ProgressFn, report
from qkdissect.synthetic.scenes import FEATURES, Scene, odd_one_out_scene

__all__ = [
    "IMAGE_DIR", "TARGET_DIR", "DISTRACTOR_DIR", "MANIFEST", "O3Folder", "OddOneOutItem", "OddOneOutSample",
    "PatchGeometry", "Problem", "SampleMaps", "generate_oddoneout", "load_sample", "oddoneout_scene", "patch_fractions",
    "patch_geometry", "problem_kind", "query_maps", "read_o3_folder",
]

IMAGE_DIR, TARGET_DIR, DISTRACTOR_DIR, MANIFEST = "images", "targ_images", "dist_images", "manifest.json"
FORMAT = "qkdissect-oddoneout"
FORMAT_VERSION = 1
MASK_THRESHOLD = 128


# ----- generation -----------------------------------------------------------------------------------
def oddoneout_scene(seed: int, index: int, hw: tuple[int, int], feature: str = "mix",
                    objects: int | tuple[int, int] = 5, noise: float = 12.0, radius: float | None = None) -> Scene:
    """Scene ``index`` of the data set with ``seed``: one target (object 0) and distractors.

    ``objects``: a count, or an inclusive range (lo, hi) drawn per image.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    count = objects if isinstance(objects, int) else int(rng.integers(objects[0], objects[1] + 1))
    return odd_one_out_scene(rng, hw, count, feature, radius=radius, noise=noise)


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path, format="PNG")


def generate_oddoneout(out: str | os.PathLike, n: int, hw: tuple[int, int] = (224, 224), *, seed: int = 0,
                       feature: str = "mix", objects: int | tuple[int, int] = 5, noise: float = 12.0,
                       radius: float | None = None, overwrite: bool = False,
                       progress: ProgressFn | None = None) -> dict[str, Any]:
    """Write ``n`` odd-one-out images with target/distractor masks and a manifest into ``out``.

    Returns the manifest. Refuses a folder that already holds a data set unless ``overwrite``, and any other
    non-empty folder; replacing removes only the files listed in the old manifest (:mod:`qkdissect.outputs`).
    ``progress("oddoneout", done, n)`` is called after each image.
    """
    if feature not in FEATURES:
        raise QKDissectError(f"unknown feature {feature!r}; expected one of {', '.join(FEATURES)}.")
    if n < 1:
        raise QKDissectError(f"--n must be at least 1, got {n}.")
    if min(hw) < 16:
        raise QKDissectError(f"images of {hw[0]}×{hw[1]} px are too small for odd-one-out scenes; use ≥ 16 px.")
    low, high = (objects, objects) if isinstance(objects, int) else objects
    if low < 2 or high < low:
        raise QKDissectError(f"objects must be ≥ 2 (a target and at least one distractor), got {objects}.")
    largest = 1.6 * (radius if radius is not None else min(hw) / 14)  # a "size" target is 1.6 × the radius
    if radius is not None and (not math.isfinite(radius) or radius <= 0 or 2 * (largest + 1) >= min(hw)):
        raise QKDissectError(f"--radius {radius:g} px does not fit {hw[0]}×{hw[1]} px images (a larger target has "
                             f"1.6 × the radius); use a radius in (0, {(min(hw) / 2 - 1) / 1.6:.1f}] px, smaller "
                             "for many objects.")
    if not (math.isfinite(noise) and noise >= 0):
        raise QKDissectError(f"--noise must be a finite number ≥ 0, got {noise:g}.")
    from qkdissect.outputs import OutputFolder

    with OutputFolder(out, FORMAT, MANIFEST, noun="odd-one-out data set").claim(replace=overwrite,
                                                                               flag="--overwrite") as folder:
        folders = [folder.staging / IMAGE_DIR, folder.staging / TARGET_DIR, folder.staging / DISTRACTOR_DIR]
        for path in folders:
            path.mkdir(parents=True, exist_ok=True)
        width = max(5, len(str(n - 1)))
        entries, features = [], Counter()
        for index in range(n):
            scene = oddoneout_scene(seed, index, hw, feature, objects, noise, radius)
            name = f"{index:0{width}d}"
            target = scene.masks[0]
            distractors = scene.masks[1:].any(axis=0)
            _write_png(folders[0] / f"{name}.png", scene.image)
            _write_png(folders[1] / f"{name}.png", target.astype(np.uint8) * 255)
            _write_png(folders[2] / f"{name}.png", distractors.astype(np.uint8) * 255)
            features[scene.feature] += 1
            entries.append({"name": name, "feature": scene.feature, "n_objects": len(scene.objects),
                            "target": scene.objects[0].to_dict(),
                            "distractors": [obj.to_dict() for obj in scene.objects[1:]]})
            report(progress, "oddoneout", index + 1, n)
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "seed": int(seed), "feature": feature,
                    "size": [int(hw[0]), int(hw[1])], "objects": [int(low), int(high)], "noise": float(noise),
                    "radius": radius, "n": int(n), "features": dict(sorted(features.items())),
                    "mask_encoding": "8-bit grey PNG, 255 = object pixel", "images": entries}
        from qkdissect.formats import validated
        from qkdissect.formats.synthetic import OddOneOutManifest

        validated(OddOneOutManifest, manifest, Path(out) / MANIFEST, "this data set cannot be written")
        folder.finish(manifest)  # written last: a manifest means the set is complete
    return {**manifest, "files": read_manifest_files(out)}


def read_manifest_files(root: str | os.PathLike) -> list[str]:
    """The files a generated data set consists of (its manifest's ``files``)."""
    from qkdissect.outputs import output_files

    return output_files(root, MANIFEST) or []


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The validated manifest of a generated folder, None when there is none or it belongs to no qkdissect data
    set (an O3 folder); one QKDissectError naming the field when it claims to be ours but is inconsistent."""
    import json

    from qkdissect.formats import validated
    from qkdissect.formats.synthetic import OddOneOutManifest

    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None
    validated(OddOneOutManifest, document, path, "generate the data set again with `qkdissect oddoneout`")
    return document


# ----- reading -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """Why image ``name`` (or an orphan mask) was not used: ``kind`` (short, for counting) and ``detail``."""

    name: str
    kind: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "kind": self.kind, "detail": self.detail}


@dataclass(frozen=True)
class OddOneOutItem:
    """One image with its two masks (paths), matched by ``name`` = relative path without extension."""

    name: str
    image: Path
    target: Path
    distractors: Path


@dataclass(frozen=True)
class O3Folder:
    """A read folder: the usable ``items`` (sorted by name), ``problems`` found while matching
    (one per image stem, plus orphan masks), the qkdissect ``manifest`` when the folder was
    generated (else None), ``n_listed`` image stems in ``images/``."""

    root: Path
    items: tuple[OddOneOutItem, ...]
    problems: tuple[Problem, ...]
    manifest: dict[str, Any] | None = None
    n_listed: int = 0

    @property
    def kind(self) -> str:
        return "qkdissect-oddoneout" if self.manifest is not None else "O3 layout"


@dataclass(frozen=True)
class OddOneOutSample:
    """A loaded item: ``image`` (RGB PIL), ``target``/``distractors`` bool arrays (H, W).
    Distractor pixels that are also target pixels are counted as target only."""

    name: str
    image: Any
    target: np.ndarray
    distractors: np.ndarray


def _by_stem(folder: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """{relative stem: path} for the image files in ``folder``, and the stems with several files."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    unique = {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}
    return unique, {stem: paths for stem, paths in found.items() if len(paths) > 1}


def read_o3_folder(root: str | os.PathLike) -> O3Folder:
    """Match ``images/``, ``targ_images/`` and ``dist_images/`` below ``root`` by stem.

    Raises QKDissectError only when the layout itself is absent (no ``images/`` folder or no
    image in it); per-image problems are returned in ``problems``.
    """
    root = Path(root)
    if not root.is_dir():
        raise QKDissectError(f"data folder not found: {root}.")
    if not (root / IMAGE_DIR).is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise QKDissectError(f"{root} has no {IMAGE_DIR}/ folder (found: {', '.join(present) or 'none'}). Expected the "
                             f"O3 layout {IMAGE_DIR}/, {TARGET_DIR}/, {DISTRACTOR_DIR}/ — generate one with "
                             "`qkdissect oddoneout --out DIR`.")
    images, image_dups = _by_stem(root / IMAGE_DIR)
    targets, target_dups = _by_stem(root / TARGET_DIR)
    dists, dist_dups = _by_stem(root / DISTRACTOR_DIR)
    if not images and not image_dups:
        raise QKDissectError(f"{root / IMAGE_DIR} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    problems: list[Problem] = []
    items = []
    stems = sorted(set(images) | set(image_dups))
    for stem in stems:  # one entry per image stem: usable, or one problem naming every reason
        reasons: list[tuple[str, str]] = []
        missing = []
        for folder, table, dups in ((IMAGE_DIR, images, image_dups), (TARGET_DIR, targets, target_dups),
                                    (DISTRACTOR_DIR, dists, dist_dups)):
            if stem in dups:
                reasons.append(("ambiguous file name", f"{folder}/ holds {len(dups[stem])} files with this stem: "
                                + ", ".join(p.name for p in dups[stem])))
            elif stem not in table:
                missing.append(f"{folder}/")
        if missing:
            reasons.append(("missing mask", "no file with this stem in " + " and ".join(missing)))
        if reasons:
            problems.append(Problem(stem, reasons[0][0], "; ".join(detail for _, detail in reasons)))
        else:
            items.append(OddOneOutItem(stem, images[stem], targets[stem], dists[stem]))
    known = set(stems)
    for folder, table, dups in ((TARGET_DIR, targets, target_dups), (DISTRACTOR_DIR, dists, dist_dups)):
        for stem in sorted((set(table) | set(dups)) - known):
            names = [table[stem].name] if stem in table else [p.name for p in dups[stem]]
            problems.append(Problem(stem, "orphan mask", f"{folder}/{', '.join(names)} has no image in {IMAGE_DIR}/"))
    return O3Folder(root=root, items=tuple(items), problems=tuple(problems), manifest=_read_manifest(root),
                    n_listed=len(stems))


def _read_mask(path: Path, what: str, size: tuple[int, int]) -> np.ndarray:
    try:
        mask = open_image(path)
    except QKDissectError as error:
        raise QKDissectError(f"unreadable {what} mask: {error}") from None
    if mask.size != size:
        raise QKDissectError(f"{what} mask is {mask.size[0]}×{mask.size[1]} px but the image is "
                             f"{size[0]}×{size[1]} px")
    return np.asarray(mask.convert("L")) >= MASK_THRESHOLD


def load_sample(item: OddOneOutItem) -> OddOneOutSample:
    """Read an item. Raises QKDissectError whose message starts with the problem kind
    ("unreadable image", "unreadable target mask", "target mask is ... px", "empty target mask")."""
    try:
        image = open_image(item.image)
    except QKDissectError as error:
        raise QKDissectError(f"unreadable image: {error}") from None
    target = _read_mask(item.target, "target", image.size)
    distractors = _read_mask(item.distractors, "distractor", image.size)
    if not target.any():
        raise QKDissectError(f"empty target mask: no pixel ≥ {MASK_THRESHOLD} in {item.target.name}")
    return OddOneOutSample(item.name, image, target, distractors & ~target)


def problem_kind(message: str) -> str:
    """The counting kind of a :func:`load_sample` error message."""
    for kind in ("unreadable image", "unreadable target mask", "unreadable distractor mask", "empty target mask"):
        if message.startswith(kind):
            return kind
    if " mask is " in message and "but the image is" in message:
        return "mask size differs from image"
    return "unreadable"


# ----- masks on the patch grid -----------------------------------------------------------------------
@dataclass(frozen=True)
class PatchGeometry:
    """Where the model's patches come from in a source image of ``source_hw`` = (h0, w0):
    resized to ``resized_hw``, cropped at ``offset`` = (top, left) to ``crop_hw``, cut into
    ``grid`` = (rows, cols) patches of ``patch_hw`` pixels (of the crop)."""

    source_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    offset: tuple[int, int]
    crop_hw: tuple[int, int]
    grid: tuple[int, int]

    @property
    def patch_hw(self) -> tuple[int, int]:
        return self.crop_hw[0] // self.grid[0], self.crop_hw[1] // self.grid[1]

    def pooling(self) -> tuple[np.ndarray, np.ndarray]:
        """(A_r (rows, h0), A_c (cols, w0)): exact area weights, each row summing to 1."""
        return tuple(_interval_weights(n_out, size, start, n_source, resized)  # type: ignore[return-value]
                     for n_out, size, start, n_source, resized in zip(
                         self.grid, self.patch_hw, self.offset, self.source_hw, self.resized_hw))


def _interval_weights(n_patches: int, patch: int, start: int, n_source: int, n_resized: int) -> np.ndarray:
    scale = n_source / n_resized  # source pixels per resized pixel
    edges = (start + np.arange(n_patches + 1, dtype=np.float64) * patch) * scale
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(n_source, dtype=np.float64)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    return overlap / (hi - lo)


def patch_geometry(preprocessing, source_hw: tuple[int, int], grid: tuple[int, int]) -> PatchGeometry:
    """The geometry of ``preprocessing.resize_and_crop`` for a source image of (h0, w0) pixels
    (the same arithmetic, kept in step by a test against the image pipeline)."""
    height, width = preprocessing.image_size
    h0, w0 = source_hw
    if height % grid[0] or width % grid[1]:
        raise QKDissectError(f"the model input {height}×{width} px is not a whole number of patches of the "
                             f"{grid[0]}×{grid[1]} grid; qkdissect needs an input size divisible by the patch size.")
    scale_to = max(height, width) / preprocessing.crop_pct
    ratio = scale_to / min(w0, h0)
    new_w, new_h = max(width, round(w0 * ratio)), max(height, round(h0 * ratio))
    return PatchGeometry(source_hw=(h0, w0), resized_hw=(new_h, new_w),
                         offset=((new_h - height) // 2, (new_w - width) // 2), crop_hw=(height, width), grid=grid)


def patch_fractions(masks: np.ndarray, geometry: PatchGeometry) -> np.ndarray:
    """Area fraction of each patch covered by each mask: (K, h0, w0) bool -> (K, rows, cols) float64."""
    A_r, A_c = geometry.pooling()
    masks = np.asarray(masks, dtype=np.float64)
    return np.einsum("iy,kyx,jx->kij", A_r, masks, A_c, optimize=True)


def _best_patch(fraction: np.ndarray) -> int:
    """Flat index of the patch with the largest value; ties go to the patch nearest the
    fraction-weighted centroid (then raster order)."""
    flat = fraction.ravel()
    candidates = np.flatnonzero(flat >= flat.max() - 1e-9)
    total = fraction.sum()
    if len(candidates) == 1 or total <= 0:
        return int(candidates[0])
    rows, cols = np.indices(fraction.shape)
    centre = np.array([(rows * fraction).sum(), (cols * fraction).sum()]) / total
    where = np.stack(np.unravel_index(candidates, fraction.shape), axis=1)
    distance = ((where - centre) ** 2).sum(axis=1)
    return int(candidates[np.argmin(distance)])


@dataclass(frozen=True)
class SampleMaps:
    """Per image, two queries (0: target, 1: distractor): ``query_patch`` (2,) flat patch index,
    −1 when that query is unavailable; ``maps`` (2, 3, rows·cols) area fractions of the
    (same object, other objects, background) for that query, summing to 1 per patch;
    ``max_fraction`` (2,) the query patch's own-object fraction; ``n_distractors``: distractor
    objects (8-connected components of the distractor mask)."""

    name: str
    query_patch: np.ndarray
    maps: np.ndarray
    max_fraction: np.ndarray
    n_distractors: int


def query_maps(sample: OddOneOutSample, geometry: PatchGeometry, threshold: float = 0.25) -> SampleMaps:
    """Query patches and same / other / background maps of one image (see :class:`SampleMaps`).

    Target query: the patch with the largest target fraction; it is unavailable (−1) when that
    fraction is below ``threshold`` (the target vanishes at the patch resolution). Distractor
    query: each distractor object's best patch; the object whose best patch has the largest
    fraction is the query's "same object" (ties: the larger object), the target and the other
    distractors are "other objects". Unavailable below ``threshold`` or without distractors.
    """
    from scipy import ndimage

    target, distractors = sample.target, sample.distractors
    background = ~(target | distractors)
    f_target, f_dist_all, f_background = patch_fractions(np.stack([target, distractors, background]), geometry)
    maps = np.zeros((2, 3, f_target.size), dtype=np.float64)
    query = np.full(2, -1, dtype=np.int64)
    best = np.zeros(2, dtype=np.float64)
    t_patch = _best_patch(f_target)
    best[0] = f_target.ravel()[t_patch]
    maps[0] = np.stack([f_target, f_dist_all, f_background]).reshape(3, -1)
    if best[0] >= threshold:
        query[0] = t_patch
    labels, n_objects = ndimage.label(distractors, structure=np.ones((3, 3), dtype=bool))
    if n_objects:
        A_r, A_c = geometry.pooling()
        choice = None  # (fraction, area, patch, map)
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            piece = (labels[box] == index).astype(np.float64)
            f_obj = A_r[:, box[0]] @ piece @ A_c[:, box[1]].T
            patch = _best_patch(f_obj) if f_obj.max() > 0 else 0
            key = (float(f_obj.ravel()[patch]), float(piece.sum()))
            if choice is None or key > choice[0]:
                choice = (key, patch, f_obj)
        (fraction, _), patch, f_same = choice
        best[1] = fraction
        maps[1] = np.stack([f_same, f_target + f_dist_all - f_same, f_background]).reshape(3, -1)
        if fraction >= threshold:
            query[1] = patch
    return SampleMaps(sample.name, query, maps, best, int(n_objects))
