"""The procedural training world: determinism, labels checked against the objects and the pixels."""

import hashlib

import numpy as np
import pytest
import torch

from qkdissect.errors import QKDissectError
from qkdissect.images import list_images, open_image
from qkdissect.synthetic.scenes import COLOURS
from qkdissect.synthetic.world import (
    MEAN,
    STD,
    TASKS,
    WorldConfig,
    chance_levels,
    evaluate,
    generate,
    patch_fractions,
    position_bin,
    read_world_folder,
    split_logits,
    to_tensor,
    world_sample,
    write_world_images,
)

ATTRIBUTES = ("shape", "colour", "radius", "angle")
FEATURE_OF = {"shape": "shape", "colour": "colour", "radius": "size", "angle": "orientation"}


@pytest.fixture(scope="module")
def batch():
    return generate(seed=11, start=0, stop=120)


def test_same_seed_same_world_in_any_chunking(batch):
    again = generate(seed=11, start=40, stop=70)
    assert np.array_equal(again.images, batch.images[40:70])
    assert np.array_equal(again.target_masks, batch.target_masks[40:70])
    for task in TASKS:
        assert np.array_equal(again.labels[task.name], batch.labels[task.name][40:70])
    other = generate(seed=12, start=40, stop=70)
    assert not np.array_equal(other.images, again.images)


def test_label_object_is_the_unique_odd_one(batch):
    """Brute force over the scene description: exactly one object differs from all others, and the
    labels name its shape, colour and the one attribute in which it differs."""
    for i, objects in enumerate(batch.objects):
        keys = [tuple(getattr(o, a) for a in ATTRIBUTES) for o in objects]
        unique = [j for j, key in enumerate(keys) if keys.count(key) == 1]
        assert unique == [0] and len(set(keys[1:])) == 1 and len(objects) >= 3
        names = batch.label_names(i)
        target, other = objects[0], objects[1]
        assert names["shape"] == target.shape and names["colour"] == target.colour
        changed = [FEATURE_OF[a] for a in ATTRIBUTES if getattr(target, a) != getattr(other, a)]
        assert changed == [names["feature"]]


def test_labels_agree_with_pixels(batch):
    """Colour from the target's pixels; position bin from the target mask's centroid (all shapes are
    centred on their circumcentre), skipped when the centroid is within 1 px of a bin edge."""
    size = batch.config.image_size
    checked = 0
    for i in range(len(batch)):
        mask = batch.target_masks[i]
        assert mask.sum() > 4
        pixels = batch.images[i][mask]
        assert (pixels == np.array(COLOURS[batch.label_names(i)["colour"]], dtype=np.uint8)).all()
        rows, cols = np.nonzero(mask)
        centroid = (rows.mean() + 0.5, cols.mean() + 0.5)
        edges = np.array([size / 3, 2 * size / 3])
        if min(np.abs(edges - centroid[0]).min(), np.abs(edges - centroid[1]).min()) > 1.0:
            assert position_bin(centroid, size) == batch.labels["position"][i]
            checked += 1
    assert checked > len(batch) // 2


def test_all_classes_occur_and_chance_levels(batch):
    big = generate(seed=5, start=0, stop=600)
    for task in TASKS:
        counts = np.bincount(big.labels[task.name], minlength=task.n_classes)
        assert (counts > 0).all(), task.name
    chance = chance_levels(big.labels)
    for task in TASKS:
        counts = np.bincount(big.labels[task.name], minlength=task.n_classes)
        assert chance[task.name]["majority"] == pytest.approx(counts.max() / 600)
        assert chance[task.name]["uniform"] == pytest.approx(1 / task.n_classes)


def test_evaluate_against_oracle_and_constant_predictors():
    config = WorldConfig(image_size=48)
    data = generate(seed=9, start=0, stop=40, config=config)
    lookup = {hashlib.sha1(to_tensor(data.images[i : i + 1]).numpy().tobytes()).hexdigest(): i for i in range(40)}
    width = sum(t.n_classes for t in TASKS)

    def oracle(x):
        logits = torch.zeros(len(x), width)
        for row in range(len(x)):
            i = lookup[hashlib.sha1(x[row : row + 1].numpy().tobytes()).hexdigest()]
            first = 0
            for task in TASKS:
                logits[row, first + data.labels[task.name][i]] = 1.0
                first += task.n_classes
        return logits

    accuracy, _ = evaluate(oracle, seed=9, n=40, config=config, batch_size=13)
    assert accuracy == {task.name: 1.0 for task in TASKS}
    accuracy, _ = evaluate(lambda x: torch.zeros(len(x), width), seed=9, n=40, config=config)
    for task in TASKS:  # argmax of all-equal logits is class 0
        assert accuracy[task.name] == pytest.approx(np.mean(data.labels[task.name] == 0))


