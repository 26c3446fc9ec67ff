"""Odd-one-out generator, O3-layout reading, masks on the patch grid, query selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qkdissect.adapters.base import Preprocessing
from qkdissect.errors import QKDissectError
from qkdissect.synthetic.oddoneout import (
    OddOneOutSample,
    PatchGeometry,
    generate_oddoneout,
    load_sample,
    patch_fractions,
    patch_geometry,
    problem_kind,
    query_maps,
    read_o3_folder,
)
from qkdissect.synthetic.scenes import COLOURS

HW = (72, 88)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----- generator --------------------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files(tmp_path):
    first = generate_oddoneout(tmp_path / "a", 6, HW, seed=3, feature="mix", objects=(3, 5))
    generate_oddoneout(tmp_path / "b", 6, HW, seed=3, feature="mix", objects=(3, 5))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 3 * 6 + 1 and a == b
    generate_oddoneout(tmp_path / "c", 6, HW, seed=4, feature="mix", objects=(3, 5))
    c = _files(tmp_path / "c")
    assert sum(a[name] != c[name] for name in a if name.startswith("images/")) == 6
    # image i depends on (seed, i) only: a shorter run is a prefix of a longer one
    generate_oddoneout(tmp_path / "d", 3, HW, seed=3, feature="mix", objects=(3, 5))
    d = _files(tmp_path / "d")
    assert all(d[name] == a[name] for name in d if name != "manifest.json")
    assert json.loads(d["manifest.json"])["images"] == first["images"][:3]


@pytest.mark.parametrize("feature", ["colour", "size", "orientation"])
def test_masks_match_pixels_and_manifest(tmp_path, feature):
    manifest = generate_oddoneout(tmp_path, 4, HW, seed=1, feature=feature, objects=4, noise=0.0)
    assert manifest["features"] == {feature: 4}
    for entry in manifest["images"]:
        image = np.asarray(Image.open(tmp_path / "images" / f"{entry['name']}.png"))
        target = np.asarray(Image.open(tmp_path / "targ_images" / f"{entry['name']}.png")) == 255
        dist = np.asarray(Image.open(tmp_path / "dist_images" / f"{entry['name']}.png")) == 255
        assert image.shape == (*HW, 3) and target.shape == HW and not (target & dist).any()
        painted = (image == np.array(COLOURS[entry["target"]["colour"]], dtype=np.uint8)).all(axis=2)
        assert np.array_equal(painted & ~dist, target)  # the target mask is exactly the target's pixels
        top, left, bottom, right = entry["target"]["box"]
        rows, cols = np.nonzero(target)
        assert rows.min() >= top and rows.max() < bottom and cols.min() >= left and cols.max() < right
        assert len(entry["distractors"]) == 3 and dist.sum() > 0


def test_generator_refuses_bad_requests(tmp_path):
    with pytest.raises(QKDissectError, match="unknown feature"):
        generate_oddoneout(tmp_path / "x", 2, HW, feature="texture")
    with pytest.raises(QKDissectError, match="at least 1"):
        generate_oddoneout(tmp_path / "x", 0, HW)
    with pytest.raises(QKDissectError, match="objects must be"):
        generate_oddoneout(tmp_path / "x", 2, HW, objects=1)
    generate_oddoneout(tmp_path / "y", 4, HW, seed=0)
    with pytest.raises(QKDissectError, match="--overwrite"):
        generate_oddoneout(tmp_path / "y", 2, HW, seed=1)
    generate_oddoneout(tmp_path / "y", 2, HW, seed=1, overwrite=True)  # old files replaced, stale ones removed
    assert sorted(p.name for p in (tmp_path / "y" / "images").iterdir()) == ["00000.png", "00001.png"]
    foreign = tmp_path / "z" / "images"
    foreign.mkdir(parents=True)
    (foreign / "mine.png").write_bytes(b"x")
    with pytest.raises(QKDissectError, match="no qkdissect manifest"):
        generate_oddoneout(tmp_path / "z", 2, HW, overwrite=True)
    assert (foreign / "mine.png").exists()


# ----- reading an O3 folder ------------------------------------------------------------------------------
def test_broken_o3_folder_is_reported_not_fatal(tmp_path):
    root = tmp_path / "o3"
    generate_oddoneout(root, 9, HW, seed=2)
    (root / "manifest.json").unlink()  # a real O3 folder has none
    images, targets, dists = root / "images", root / "targ_images", root / "dist_images"
    # O3 style: JPEG images, PNG masks with the same stem
    Image.open(images / "00000.png").save(images / "00000.jpg", quality=95)
    (images / "00000.png").unlink()
    (targets / "00001.png").unlink()  # missing target mask
    Image.new("L", (HW[1] + 3, HW[0])).save(dists / "00002.png")  # distractor mask of another size
    (images / "00003.png").write_bytes(b"this is not a png")  # unreadable image
    (targets / "00004.png").write_bytes(b"")  # zero-byte target mask
    Image.new("L", (HW[1], HW[0])).save(targets / "00005.png")  # empty target mask
    Image.new("L", (8, 8)).save(targets / "orphan.png")  # mask without image
    Image.open(images / "00006.png").save(images / "00006.bmp")  # two images with one stem
    for folder in (targets, dists):  # two masks with one stem, in both mask folders
        Image.open(folder / "00007.png").save(folder / "00007.bmp")
    folder = read_o3_folder(root)
    assert folder.manifest is None and folder.kind == "O3 layout" and folder.n_listed == 9
    listed = {p.name: p.kind for p in folder.problems}
    assert listed == {"00001": "missing mask", "orphan": "orphan mask", "00006": "ambiguous file name",
                      "00007": "ambiguous file name"}
    assert len(folder.problems) == 4  # one problem per image, all its reasons in the detail
    details = {p.name: p.detail for p in folder.problems}
    assert "targ_images/" in details["00001"] and "targ_images/orphan.png" in details["orphan"]
    assert "targ_images/" in details["00007"] and "dist_images/" in details["00007"]
    loaded, failed = {}, {}
    for item in folder.items:
        try:
            loaded[item.name] = load_sample(item)
        except QKDissectError as error:
            failed[item.name] = problem_kind(str(error))
    assert failed == {"00002": "mask size differs from image", "00003": "unreadable image",
                      "00004": "unreadable target mask", "00005": "empty target mask"}
    assert sorted(loaded) == ["00000", "00008"]
    sample = loaded["00000"]
    assert sample.target.shape == HW and sample.target.any() and not (sample.target & sample.distractors).any()


def test_reader_refuses_a_folder_without_the_layout(tmp_path):
    with pytest.raises(QKDissectError, match="not found"):
        read_o3_folder(tmp_path / "nothing")
    (tmp_path / "pics").mkdir()
    with pytest.raises(QKDissectError, match="no images/ folder"):
        read_o3_folder(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(QKDissectError, match="holds no images"):
        read_o3_folder(tmp_path)


# ----- masks on the patch grid ----------------------------------------------------------------------------
def _identity_geometry(hw, grid):
    """No resize, no crop: patches are blocks of source pixels."""
    return PatchGeometry(source_hw=hw, resized_hw=hw, offset=(0, 0), crop_hw=hw, grid=grid)


def test_fractions_exact_on_a_hand_made_mask():
    mask = np.zeros((12, 16), dtype=bool)  # 3×4 patches of 4×4 px
    mask[0:4, 0:4] = True  # patch (0, 0) full
    mask[4:6, 4:8] = True  # patch (1, 1) half
    mask[8, 12] = True  # patch (2, 3): 1 of 16 pixels
    expected = np.zeros((3, 4))
    expected[0, 0], expected[1, 1], expected[2, 3] = 1.0, 0.5, 1 / 16
    assert np.array_equal(patch_fractions(mask[None], _identity_geometry((12, 16), (3, 4)))[0], expected)
    # through Preprocessing: a square 32×32 source resized to 16×16 (2×2 source pixels per pixel)
    square = np.zeros((16, 16), dtype=bool)
    square[:12] = mask[:, :16]
    big = np.kron(square, np.ones((2, 2), dtype=bool))
    geometry = patch_geometry(Preprocessing((16, 16), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0), (32, 32), (4, 4))
    assert geometry.resized_hw == (16, 16) and geometry.offset == (0, 0) and geometry.patch_hw == (4, 4)
    expected = np.zeros((4, 4))
    expected[0, 0], expected[1, 1], expected[2, 3] = 1.0, 0.5, 1 / 16
    np.testing.assert_allclose(patch_fractions(big[None], geometry)[0], expected, atol=1e-12)
    # crop_pct 0.5: resized to 32×32 (identity), centre 16×16 crop at offset (8, 8)
    geometry = patch_geometry(Preprocessing((16, 16), (0.5,) * 3, (0.5,) * 3, crop_pct=0.5), (32, 32), (4, 4))
    assert geometry.resized_hw == (32, 32) and geometry.offset == (8, 8)
    np.testing.assert_allclose(patch_fractions(big[None], geometry)[0], big[8:24, 8:24].reshape(4, 4, 4, 4)
                               .mean(axis=(1, 3)), atol=1e-12)


def test_fractions_exact_against_supersampling_with_resize_and_crop():
    rng = np.random.default_rng(0)
    source = rng.random((37, 53)) < 0.3  # non-integer scale, crop on both axes
    preprocessing = Preprocessing((24, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=0.8)
    geometry = patch_geometry(preprocessing, source.shape, (3, 4))
    fractions = patch_fractions(source[None], geometry)[0]
    # brute force: sample k×k points in each patch, map them back to source pixels
    k = 200
    (h0, w0), (rh, rw), (top, left) = geometry.source_hw, geometry.resized_hw, geometry.offset
    ph, pw = geometry.patch_hw
    brute = np.zeros((3, 4))
    for i in range(3):
        for j in range(4):
            ys = top + i * ph + (np.arange(k) + 0.5) / k * ph
            xs = left + j * pw + (np.arange(k) + 0.5) / k * pw
            rows, cols = (ys * h0 / rh).astype(int), (xs * w0 / rw).astype(int)
            brute[i, j] = source[np.ix_(rows, cols)].mean()
    np.testing.assert_allclose(fractions, brute, atol=0.01)
    assert ((fractions > 0) & (fractions < 1)).any()


@pytest.mark.parametrize("source_hw, crop_pct", [((90, 130), 0.875), ((140, 70), 0.9), ((48, 64), 1.0)])
def test_geometry_follows_the_image_pipeline(source_hw, crop_pct):
    """Masks undergo the same resize and crop as the image: a white rectangle pushed through
    Preprocessing.resize_and_crop lands on the patches the fractions predict."""
    preprocessing = Preprocessing((32, 48), (0.5,) * 3, (0.5,) * 3, interpolation="bilinear", crop_pct=crop_pct)
    mask = np.zeros(source_hw, dtype=bool)
    h, w = source_hw
    mask[h // 3 : h // 3 + h // 4, w // 5 : w // 5 + w // 2] = True
    grid = (4, 6)
    fractions = patch_fractions(mask[None], patch_geometry(preprocessing, source_hw, grid))[0]
    image = Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
    crop = np.asarray(preprocessing.resize_and_crop(image), dtype=np.float64)[..., 0] / 255
    pooled = crop.reshape(grid[0], 8, grid[1], 8).mean(axis=(1, 3))
    np.testing.assert_allclose(fractions, pooled, atol=0.06)
    assert np.abs(fractions - pooled).mean() < 0.01


def test_geometry_refuses_a_grid_that_does_not_divide_the_input():
    with pytest.raises(QKDissectError, match="divisible"):
        patch_geometry(Preprocessing((30, 30), (0.5,) * 3, (0.5,) * 3), (30, 30), (4, 4))


# ----- query selection ----------------------------------------------------------------------------------
def _sample(target, distractors):
    return OddOneOutSample("hand", None, target, distractors & ~target)


def test_query_maps_pick_best_patches_and_partition_the_image():
    target = np.zeros((16, 24), dtype=bool)  # 4×6 grid of 4-px patches
    target[4:12, 8:12] = True  # patches (1,2) and (2,2) full: tie, centroid between them → raster-first
    dist = np.zeros_like(target)
    dist[0:2, 0:4] = True  # small distractor: half a patch
    dist[8:16, 16:24] = True  # large distractor: four full patches
    maps = query_maps(_sample(target, dist), _identity_geometry((16, 24), (4, 6)), threshold=0.25)
    assert maps.n_distractors == 2
    assert maps.query_patch[0] in (1 * 6 + 2, 2 * 6 + 2) and maps.max_fraction[0] == 1.0
    assert maps.query_patch[1] in (2 * 6 + 4, 2 * 6 + 5, 3 * 6 + 4, 3 * 6 + 5)
    np.testing.assert_allclose(maps.maps.sum(axis=1), 1.0, atol=1e-12)  # categories partition every patch
    same_d = maps.maps[1, 0].reshape(4, 6)
    assert same_d[2:4, 4:6].sum() == 4 and same_d[0, 0] == 0  # "same" is the large distractor only
    other_d = maps.maps[1, 1].reshape(4, 6)
    np.testing.assert_allclose(other_d[0, 0], 0.5)  # the small distractor is "other"
    np.testing.assert_allclose(other_d[1:3, 2], 1.0)  # and so is the target


def test_tie_goes_to_the_patch_nearest_the_centroid():
    target = np.zeros((12, 36), dtype=bool)  # 3×9 grid of 4-px patches
    target[4:8, 0:36] = True  # one full row of patches: the middle one is chosen
    maps = query_maps(_sample(target, np.zeros_like(target)), _identity_geometry((12, 36), (3, 9)))
    assert maps.query_patch[0] == 1 * 9 + 4
    assert maps.query_patch[1] == -1 and maps.n_distractors == 0


def test_vanishing_objects_give_no_query():
    target = np.zeros((16, 16), dtype=bool)
    target[1, 1] = True  # 1/16 of a patch
    dist = np.zeros_like(target)
    dist[9:11, 9:11] = True  # 4/16 of a patch = 0.25
    maps = query_maps(_sample(target, dist), _identity_geometry((16, 16), (4, 4)), threshold=0.3)
    assert maps.query_patch.tolist() == [-1, -1]
    np.testing.assert_allclose(maps.max_fraction, [1 / 16, 0.25])
    maps = query_maps(_sample(target, dist), _identity_geometry((16, 16), (4, 4)), threshold=0.25)
    assert maps.query_patch[0] == -1 and maps.query_patch[1] == 2 * 4 + 2


def test_geometry_dataclass_pooling_rows_sum_to_one():
    geometry = PatchGeometry(source_hw=(50, 70), resized_hw=(41, 57), offset=(4, 6), crop_hw=(32, 48), grid=(4, 6))
    A_r, A_c = geometry.pooling()
    assert A_r.shape == (4, 50) and A_c.shape == (6, 70)
    np.testing.assert_allclose(A_r.sum(axis=1), 1.0)
    np.testing.assert_allclose(A_c.sum(axis=1), 1.0)
