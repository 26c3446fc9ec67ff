"""The HTML report without a browser: files and manifest, numbers on the pages against dense maths,
navigation links, escaping of user text, the comparison page, the CLI and bad input.
(tests/test_report_browser.py drives the same reports in headless Chromium.)"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers import D_HEAD, D_MODEL, N_HEADS, N_LAYERS, make_hf, make_timm_vit
from typer.testing import CliRunner

from qkdissect import ModeAtlas, QKDissectError, dissect
from qkdissect.adapters import wrap_model
from qkdissect.cli import app
from qkdissect.report import build_report, head_page_name, load_report
from qkdissect.report.charts import cosine_range, diverging_color, nice_ticks

EVIL = 'evil"<script>alert(1)</script><img src=x onerror=alert(2)>'
runner = CliRunner()


class Elements(HTMLParser):
    """Every start tag as (tag, attrs dict, index); the text inside <script> blocks."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(path: Path) -> Elements:
    parser = Elements()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def dense_statistics(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a timm ViT's fused qkv weights, densely: C = tr(M)/‖M‖_* (L, H), σ (L, H, r) and
    cos_k = u_k·v_k (L, H, r) of M_h = W_q,hᵀ W_k,h via a full d_model × d_model SVD."""
    C, S, cos = [], [], []
    for block in model.blocks:
        weight = block.attn.qkv.weight.detach().double()
        W_q = weight[:D_MODEL].reshape(N_HEADS, D_HEAD, D_MODEL)
        W_k = weight[D_MODEL:2 * D_MODEL].reshape(N_HEADS, D_HEAD, D_MODEL)
        M = W_q.transpose(1, 2) @ W_k
        U, sigma, Vh = torch.linalg.svd(M)
        C.append(torch.diagonal(M, dim1=1, dim2=2).sum(-1) / sigma.sum(-1))
        S.append(sigma[:, :D_HEAD])
        cos.append((U[:, :, :D_HEAD] * Vh[:, :D_HEAD, :].transpose(1, 2)).sum(1))
    return torch.stack(C), torch.stack(S), torch.stack(cos)


@pytest.fixture(scope="module")
def vit():
    return make_timm_vit(seed=3)


@pytest.fixture(scope="module")
def atlas_dir(vit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("atlas")
    dissect(wrap_model(vit, spec=EVIL), dtype="float64", null_samples=60).save(folder)
    return folder


@pytest.fixture(scope="module")
def report(atlas_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reports") / "report"
    calls = []
    result = build_report(atlas_dir, out, progress=lambda _stage, done, total: calls.append((done, total)))
    assert calls[-1] == (N_LAYERS * N_HEADS, N_LAYERS * N_HEADS) and len(calls) == N_LAYERS * N_HEADS
    return result


def test_files_manifest_and_local_references(report):
    out = report.out
    assert report.index == out / "index.html" and report.index.is_file()
    heads = sorted((out / "heads").glob("*.html"))
    assert len(heads) == report.n_head_pages == N_LAYERS * N_HEADS
    assert (out / "heads" / head_page_name(2, 3, N_LAYERS, N_HEADS)).is_file()
    manifest = load_report(out)
    assert manifest["n_layers"] == N_LAYERS and manifest["n_heads"] == N_HEADS and manifest["model"] == EVIL
    assert len(manifest["pages"]) == report.n_pages == 1 + N_LAYERS * N_HEADS
    assert not list(out.parent.glob(".report.*")), "temporary build folders left behind"
    for page in [report.index, *heads]:
        elements = parse(page)
        for _tag, attrs in elements.tags:
            for name in ("src", "href"):
                ref = attrs.get(name)
                if ref is None or ref.startswith("#"):
                    continue
                assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", ref, re.I), f"{page.name}: non-local {name}={ref}"
                assert (page.parent / ref.split("#")[0]).is_file(), f"{page.name}: {ref} does not exist"
        assert [t for t, _ in elements.tags if t == "link"] == []  # no external stylesheets
        assert sum(t == "script" for t, _ in elements.tags) == 1  # only the inlined report script


def test_content_security_policy_admits_exactly_the_inlined_script(report):
    elements = parse(report.index)
    csp = next(a["content"] for t, a in elements.tags
               if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "connect-src" not in csp  # default 'none' covers fetch/XHR
    digest = base64.b64encode(hashlib.sha256(elements.scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp and "unsafe-inline' " not in csp.split("script-src")[1]


def test_heat_map_values_match_dense_trace_over_nuclear(report, vit, atlas_dir):
    C, _, _ = dense_statistics(vit)
    band = ModeAtlas.load(atlas_dir).null.weighted_band
    cells = [a for t, a in parse(report.index).tags if t == "a" and "cell" in (a.get("class") or "").split()]
    assert len(cells) == N_LAYERS * N_HEADS
    seen = set()
    for attrs in cells:
        layer, head, value = int(attrs["data-layer"]), int(attrs["data-head"]), float(attrs["data-value"])
        seen.add((layer, head))
        assert value == pytest.approx(float(C[layer, head]), abs=1e-5)
        assert attrs["href"] == f"heads/{head_page_name(layer, head, N_LAYERS, N_HEADS)}"
        assert ("in-null" in attrs["class"]) == (band[0] <= value <= band[1])
        colour = re.search(r"background-color: #([0-9a-f]{6})", attrs["style"]).group(1)
        red, blue = int(colour[:2], 16), int(colour[4:], 16)
        assert (red > blue) == (value > 0) or abs(value) < 1e-3
    assert len(seen) == N_LAYERS * N_HEADS


def test_head_page_charts_and_table_encode_the_dense_spectrum(report, vit, atlas_dir):
    _, S, cos = dense_statistics(vit)
    band = ModeAtlas.load(atlas_dir).null.cosine_band
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        page = report.out / "heads" / head_page_name(layer, head, N_LAYERS, N_HEADS)
        tags = parse(page).tags
        bars = [a for t, a in tags if t == "rect" and "bar" in (a.get("class") or "")]
        dots = [a for t, a in tags if t == "circle" and "dot" in (a.get("class") or "")]
        assert [int(a["data-k"]) for a in bars] == list(range(D_HEAD)) == [int(a["data-k"]) for a in dots]
        sigma = torch.tensor([float(a["data-value"]) for a in bars], dtype=torch.float64)
        torch.testing.assert_close(sigma, S[layer, head], rtol=1e-5, atol=0)
        heights = torch.tensor([float(a["height"]) for a in bars], dtype=torch.float64)
        torch.testing.assert_close(heights / heights[0], sigma / sigma[0], rtol=2e-3, atol=2e-3)  # bars ∝ σ from 0
        values = torch.tensor([float(a["data-value"]) for a in dots], dtype=torch.float64)
        torch.testing.assert_close(values, cos[layer, head], rtol=0, atol=1e-5)
        # cy is one linear map of the cosine: y = a − b·cos with b > 0, as drawn on the axis
        y = torch.tensor([float(a["cy"]) for a in dots], dtype=torch.float64)
        design = torch.stack([torch.ones_like(values), values], 1)
        fit = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
        assert fit[1] < 0 and torch.allclose(design @ fit, y, atol=0.02)
        lo, hi = band
        for attrs, value in zip(dots, values.tolist()):
            expected = "above" if value > hi else "below" if value < lo else "inside"
            assert expected in attrs["class"]
        rows = re.findall(r"<tr><td>(\d+)</td>", page.read_text().split('id="modes"')[1].split("</table>")[0])
        assert rows == [str(k) for k in range(D_HEAD)]


def local_references_exist(page: Path) -> int:
    """Every src/href of ``page`` is a relative path to an existing file; returns how many <img> it has."""
    images = 0
    for tag, attrs in parse(page).tags:
        images += tag == "img"
        for name in ("src", "href"):
            ref = attrs.get(name)
            if ref and not ref.startswith("#"):
                assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//", ref, re.I), ref
                assert (page.parent / ref.split("#")[0]).is_file(), ref
    return images


def test_navigation_links(report):
    def body(layer, head):
        page = report.out / "heads" / head_page_name(layer, head, N_LAYERS, N_HEADS)
        return next(a for t, a in parse(page).tags if t == "body")

    def name(layer, head):
        return head_page_name(layer, head, N_LAYERS, N_HEADS)

    middle = body(1, 2)
    assert (middle["data-prev"], middle["data-next"]) == (name(1, 1), name(1, 3))
    assert (middle["data-up"], middle["data-down"]) == (name(0, 2), name(2, 2))
    assert middle["data-home"] == "../index.html"
    wrap = body(1, N_HEADS - 1)
    assert wrap["data-next"] == name(2, 0) and body(2, 0)["data-prev"] == name(1, N_HEADS - 1)
    first, last = body(0, 0), body(N_LAYERS - 1, N_HEADS - 1)
    assert "data-prev" not in first and "data-up" not in first and first["data-down"] == name(1, 0)
    assert "data-next" not in last and "data-down" not in last


def test_user_text_is_escaped_everywhere(report):
    escaped = "evil&#34;&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;"
    for page in [report.index, *sorted((report.out / "heads").glob("*.html"))[:3]]:
        text = page.read_text()
        assert "<script>alert" not in text and "<img src=x" not in text
        assert escaped in text
        assert not any(t == "img" and a.get("src") == "x" for t, a in parse(page).tags)


def test_chart_and_colour_helpers():
    assert diverging_color(0.0, 0.5) == "#f7f7f7"
    assert diverging_color(0.5, 0.5) == "#b2182b" and diverging_color(9.0, 0.5) == "#b2182b"
    assert diverging_color(-0.5, 0.5) == "#2166ac" and diverging_color(float("nan"), 1.0) == "#f7f7f7"
    redness = [int(c[1:3], 16) - int(c[5:7], 16) for c in (diverging_color(v / 10, 1.0) for v in range(-10, 11))]
    assert redness == sorted(redness) and redness[0] < 0 < redness[-1]
    ticks = nice_ticks(-0.37, 0.81, 5)
    assert ticks[0] >= -0.37 and ticks[-1] <= 0.81 and 0.0 in ticks
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert len(steps) == 1 and steps.pop() in (0.2, 0.25, 0.5)
    assert cosine_range([0.93], (-0.1, 0.1)) == (-1.0, 1.0) and cosine_range([0.02], (-0.07, 0.07)) == (-0.1, 0.1)


@pytest.fixture(scope="module")
def second_atlas(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    dissect(wrap_model(make_timm_vit(seed=9, depth=5), spec="test:deeper<b>"), null_samples=60).save(folder)
    return folder


def test_compare_page_with_atlas_and_compare_folders(atlas_dir, second_atlas, tmp_path):
    result = runner.invoke(app, ["compare", str(atlas_dir), str(second_atlas), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    report = build_report(atlas_dir, out, compare=[second_atlas, tmp_path / "cmp"])
    assert "compare" in report.sections and (out / "compare.html").is_file()
    text = (out / "compare.html").read_text()
    assert "test:deeper&lt;b&gt;" in text and "<b>" not in text
    tags = parse(out / "compare.html").tags
    figures = [a["src"] for t, a in tags if t == "img"]
    assert figures == ["img/compare.png", "img/compare_0.png"] and all((out / f).is_file() for f in figures)
    rows = re.findall(r"<tr><td class=\"text\">", text.split('id="compare-models"')[1].split("</table>")[0])
    assert len(rows) == 1 + 1 + 2  # this model, the atlas, the two models of the compare folder
    layer_rows = re.findall(r"<tr><td>\d+</td>", text.split('id="compare-layers"')[1])
    assert len(layer_rows) == 5  # the deepest model's layers
    assert 'href="compare.html"' in report.index.read_text()


def test_bad_input_writes_nothing_and_keeps_foreign_folders(atlas_dir, tmp_path):
    with pytest.raises(QKDissectError, match="not an atlas folder"):
        build_report(tmp_path / "nowhere", tmp_path / "r1")
    with pytest.raises(QKDissectError, match="expected an atlas folder .* or a comparison folder"):
        build_report(atlas_dir, tmp_path / "r2", compare=[tmp_path])
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.json").write_text('{"models": [{"label": "x"}]}')
    with pytest.raises(QKDissectError, match="not a readable `qkdissect compare` result"):
        build_report(atlas_dir, tmp_path / "r3", compare=[tmp_path / "cmp"])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "index.html").write_text("my own page")
    with pytest.raises(QKDissectError, match="not a previous qkdissect report"):
        build_report(atlas_dir, foreign)
    assert (foreign / "index.html").read_text() == "my own page" and len(list(foreign.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    with pytest.raises(QKDissectError, match="is a file"):
        build_report(atlas_dir, tmp_path / "file")


def test_rebuilding_replaces_a_previous_report(atlas_dir, tmp_path):
    small = ModeAtlas.load(atlas_dir)
    out = tmp_path / "report"
    build_report(small, out)
    (out / "heads" / "stale.html").write_text("old")  # not written by qkdissect: it stays (qkdissect.outputs)
    fewer = ModeAtlas(meta=small.meta, layers=small.layers[:2], null=small.null)
    result = build_report(fewer, out)
    assert result.n_head_pages == 2 * N_HEADS and len(list((out / "heads").glob("layer*.html"))) == 2 * N_HEADS
    assert (out / "heads" / "stale.html").read_text() == "old"
    assert load_report(out)["n_layers"] == 2 and not list(tmp_path.glob(".report.*"))


def test_load_report_rejects_other_folders(tmp_path):
    with pytest.raises(QKDissectError, match="not a qkdissect report folder"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("[broken")
    with pytest.raises(QKDissectError, match="corrupt"):
        load_report(tmp_path)


def test_cli_end_to_end_from_a_saved_model_folder(tmp_path):
    make_hf("vit", seed=2).save_pretrained(tmp_path / "model")
    assert runner.invoke(app, ["dissect", str(tmp_path / "model"), "--out", str(tmp_path / "atlas"),
                               "--null-samples", "40"]).exit_code == 0
    result = runner.invoke(app, ["report", str(tmp_path / "atlas"), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "head pages" in result.output and "index.html" in result.output
    assert json.loads((tmp_path / "report" / "report.json").read_text())["inputs"]["atlas"] == str(tmp_path / "atlas")
    assert len(list((tmp_path / "report" / "heads").glob("*.html"))) == N_LAYERS * N_HEADS


@pytest.mark.parametrize("args, message", [
    (["report", "/nonexistent_atlas"], "not an atlas folder"),
    (["report", "{atlas}", "--compare", "/nonexistent_cmp", "--out", "{tmp}/r"], "expected an atlas folder"),
])
def test_cli_errors_exit_2_without_traceback(args, message, atlas_dir, tmp_path):
    args = [a.format(atlas=atlas_dir, tmp=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and message in result.output.replace("\n", " ")
    assert "Traceback" not in result.output


def test_cli_help_documents_keys_and_offline_use():
    result = runner.invoke(app, ["report", "--help"])
    assert result.exit_code == 0
    assert "--compare" in result.output and "Esc" in result.output and "network" in result.output


@pytest.fixture(scope="module")
def preference_dir(vit, tmp_path_factory):
    """Odd-one-out images at the tiny models' size, measured on the same model as ``atlas_dir``."""
    from helpers import IMAGE_HW

    from qkdissect.preference import run_preference, save_preference
    from qkdissect.synthetic.oddoneout import generate_oddoneout

    data, out = tmp_path_factory.mktemp("odd"), tmp_path_factory.mktemp("pref")
    generate_oddoneout(data, 10, IMAGE_HW, seed=2, objects=3, radius=6.0)
    result = run_preference(wrap_model(vit, spec="test:pref<i>"), data, top_modes=(1,), n_boot=50, batch_size=5)
    save_preference(result, out, figures=False)
    return out


def test_preference_page_and_head_tables(atlas_dir, preference_dir, tmp_path):
    from qkdissect.preference import CATEGORIES, QUERIES, VARIANTS, load_preference

    result = load_preference(preference_dir)
    report = build_report(atlas_dir, tmp_path / "report", preference=preference_dir)
    assert "preference" in report.sections and load_report(report.out)["inputs"]["preference"] == str(preference_dir)
    page = report.out / "preference.html"
    text = page.read_text()
    assert "test:pref&lt;i&gt;" in text and "<i>" not in text
    tags = parse(page).tags
    assert [a["src"] for t, a in tags if t == "img"] == ["img/preference.png", "img/preference_modes.png"]
    assert all((report.out / "img" / n).is_file() for n in ("preference.png", "preference_modes.png"))
    # per-head grid: the mean over images of the per-image area-normalised same-object share of target queries
    per_image = result.shares[:, :, :, QUERIES.index("target"), result.sources.index("measured"),
                              VARIANTS.index("area"), CATEGORIES.index("same")].astype("float64")
    cells = [a for t, a in tags if t == "a" and a.get("class") == "pcell"]
    assert len(cells) == N_LAYERS * N_HEADS
    for attrs in cells:
        layer, head = map(int, re.search(r"layer=?(\d+)_head(\d+)", attrs["href"]).groups())
        shown = float(re.search(r": ([0-9.]+)$", attrs["title"]).group(1))
        assert shown == pytest.approx(float(torch.tensor(per_image[:, layer, head]).nanmean()), abs=0.006)
    # head page: raw shares of this head; same + other + background = 1 for each query
    head_text = (report.out / "heads" / head_page_name(1, 2, N_LAYERS, N_HEADS)).read_text()
    table = head_text.split('id="head-preference"')[1].split("</table>")[0]
    rows = re.findall(r"<tr><td class=\"text\">(\w+) \(\d+ images\)</td>(.*?)</tr>", table, re.S)
    assert [q for q, _ in rows] == list(QUERIES)
    for _, row in rows:
        shares = [float(v) for v in re.findall(r'<td class="text">([0-9.]+) <span', row)]
        assert len(shares) == 3 and sum(shares) == pytest.approx(1.0, abs=2e-3)
    assert 'href="preference.html"' in report.index.read_text()


def test_preference_of_another_shape_is_shown_with_a_note(second_atlas, preference_dir, tmp_path):
    report = build_report(second_atlas, tmp_path / "report", preference=preference_dir)
    text = (report.out / "preference.html").read_text()
    assert 'id="preference-mismatch"' in text and "3 layers × 4 heads" in text and 'class="pcell"' not in text
    assert 'id="head-preference"' not in (report.out / "heads" / head_page_name(0, 0, 5, N_HEADS)).read_text()
    with pytest.raises(QKDissectError, match="not a preference folder"):
        build_report(second_atlas, tmp_path / "r2", preference=tmp_path)
    assert not (tmp_path / "r2").exists()


EVIL_FILE = 'a<b>&"c.png'


@pytest.fixture(scope="module")
def image_folder(natural_image_folder, tmp_path_factory):
    """The natural images plus a copy of one under a file name full of HTML characters."""
    folder = tmp_path_factory.mktemp("images")
    for path in sorted(natural_image_folder.iterdir())[:4]:
        shutil.copyfile(path, folder / path.name)
    shutil.copyfile(natural_image_folder / "astronaut.png", folder / EVIL_FILE)
    return folder


@pytest.fixture(scope="module")
def mined_dir(vit, atlas_dir, image_folder, tmp_path_factory):
    from qkdissect.mining import mine

    out = tmp_path_factory.mktemp("mined") / "mined"
    mine(wrap_model(vit, spec=EVIL), image_folder, out, top_k=3, batch_size=3, layers=[0, 2], sheet_modes=(0, 2),
         atlas=ModeAtlas.load(atlas_dir), sheets=False)
    return out


@pytest.fixture(scope="module")
def maps_dir(vit, atlas_dir, image_folder, tmp_path_factory):
    from qkdissect.views import prepare_view, run_maps

    out = tmp_path_factory.mktemp("maps") / "maps"
    run_maps(prepare_view(wrap_model(vit, spec=EVIL), ModeAtlas.load(atlas_dir)), out, layer=1, head=2, modes=(0, 1),
             images=[image_folder / "coffee.png", image_folder / EVIL_FILE])
    return out


@pytest.fixture(scope="module")
def views_report(atlas_dir, mined_dir, maps_dir, tmp_path_factory):
    return build_report(atlas_dir, tmp_path_factory.mktemp("views") / "report", mined=mined_dir, maps=[maps_dir])


def query_key_maps(vit, image_path: Path, layer: int, u: torch.Tensor, v: torch.Tensor, grid=(5, 7)):
    """q = u·x̃_p, k = v·x̃_p on the patch grid, with x̃ from a hook on the timm block's norm1 (independent
    of qkdissect's capture code); 3 prefix tokens (CLS + 2 registers) dropped."""
    from qkdissect.images import open_image

    captured = {}
    handle = vit.blocks[layer].norm1.register_forward_hook(lambda module, args, out: captured.setdefault("x", out))
    with torch.no_grad():
        vit(wrap_model(vit).preprocessing(open_image(image_path))[None])
    handle.remove()
    x = captured["x"][0, 3:].double()
    return (x @ u.double()).reshape(grid), (x @ v.double()).reshape(grid)


def test_top_image_tiles_show_the_right_maps_for_each_sign(views_report, mined_dir, vit, atlas_dir, image_folder):
    import numpy as np
    from PIL import Image

    from qkdissect.mining import load_mined
    from qkdissect.overlays import upsample

    mined = load_mined(mined_dir)
    atlas = ModeAtlas.load(atlas_dir)
    out = views_report.out
    checked = 0
    for layer, head in [(0, 1), (2, 3)]:
        page = out / "heads" / head_page_name(layer, head, N_LAYERS, N_HEADS)
        assert local_references_exist(page) == 2 * 2 * 3  # modes 0 and 2, two signs, top 3
        tags = parse(page).tags
        tiles = [a for t, a in tags if t == "img" and "/mined/" in a["src"]]
        assert all(a["loading"] == "lazy" for a in tiles)
        assert {m for m in re.findall(r'id="mode-(\d+)"', page.read_text())} == {"0", "2"}
        for mode in (0, 2):
            for sign_index, sign in enumerate("+−"):
                rows = mined.top(layer, head, mode, sign_index)
                shown = [a for a in tiles if a["alt"].startswith(f"mode {mode} sign {sign} ")]
                assert [a["title"] for a in shown] == [r["relative_path"] for r in rows]
                # the tile's red − cyan difference follows the documented overlay intensities of this image's
                # q and k maps for this sign, recomputed here:
                # clip((s·m − max(0, median s·m)) / (max s·m − that), 0, 1)
                factor = 1.0 if sign == "+" else -1.0
                U, V = atlas.layers[layer].U[head, :, mode], atlas.layers[layer].V[head, :, mode]
                first = next((a for a, r in zip(shown, rows) if r["score"] > 0), None)
                if first is None:  # no image turns both sides of this sign positive: nothing to compare
                    continue
                q, k = query_key_maps(vit, image_folder / first["title"], layer, U, V)
                tile = np.asarray(Image.open(page.parent / first["src"]).convert("RGB"), dtype=np.float64)

                def intensity(m, factor=factor, tile=tile):
                    m = upsample((factor * m).numpy(), tile.shape[:2])
                    low = max(float(np.median(m)), 0.0)
                    return np.clip((m - low) / (m.max() - low), 0, 1)

                expected = intensity(q) - intensity(k)
                correlation = np.corrcoef((tile[..., 0] - tile[..., 1]).ravel(), expected.ravel())[0, 1]
                assert correlation > 0.8, (layer, head, mode, sign, correlation)
                checked += 1
    assert checked >= 4
    page = out / "heads" / head_page_name(1, 0, N_LAYERS, N_HEADS)
    assert 'id="top-images"' not in page.read_text()  # layer 1 was not mined


def test_file_names_from_user_data_are_escaped(views_report):
    for page in sorted((views_report.out / "heads").glob("*.html")):
        text = page.read_text()
        assert "a<b>" not in text and "<b>" not in text
    evil_pages = [p for p in (views_report.out / "heads").glob("*.html")
                  if "a&lt;b&gt;&amp;&#34;c.png" in p.read_text()]
    assert evil_pages  # the file shows up (as text) among top images and in the maps section


def test_maps_section_on_its_head_only(views_report, maps_dir):
    from qkdissect.views import load_maps

    maps = load_maps(maps_dir)
    page = views_report.out / "heads" / head_page_name(1, 2, N_LAYERS, N_HEADS)
    text = page.read_text()
    assert 'id="maps"' in text and local_references_exist(page) == len(maps.items) * 2
    section = text.split('id="maps"')[1]
    assert section.count('class="mode-block map-item"') == 2 and "coffee.png" in section
    for path in (views_report.out / "heads").glob("*.html"):
        if path != page:
            assert 'id="maps"' not in path.read_text()
    index = views_report.index.read_text()
    assert f'href="heads/{head_page_name(1, 2, N_LAYERS, N_HEADS)}#maps"' in index and "Top images" in index


def test_views_from_other_modes_are_refused(atlas_dir, second_atlas, mined_dir, maps_dir, vit, tmp_path):
    other = ModeAtlas.load(atlas_dir)
    shallow = ModeAtlas(meta=other.meta, layers=other.layers[:2], null=other.null)
    with pytest.raises(QKDissectError, match="mined with 4 heads × 6 modes on layers \\[0, 2\\]"):
        build_report(shallow, tmp_path / "r1", mined=mined_dir)
    with pytest.raises(QKDissectError, match="other modes than this atlas"):
        build_report(second_atlas, tmp_path / "r1", mined=mined_dir)
    folded = dissect(wrap_model(vit, spec="folded"), fold_ln=True, null_samples=20)
    assert not torch.allclose(folded.singular_values.double(), other.singular_values.double(), rtol=1e-3)
    with pytest.raises(QKDissectError, match="other modes than this atlas"):
        build_report(folded, tmp_path / "r2", mined=mined_dir)
    with pytest.raises(QKDissectError, match="other modes than this atlas"):
        build_report(folded, tmp_path / "r3", maps=[maps_dir])
    with pytest.raises(QKDissectError, match="not a finished `qkdissect mine` folder"):
        build_report(atlas_dir, tmp_path / "r4", mined=tmp_path)
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_a_mined_image_gone_since_mining_is_a_grey_tile_and_a_warning(atlas_dir, mined_dir, image_folder, tmp_path):
    from qkdissect.mining import load_mined

    mined = load_mined(mined_dir)
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    document = json.loads((mined_dir / "mined.json").read_text())
    copy = tmp_path / "mined"
    shutil.copytree(mined_dir, copy)
    (copy / "mined.json").write_text(json.dumps({**document, "image_root": str(moved)}))
    (moved / "coffee.png").unlink()
    report = build_report(atlas_dir, tmp_path / "report", mined=copy)
    assert len(report.warnings) == 1 and "coffee.png" in report.warnings[0]
    assert load_report(report.out)["warnings"] == list(report.warnings)
    rows = [(layer, head, mode, s) for layer in mined.layers for head in range(N_HEADS) for mode in (0, 2)
            for s in (0, 1) if any(r["relative_path"] == "coffee.png" for r in mined.top(layer, head, mode, s))]
    layer, head, mode, s = rows[0]
    text = (report.out / "heads" / head_page_name(layer, head, N_LAYERS, N_HEADS)).read_text()
    assert "coffee.png (not readable now)" in text