def test_to_tensor_and_split_logits():
    images = np.random.default_rng(0).integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    x = to_tensor(images)
    assert x.shape == (3, 3, 20, 24)
    expected = (images[1, 4, 7, 2] / 255.0 - MEAN[2]) / STD[2]
    assert float(x[1, 2, 4, 7]) == pytest.approx(expected, abs=1e-6)
    parts = split_logits(torch.arange(2 * 27.0).reshape(2, 27))
    assert [parts[t.name].shape[1] for t in TASKS] == [t.n_classes for t in TASKS]
    assert float(parts["colour"][0, 0]) == 6.0  # after the 6 shape logits
    with pytest.raises(QKDissectError, match="expected 27 logits"):
        split_logits(torch.zeros(2, 26))


def test_write_and_read_world_folder(tmp_path):
    folder = write_world_images(tmp_path / "world", n=7, seed=4, size=40)
    files = list_images(folder)
    assert [f.name for f in files] == [f"world_{i:05d}.png" for i in range(7)]
    data = generate(seed=4, start=0, stop=7, config=WorldConfig(image_size=40))
    index = read_world_folder(folder)
    assert index["seed"] == 4 and index["config"].image_size == 40
    for i, record in enumerate(index["images"]):
        assert np.array_equal(np.asarray(open_image(record["path"])), data.images[i])
        assert record["labels"] == data.label_names(i)
        assert record["objects"][0]["shape"] == data.objects[i][0].shape
    again = write_world_images(tmp_path / "world", n=7, seed=4, size=40)  # re-run: identical files
    assert np.array_equal(np.asarray(open_image(again / "world_00003.png")), data.images[3])


def test_bad_requests(tmp_path):
    with pytest.raises(QKDissectError, match="min_objects"):
        WorldConfig(min_objects=2)
    with pytest.raises(QKDissectError, match="at least 16"):
        WorldConfig(image_size=8)
    with pytest.raises(QKDissectError, match="start"):
        generate(seed=0, start=5, stop=2)
    with pytest.raises(QKDissectError, match="at least one image"):
        write_world_images(tmp_path / "w", n=0)
    with pytest.raises(QKDissectError, match="no world.json"):
        read_world_folder(tmp_path)
    (tmp_path / "world.json").write_text('{"format": "other"}')
    with pytest.raises(QKDissectError, match="is not a qkdissect-world file"):
        read_world_folder(tmp_path)


def test_world_sample_matches_batch(batch):
    scene, labels = world_sample(11, 17, batch.config)
    assert np.array_equal(scene.image, batch.images[17])
    assert labels == {t.name: int(batch.labels[t.name][17]) for t in TASKS}


def test_masks_match_the_objects_geometry(batch):
    """Target and distractor masks against shapes rasterised again from the scene description."""
    from qkdissect.synthetic.scenes import shape_mask

    hw = batch.images.shape[1:3]
    for i in range(0, len(batch), 7):
        objects = batch.objects[i]
        assert np.array_equal(batch.target_masks[i], shape_mask(objects[0], hw))
        others = np.zeros(hw, dtype=bool)
        for obj in objects[1:]:
            others |= shape_mask(obj, hw)
        assert np.array_equal(batch.distractor_masks[i], others)
        assert not (batch.target_masks[i] & others).any()


def test_patch_fractions_brute_force():
    masks = np.random.default_rng(2).random((2, 12, 20)) > 0.6
    fractions = patch_fractions(masks, 4)
    assert fractions.shape == (2, 3, 5)
    for b in range(2):
        for r in range(3):
            for c in range(5):
                assert fractions[b, r, c] == pytest.approx(masks[b, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].mean())
    with pytest.raises(QKDissectError, match="multiple of the patch size"):
        patch_fractions(masks, 8)
