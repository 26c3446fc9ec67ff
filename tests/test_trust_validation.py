"""Validated inputs: every file qkdissect reads is checked on load against its schema (qkdissect.formats); a problem
is one QKDissectError naming the file and the field — never a KeyError, TypeError or IndexError.

Property tests (hypothesis): random corruptions of atlas.json (deleted keys, values of the wrong type) and of its
tensors' shapes; then every other format with a missing key, a wrong type and an inconsistent shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import IMAGE_HW, make_timm_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdissect import ModeAtlas, QKDissectError, dissect

WRONG = st.sampled_from([None, "abc", -1, 2.5, [], {}, True, [1, "x"]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    atlas = dissect(make_timm_vit(seed=4), null_samples=30)
    atlas.save(root / "atlas")
    return root


def fresh(saved: Path, tmp: Path, name: str = "atlas") -> Path:
    target = tmp / f"{name}-{len(list(tmp.iterdir()))}"
    shutil.copytree(saved / name, target)
    return target


def leaves(document, prefix=()):
    """Every (path, value) of a JSON document."""
    if isinstance(document, dict):
        for key, value in document.items():
            yield from leaves(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document[:3]):
            yield from leaves(value, (*prefix, index))
    yield prefix, document


def set_path(document, path, value):
    for part in path[:-1]:
        document = document[part]
    if value is KeyError:
        del document[path[-1]]
    else:
        document[path[-1]] = value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_atlas_json_loads_or_fails_with_one_clear_error(saved, tmp_path, data):
    folder = fresh(saved, tmp_path)
    document = json.loads((folder / "atlas.json").read_text())
    paths = [p for p, _ in leaves(document) if p]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.one_of(st.just(KeyError), WRONG))
    if value is KeyError and isinstance(path[-1], int):
        value = None
    set_path(document, path, value)
    (folder / "atlas.json").write_text(json.dumps(document))
    try:
        atlas = ModeAtlas.load(folder)
    except QKDissectError as error:
        assert str(folder / "atlas.json") in str(error) or str(folder / "atlas.safetensors") in str(error)
    else:  # a field the reader does not need (provenance, per-head summaries) may be anything
        assert atlas.n_layers == 3 and torch.isfinite(atlas.singular_values).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layer=st.integers(0, 2), name=st.sampled_from(["U", "S", "V", "key_bias", "ln_weight"]),
       axis=st.integers(0, 2), delta=st.sampled_from([-1, 1]), drop=st.booleans())
def test_atlas_tensors_must_have_the_shapes_the_json_implies(saved, tmp_path, layer, name, axis, delta, drop):
    from safetensors.torch import load_file, save_file

    folder = fresh(saved, tmp_path)
    tensors = load_file(str(folder / "atlas.safetensors"))
    key = f"layers.{layer}.{name}"
    if drop:
        tensors.pop(key, None)
    elif key in tensors:
        shape = list(tensors[key].shape)
        axis = min(axis, len(shape) - 1)
        shape[axis] = max(1, shape[axis] + delta)
        tensors[key] = torch.zeros(shape)
    save_file(tensors, str(folder / "atlas.safetensors"))
    if drop and name == "ln_weight":
        ModeAtlas.load(folder)  # optional tensor
        return
    with pytest.raises(QKDissectError, match=f"atlas.safetensors.*{key}"):
        ModeAtlas.load(folder)


# ----- the other formats --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def outputs(saved, natural_image_folder):
    """A maps, rank, preference, compare and report folder, an odd-one-out set and a world folder."""
    from qkdissect.adapters import wrap_model
    from qkdissect.comparison import compare
    from qkdissect.preference import run_preference, save_preference
    from qkdissect.report import build_report
    from qkdissect.synthetic.oddoneout import generate_oddoneout
    from qkdissect.synthetic.world import write_world_images
    from qkdissect.views import prepare_view, run_maps, run_rank

    root = saved
    model = wrap_model(make_timm_vit(seed=4), spec="test:vit")
    atlas = ModeAtlas.load(root / "atlas")
    images = sorted(natural_image_folder.iterdir())[:2]
    context = prepare_view(model, atlas)
    run_maps(context, root / "maps", layer=1, head=2, modes=[0, 1], images=images)
    run_rank(context, root / "rank", layers=[0, 1], images=images)
    generate_oddoneout(root / "o3", 4, IMAGE_HW, seed=2, objects=3, radius=5.0)
    save_preference(run_preference(model, root / "o3", atlas=atlas, n_boot=20, top_modes=(1,)), root / "pref",
                    figures=False)
    compare([atlas, atlas], ["a", "b"]).save(root / "cmp", figure=False)
    build_report(atlas, root / "report")
    write_world_images(root / "world", 3, seed=1, size=32)
    return root


def readers():
    from qkdissect.comparison import load_compare
    from qkdissect.preference import load_preference
    from qkdissect.report import load_report
    from qkdissect.synthetic.oddoneout import read_o3_folder
    from qkdissect.synthetic.world import read_world_folder
    from qkdissect.views import load_maps, load_rank

    return {"maps": ("maps.json", load_maps), "rank": ("rank.json", load_rank),
            "pref": ("preference.json", load_preference), "cmp": ("compare.json", load_compare),
            "report": ("report.json", load_report), "o3": ("manifest.json", read_o3_folder),
            "world": ("world.json", read_world_folder)}


CORRUPTIONS = {  # folder: (JSON path, value (KeyError: delete), words in the message)
    "maps": [(("items", 0, "tensors"), KeyError, "items[0].tensors"), (("rank",), "six", "field rank"),
             (("modes", 0, "mode"), 5, "items[0] has modes")],
    "rank": [(("items", 0, "top", 0, "share"), "big", "items[0].top[0].share"), (("by",), "size", "field by")],
    "pref": [(("names",), KeyError, "field names"), (("layers_analysed",), [0], "has shape"),
             (("n_heads",), 0, "field n_heads")],
    "cmp": [(("models", 0, "weighted_cosines"), [[0.1]], "models[0]"), (("models",), [], "field models")],
    "report": [(("n_layers",), "abc", "field n_layers"), (("pages",), KeyError, "field pages")],
    "o3": [(("n",), 9, "n is 9 but 4 images"), (("images", 1, "target", "box"), [1, 2], "images[1].target.box")],
    "world": [(("images", 0, "index"), -4, "images[0].index"), (("config",), {"unknown": 1}, "field config")],
}


@pytest.mark.parametrize("folder,case", [(f, i) for f, cases in CORRUPTIONS.items() for i in range(len(cases))])
def test_every_reader_names_the_file_and_the_field(outputs, tmp_path, folder, case):
    index, read = readers()[folder]
    path, value, words = CORRUPTIONS[folder][case]
    target = fresh(outputs, tmp_path, folder)
    document = json.loads((target / index).read_text())
    set_path(document, path, value)
    (target / index).write_text(json.dumps(document))
    with pytest.raises(QKDissectError) as raised:
        read(target)
    assert str(target) in str(raised.value) and words in str(raised.value), str(raised.value)


def test_maps_and_preference_tensors_are_checked_against_the_json(outputs, tmp_path):
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import load_file, save_file

    from qkdissect.preference import load_preference
    from qkdissect.views import load_maps

    maps = fresh(outputs, tmp_path, "maps")
    item = json.loads((maps / "maps.json").read_text())["items"][0]["tensors"]
    tensors = load_file(str(maps / item))
    tensors["q"] = tensors["q"][:, :-1].contiguous()
    save_file(tensors, str(maps / item))
    with pytest.raises(QKDissectError, match="tensor 'q' has shape"):
        load_maps(maps)
    pref = fresh(outputs, tmp_path, "pref")
    arrays = load_np(str(pref / "preference.safetensors"))
    arrays["head_mean"] = np.ascontiguousarray(arrays["head_mean"][:, :2])
    save_np(arrays, str(pref / "preference.safetensors"))
    with pytest.raises(QKDissectError, match="'head_mean' has shape"):
        load_preference(pref)


def test_rank_csv_rows_are_validated(outputs, tmp_path):
    from qkdissect.views import load_rank

    rank = fresh(outputs, tmp_path, "rank")
    lines = (rank / "rank.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[1] = "first"
    lines[3] = ",".join(cells)
    (rank / "rank.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(QKDissectError, match=r"rank.csv line 4.*field layer"):
        load_rank(rank)


def test_dynamics_results_are_validated(tmp_path):
    from qkdissect.dynamics.runs.common import load_results

    document = {"format": "qkdissect-dynamics", "format_version": 1, "command": "icl", "parameters": {},
                "timings_seconds": {"total": 1.0}, "versions": {"torch": "x"}, "definitions": {}, "variants": [],
                "summary": {}, "findings": {}, "figures": []}
    (tmp_path / "results.json").write_text(json.dumps(document))
    assert load_results(tmp_path, "icl")["command"] == "icl"
    for key, value, words in (("findings", KeyError, "lack findings"), ("parameters", "x", "field parameters"),
                              ("timings_seconds", {}, "lacks 'total'"), ("format_version", "1", "integer version")):
        broken = dict(document)
        if value is KeyError:
            del broken[key]
        else:
            broken[key] = value
        (tmp_path / "results.json").write_text(json.dumps(broken))
        with pytest.raises(QKDissectError, match=words):
            load_results(tmp_path, "icl")


def test_writers_refuse_what_their_reader_would_refuse(saved):
    from qkdissect.formats import validated
    from qkdissect.formats.atlas import AtlasDocument

    atlas = ModeAtlas.load(saved / "atlas")
    document = atlas.to_json()
    validated(AtlasDocument, document, "atlas.json", "x")
    document["d_model"] = "wide"
    with pytest.raises(QKDissectError, match="field d_model"):
        validated(AtlasDocument, document, "atlas.json", "x")
