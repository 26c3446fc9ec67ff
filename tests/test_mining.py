"""Streaming top-k mining against brute force; exact merge, resume, sharding, bad files, loaders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_hf, make_timm_vit, save_timm_folder

from qkdissect import dissect
from qkdissect.adapters import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.images import list_images, open_image
from qkdissect.mining import load_mined, mine, render_contact_sheet
from qkdissect.mining.engine import MiningEngine
from qkdissect.mining.run import CRASH_HOOK
from qkdissect.mining.state import TopK, empty_state, merge_topk
from qkdissect.projection import capture_attention_inputs, project
from qkdissect.views import scores_from_maps

TESTS = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def write_bad_files(folder: Path) -> None:
    """The five kinds of bad file: empty, text named .jpg, truncated PNG, 1×1, 1000×5."""
    from PIL import Image

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a picture\n")
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "whole.png").unlink()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    Image.new("RGB", (1000, 5), "blue").save(folder / "sub" / "wide.png")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """13 good images (crops, flips, grey, RGBA, palette, nested) and the five bad kinds."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("mining")
    (folder / "sub").mkdir()
    sources = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "camera", "rocket")}
    count = 0
    for name, array in sources.items():
        image = Image.fromarray(array)
        image.save(folder / f"{name}.png")
        w, h = image.size
        image.crop((w // 4, h // 5, w // 4 + w // 2, h // 5 + h // 2)).save(folder / "sub" / f"{name}_crop.jpg")
        count += 2
    Image.fromarray(sources["chelsea"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("RGBA").save(folder / "flip.png")
    Image.fromarray(sources["coffee"]).convert("P").save(folder / "sub" / "palette.bmp")
    Image.fromarray(sources["astronaut"]).convert("L").save(folder / "grey.webp")
    write_bad_files(folder)
    return folder


@pytest.fixture(scope="module")
def model():
    return wrap_model(make_timm_vit(seed=5), spec="test:tiny-timm-vit")


@pytest.fixture(scope="module")
def atlas(model):
    return dissect(model, dtype="float64", null_samples=10)


def brute_force(model, atlas, folder: Path, top_k: int):
    """Every good image alone, dense float64 projections; sorted by (−score, index) in Python."""
    paths = list_images(folder)
    preprocessing = model.preprocessing
    n_prefix = len(model.adapter.prefix_tokens)
    per_image, maps = {}, {}
    for index, path in enumerate(paths):
        try:
            pixels = preprocessing(open_image(path))[None]
        except QKDissectError:
            continue
        captured = capture_attention_inputs(model, pixels)
        q = torch.stack([project(atlas, layer, captured[layer])[0][0, :, n_prefix:] for layer in range(atlas.n_layers)])
        k = torch.stack([project(atlas, layer, captured[layer])[1][0, :, n_prefix:] for layer in range(atlas.n_layers)])
        q, k = q.permute(0, 1, 3, 2), k.permute(0, 1, 3, 2)  # (L, H, r, P)
        per_image[index] = scores_from_maps(q, k)  # scores, q_arg, k_arg: (L, H, r, 2)
        maps[index] = (q, k)
    L, H, r = atlas.n_layers, atlas.n_heads, atlas.rank
    expected = {}
    for slot in np.ndindex(L, H, r, 2):
        ranked = sorted(per_image, key=lambda i: (-float(per_image[i][0][slot]), i))[:top_k]
        expected[slot] = [(i, float(per_image[i][0][slot]), int(per_image[i][1][slot]), int(per_image[i][2][slot]))
                          for i in ranked]
    return expected, per_image, maps


def assert_matches_brute_force(result, expected, top_k, tol=1e-4):
    for slot, rows in expected.items():
        got_scores = result.topk.scores[slot]
        bf_scores = torch.tensor([s for _, s, _, _ in rows], dtype=torch.float32)
        torch.testing.assert_close(got_scores[: len(rows)], bf_scores, rtol=tol, atol=1e-6)
        for j, (index, score, q_pos, k_pos) in enumerate(rows):
            neighbours = [rows[j - 1][1]] if j else []
            neighbours += [rows[j + 1][1]] if j + 1 < len(rows) else []
            if all(abs(score - other) > tol * abs(score) + 1e-6 for other in neighbours):
                assert int(result.topk.image[slot][j]) == index, (slot, j)
                assert int(result.topk.query_pos[slot][j]) == q_pos and int(result.topk.key_pos[slot][j]) == k_pos


@pytest.fixture(scope="module")
def expected_top4(model, atlas, image_folder):
    return brute_force(model, atlas, image_folder, 4)


@pytest.mark.parametrize("route", ["qk", "x"])
def test_streaming_topk_equals_brute_force(route, model, atlas, image_folder, expected_top4, tmp_path):
    top_k = 4
    result = mine(model, image_folder, tmp_path / "mined", top_k=top_k, batch_size=5, atlas=atlas, route=route,
                  sheet_modes=(0, 2), sheets=False)
    assert result.meta["routes"] == [route] * atlas.n_layers
    expected, per_image, maps = expected_top4
    assert_matches_brute_force(result, expected, top_k)
    assert int(result.stats["images"]) == len(per_image) == 13
    # running statistics over every patch token of every good image
    q_all = torch.stack([maps[i][0] for i in sorted(maps)])  # (images, L, H, r, P)
    k_all = torch.stack([maps[i][1] for i in sorted(maps)])
    for name, values in (("q", q_all), ("k", k_all)):
        flat = values.permute(1, 2, 3, 0, 4).reshape(*values.shape[1:4], -1)
        torch.testing.assert_close(result.stats[f"{name}_mean"], flat.mean(-1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.stats[f"{name}_std"], flat.std(-1, unbiased=False), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.stats[f"{name}_max"], flat.amax(-1).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result.stats[f"{name}_min"], flat.amin(-1).float(), rtol=1e-4, atol=1e-5)
    # the stored maps of the sheet modes are those of the kept images
    for (layer, head, mode, sign) in [(0, 1, 0, 0), (2, 3, 2, 1), (1, 0, 2, 0)]:
        position = result.map_modes.index(mode)
        for j, index in enumerate(result.topk.image[layer, head, mode, sign].tolist()):
            stored = result.topk.maps[layer, head, position, sign, j].float()
            torch.testing.assert_close(stored[0], maps[index][0][layer, head, mode].float(), rtol=2e-3, atol=2e-3)
            torch.testing.assert_close(stored[1], maps[index][1][layer, head, mode].float(), rtol=2e-3, atol=2e-3)


def test_bad_files_are_skipped_counted_and_logged(model, atlas, image_folder, tmp_path):
    result = mine(model, image_folder, tmp_path / "mined", top_k=2, batch_size=4, atlas=atlas, sheets=False,
                  sheet_modes=(), workers=2)  # decoded in DataLoader worker processes
    reasons = dict(result.bad)
    kinds = {"empty.jpg": "empty", "text.jpg": "not an image", "truncated.png": "truncated",
             "tiny.png": "too small", "sub/wide.png": "aspect ratio"}
    assert set(reasons) == set(kinds)
    for name, words in kinds.items():
        assert words in reasons[name], reasons[name]
    log = (tmp_path / "mined" / "bad_images.log").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in log) == sorted(kinds)
    assert result.meta["n_bad"] == 5 and result.meta["n_processed"] == 13 and result.meta["n_images"] == 18
    bad_indices = {result.image_paths.index(name) for name in kinds}
    assert not bad_indices & set(result.topk.image.flatten().tolist())


def test_merge_is_exact_with_ties_in_any_grouping():
    generator = torch.Generator().manual_seed(0)
    shape, k, n = (2, 3, 4, 2), 5, 40
    scores = torch.randint(0, 6, (*shape, n), generator=generator).float()  # many exact ties
    positions = torch.randint(0, 30, (*shape, n), generator=generator).int()
    images = torch.arange(n)

    def candidates(idx):
        return TopK(scores=scores[..., idx], image=images[idx], query_pos=positions[..., idx],
                    key_pos=positions[..., idx] + 1)

    def run(order):
        state, _ = empty_state(*shape[:3], k, 0, 1)
        for chunk in order:
            state = merge_topk(state, candidates(torch.tensor(chunk)))
        return state

    streaming = run([list(range(i, min(i + 7, n))) for i in range(0, n, 7)])
    shuffled = run([[39, 3, 17], list(range(20, 39)), [0, 1, 2] + list(range(4, 17)) + [18, 19]])
    left, right = run([list(range(0, 20))]), run([list(range(20, 40))])
    merged = merge_topk(right, left)  # shards merged in the other order
    for state in (shuffled, merged):
        for name in ("scores", "image", "query_pos", "key_pos"):
            assert torch.equal(getattr(state, name), getattr(streaming, name)), name
    for slot in np.ndindex(*shape):
        expected = sorted(range(n), key=lambda i: (-float(scores[slot + (i,)]), i))[:k]
        assert streaming.image[slot].tolist() == expected


def assert_same_result(a, b, exact_stats=True):
    for name in ("scores", "image", "query_pos", "key_pos", "maps"):
        x, y = getattr(a.topk, name), getattr(b.topk, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    for name, value in a.stats.items():
        if exact_stats:
            assert torch.equal(value, b.stats[name]), name
        else:
            torch.testing.assert_close(value, b.stats[name], rtol=1e-9, atol=1e-12)
    assert sorted(a.bad) == sorted(b.bad)


def test_killed_run_resumes_to_the_same_result(model, atlas, image_folder, tmp_path, monkeypatch):
    settings = dict(top_k=3, batch_size=2, atlas=atlas, sheets=False, sheet_modes=(1,), checkpoint_every=2)
    single = mine(model, image_folder, tmp_path / "single", **settings)
    monkeypatch.setenv(CRASH_HOOK, "5")  # dies after batch 5, one batch after the checkpoint at batch 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        mine(model, image_folder, tmp_path / "resumed", **settings)
    checkpoints = list((tmp_path / "resumed" / "checkpoint").glob("*.safetensors"))
    assert len(checkpoints) == 1 and not (tmp_path / "resumed" / "mined.json").exists()
    with pytest.raises(QKDissectError, match="--resume"):
        mine(model, image_folder, tmp_path / "resumed", **settings)
    with pytest.raises(QKDissectError, match="top_k"):
        mine(model, image_folder, tmp_path / "resumed", resume=True, **{**settings, "top_k": 4})
    other = wrap_model(make_timm_vit(seed=6), spec="test:tiny-timm-vit")
    with pytest.raises(QKDissectError, match="weights"):
        mine(other, image_folder, tmp_path / "resumed", resume=True, **{**settings, "atlas": None})
    monkeypatch.setenv(CRASH_HOOK, "2")  # a second crash before the next checkpoint
    with pytest.raises(RuntimeError):
        mine(model, image_folder, tmp_path / "resumed", resume=True, **settings)
    monkeypatch.delenv(CRASH_HOOK)
    resumed = mine(model, image_folder, tmp_path / "resumed", resume=True, **settings)
    assert_same_result(single, resumed)
    assert not (tmp_path / "resumed" / "checkpoint").exists()
    again = mine(model, image_folder, tmp_path / "resumed", resume=True, **settings)  # finished: just loads
    assert_same_result(single, again)


def test_two_ranks_under_torchrun_equal_a_single_run(model, atlas, image_folder, tmp_path):
    """`torchrun --nproc_per_node 2 -m qkdissect mine` (gloo, CPU) merges to exactly the single-process top-k."""
    folder = save_timm_folder(model.model, tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "qkdissect", "mine",
                           str(folder), "--images", str(image_folder), "--out", str(tmp_path / "sharded"), "--top", "3",
                           "--batch-size", "2", "--workers", "0", "--sheets-modes", "0", "--checkpoint-every", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("strongest modes") == 1  # only rank 0 reports
    sharded = load_mined(tmp_path / "sharded")
    assert sharded.meta["world_size"] == 2 and len(sharded.meta["sheets"]) == 3 * 4 * 2
    single = mine(model, image_folder, tmp_path / "single", top_k=3, batch_size=2, atlas=atlas, sheets=False,
                  sheet_modes=(0,))
    assert_same_result(single, sharded, exact_stats=False)
    assert not (tmp_path / "sharded" / "checkpoint").exists()


def test_qk_route_equals_x_route_on_hf_models(hf_model):
    if hf_model.adapter.modality != "image":
        pytest.skip("mining reads images")
    from helpers import image_batch

    atlas = dissect(hf_model, dtype="float64", null_samples=10)
    grid = hf_model.adapter.patch_grid(hf_model.preprocessing.image_size)
    pixels = image_batch(3, hw=hf_model.preprocessing.image_size)
    engines = [MiningEngine(hf_model, atlas, range(atlas.n_layers), top_k=2, map_modes=[0, 3], grid=grid, route=r)
               for r in ("qk", "x")]
    assert engines[0].route_kinds == ["qk"] * atlas.n_layers
    fast, general = (e.candidates(e.project_batch(pixels), torch.arange(3)) for e in engines)
    torch.testing.assert_close(fast[0].scores, general[0].scores, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[0].maps.float(), general[0].maps.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(fast[1].total, general[1].total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast[1].squares, general[1].squares, rtol=1e-4, atol=1e-4)


def test_folded_atlas_mines_the_same_images(model, atlas, image_folder, tmp_path):
    folded = dissect(model, fold_ln=True, dtype="float64", null_samples=10)
    grid = model.adapter.patch_grid(model.preprocessing.image_size)
    pixels = torch.stack([model.preprocessing(open_image(p)) for p in sorted(image_folder.glob("*.png"))[:4]])
    plain = MiningEngine(model, atlas, [0, 2], top_k=2, map_modes=[], grid=grid)
    for route in ("qk", "x"):
        engine = MiningEngine(model, folded, [0, 2], top_k=2, map_modes=[], grid=grid, route=route)
        # folded modes act on n = (x̃ − β)/γ: same singular values, different vectors, both routes agree
        a = engine.candidates(engine.project_batch(pixels), torch.arange(4))[0]
        b = MiningEngine(model, folded, [0, 2], top_k=2, map_modes=[], grid=grid, route="x")
        b = b.candidates(b.project_batch(pixels), torch.arange(4))[0]
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
    assert plain.route_kinds == ["qk", "qk"]


def test_contact_sheets_and_loader(model, atlas, image_folder, tmp_path):
    from PIL import Image

    result = mine(model, image_folder, tmp_path / "mined", top_k=4, batch_size=8, atlas=atlas, layers=[1],
                  sheet_modes=(0,))
    sheets = result.meta["sheets"]
    assert len(sheets) == atlas.n_heads * 2 and all((tmp_path / "mined" / s["png"]).is_file() for s in sheets)
    assert Image.open(tmp_path / "mined" / sheets[0]["png"]).size[0] > 4 * 100
    top = result.top(1, 2, 0, "-")
    assert len(top) == 4 and top[0]["score"] >= top[-1]["score"] and Path(top[0]["path"]).is_file()
    # a mode without stored maps: recomputed with the model, equal to what the stored maps would be
    from qkdissect.mining.sheets import recompute_maps

    rows = result.top(1, 2, 0, 0)
    recomputed = recompute_maps(result, model, 1, 2, 0, rows)
    stored = result.topk.maps[0, 2, 0, 0]
    for row, (q, k) in zip(rows, recomputed):
        torch.testing.assert_close(q, stored[row["rank"], 0].float(), rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(k, stored[row["rank"], 1].float(), rtol=2e-3, atol=2e-3)
    drawn = render_contact_sheet(tmp_path / "mined", 1, 3, 5, "+", tmp_path / "m5.png", model=model)
    rings = render_contact_sheet(tmp_path / "mined", 1, 3, 5, "+", tmp_path / "m5_rings.png")
    assert drawn.is_file() and rings.is_file()
    other = wrap_model(make_timm_vit(seed=9))
    with pytest.raises(QKDissectError, match="weights differ"):
        render_contact_sheet(tmp_path / "mined", 1, 3, 5, "+", tmp_path / "x.png", model=other)
    with pytest.raises(QKDissectError, match="not mined"):
        result.top(0, 0, 0, 0)
    with pytest.raises(QKDissectError, match="not a finished"):
        load_mined(tmp_path)


def test_mine_refuses_text_models_and_empty_folders(tmp_path, model):
    with pytest.raises(QKDissectError, match="reads images"):
        mine(wrap_model(make_hf("bert")), tmp_path, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(QKDissectError, match="no images"):
        mine(model, tmp_path / "empty", tmp_path / "out")
