import numpy as np
import pytest

from qkdissect.errors import QKDissectError
from qkdissect.synthetic.scenes import (
    COLOURS,
    FEATURES,
    SHAPES,
    SceneObject,
    odd_one_out_scene,
    render_scene,
    shape_mask,
)


def test_masks_and_pixels_agree_exactly():
    rng = np.random.default_rng(1)
    objects = [SceneObject(shape, colour, 9.0, 17.0 * i, (14.0, 14.0 + 24 * i))
               for i, (shape, colour) in enumerate(zip(SHAPES, COLOURS))]
    scene = render_scene(objects, (30, 150), rng, noise=0.0)
    for index, obj in enumerate(objects):
        painted = (scene.image == np.array(COLOURS[obj.colour], dtype=np.uint8)).all(axis=2)
        assert np.array_equal(painted, scene.masks[index])
        assert scene.masks[index].sum() > 20


def test_shape_areas_follow_geometry():
    hw = (201, 201)
    circle = shape_mask(SceneObject("circle", "red", 80.0, 0.0, (100.5, 100.5)), hw).sum()
    square = shape_mask(SceneObject("square", "red", 80.0, 0.0, (100.5, 100.5)), hw).sum()
    assert circle == pytest.approx(np.pi * 80**2, rel=0.01)
    assert square == pytest.approx(2 * 80**2, rel=0.01)  # side r·√2


@pytest.mark.parametrize("feature", FEATURES)
def test_odd_one_out_target_differs_in_feature(feature):
    rng = np.random.default_rng(3)
    for _ in range(5):
        scene = odd_one_out_scene(rng, (96, 128), 5, feature)
        target, distractors = scene.objects[0], scene.objects[1:]
        assert scene.target == 0 and (scene.masks.sum(axis=0) <= 1).all()
        assert len({(d.shape, d.colour, d.radius, d.angle) for d in distractors}) == 1
        changed = {name for name in ("shape", "colour", "radius", "angle")
                   if getattr(target, name) != getattr(distractors[0], name)}
        expected = {"colour": "colour", "shape": "shape", "size": "radius", "orientation": "angle"}
        assert changed == {expected[scene.feature]}


def test_same_seed_same_scene():
    a = odd_one_out_scene(np.random.default_rng(7), (64, 64), 4)
    b = odd_one_out_scene(np.random.default_rng(7), (64, 64), 4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)


def test_bad_requests():
    with pytest.raises(QKDissectError, match="without overlap"):
        odd_one_out_scene(np.random.default_rng(0), (20, 20), 9, "colour", radius=8)
    with pytest.raises(QKDissectError, match="unknown feature"):
        odd_one_out_scene(np.random.default_rng(0), (64, 64), 4, "texture")
