"""The HTML report in a real headless browser (Debian's /usr/bin/chromium driven by playwright):
offline (every request is file://), no console errors, heat map → head page, keyboard navigation,
user text shown as text, layout at 1280×800 and on a narrow window. Screenshots go to the test's
tmp folder and to /tmp/report_shots/."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from helpers import N_HEADS, N_LAYERS, make_hf
from typer.testing import CliRunner

from qkdissect import ModeAtlas
from qkdissect.cli import app
from qkdissect.report import build_report, head_page_name

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path("/tmp/report_shots")
EVIL = '<script>alert(1)</script><img src=x onerror="window.__xss=1">'

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} not found: install Debian's chromium (scripts/test.sh does) to run the "
                              "browser tests"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield instance
        instance.close()


class Recorder:
    """A page that records every request, console message, page error and dialog."""

    def __init__(self, browser, width: int = 1280, height: int = 800):
        self.page = browser.new_page(viewport={"width": width, "height": height})
        self.requests: list[str] = []
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: self.console.append((message.type, message.text)))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))

    def open(self, path: Path):
        self.page.goto(path.resolve().as_uri(), wait_until="load")
        return self.page

    def assert_clean(self):
        assert [text for kind, text in self.console if kind == "error"] == []
        assert self.errors == [] and self.dialogs == []
        assert self.requests and all(url.startswith("file://") for url in self.requests), self.requests

    def close(self):
        self.page.close()


def all_images_loaded(page) -> bool:
    """Scroll every <img> into view (lazy ones load then) and check each decoded with a width."""
    count = page.locator("img").count()
    for index in range(count):
        page.locator("img").nth(index).scroll_into_view_if_needed()
    page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=10_000)
    return count > 0 and page.evaluate("Array.from(document.images).every(i => i.naturalWidth > 0)")


def screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.evaluate("window.scrollTo(0, 0)")  # else the sticky header is drawn where the page was scrolled to
    page.screenshot(path=str(path), full_page=True)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, SHOTS / name)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory, natural_image_folder):
    """A tiny random HF ViT saved to a folder, dissected, mined over natural images, mapped on two of
    them, measured on odd-one-out images and reported through the CLI, with a second model on the
    comparison page."""
    root = tmp_path_factory.mktemp("browser")
    runner = CliRunner()
    for name, seed in (("model", 4), ("other", 5)):
        make_hf("vit", seed=seed).save_pretrained(root / name)
        result = runner.invoke(app, ["dissect", str(root / name), "--out", str(root / f"atlas_{name}"),
                                     "--null-samples", "40"])
        assert result.exit_code == 0, result.output
    for args in (["oddoneout", "--n", "8", "--size", "40", "--objects", "3", "--radius", "5", "--out",
                  str(root / "odd")],
                 ["preference", str(root / "model"), "--data", str(root / "odd"), "--atlas", str(root / "atlas_model"),
                  "--bootstrap", "30", "--top-modes", "1", "--out", str(root / "pref")],
                 ["mine", str(root / "model"), "--images", str(natural_image_folder), "--top", "3", "--workers", "0",
                  "--atlas", str(root / "atlas_model"), "--out", str(root / "mined")],
                 ["maps", str(root / "model"), str(natural_image_folder / "coffee.png"),
                  str(natural_image_folder / "chelsea.png"), "--layer", "1", "--head", "2", "--modes", "0-1",
                  "--atlas", str(root / "atlas_model"), "--out", str(root / "maps")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(root / "atlas_model"), "--out", str(root / "report"),
                                 "--compare", str(root / "atlas_other"), "--preference", str(root / "pref"),
                                 "--mined", str(root / "mined"), "--maps", str(root / "maps")])
    assert result.exit_code == 0, result.output
    return root / "report"


def head_url_suffix(layer: int, head: int) -> str:
    return "/heads/" + head_page_name(layer, head, N_LAYERS, N_HEADS)


def test_overview_is_offline_clean_and_has_every_cell(browser, report, tmp_path):
    recorder = Recorder(browser)
    page = recorder.open(report / "index.html")
    assert page.locator("#heatmap a.cell").count() == N_LAYERS * N_HEADS
    assert page.locator("#heatmap tbody tr").count() == N_LAYERS
    assert all_images_loaded(page)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, tmp_path, "overview_1280.png")
    page.click("header nav >> text=Comparison")
    page.wait_for_url("**/compare.html")
    assert all_images_loaded(page) and page.locator("#compare-models tbody tr").count() == 2
    page.click("header nav >> text=Preference")
    page.wait_for_url("**/preference.html")
    assert all_images_loaded(page) and page.locator("#preference-heads a.pcell").count() == N_LAYERS * N_HEADS
    screenshot(page, tmp_path, "preference_1280.png")
    page.click('#preference-heads a.pcell >> nth=5')
    page.wait_for_url("**" + head_url_suffix(*divmod(5, N_HEADS)))
    assert page.locator("#head-preference tbody tr").count() == 2
    recorder.assert_clean()
    recorder.close()


def test_clicking_a_cell_opens_that_head(browser, report, tmp_path):
    recorder = Recorder(browser)
    page = recorder.open(report / "index.html")
    page.click('a.cell[data-layer="1"][data-head="2"]')
    page.wait_for_url("**" + head_url_suffix(1, 2))
    assert page.inner_text("#head-title") == "Layer 1 · head 2"
    assert page.locator("svg.spectrum rect.bar").count() == page.locator("svg.cosines circle.dot").count() > 0
    tiles = page.locator("#top-images ~ section figure.tile img")
    assert tiles.count() == 4 * 2 * 3  # modes 0-3 kept by the miner, both signs, top 3
    assert page.locator("#maps ~ section.map-item").count() == 2
    assert all_images_loaded(page)  # every top image and map figure, after scrolling the lazy ones into view
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    screenshot(page, tmp_path, "head_1280.png")
    recorder.assert_clean()
    recorder.close()


def test_keyboard_navigation(browser, report):
    recorder = Recorder(browser)
    page = recorder.open(report / "heads" / head_page_name(1, 2, N_LAYERS, N_HEADS))
    for key, target in (("ArrowRight", (1, 3)), ("ArrowDown", (2, 3)), ("ArrowLeft", (2, 2)), ("ArrowUp", (1, 2)),
                        ("ArrowRight", (1, 3)), ("ArrowRight", (2, 0)), ("ArrowLeft", (1, 3))):
        page.keyboard.press(key)
        page.wait_for_url("**" + head_url_suffix(*target))
    page.keyboard.press("h")
    page.wait_for_url("**/index.html")
    recorder.open(report / "heads" / head_page_name(0, 0, N_LAYERS, N_HEADS))
    page.keyboard.press("ArrowLeft")  # nothing before the first head: stays
    page.keyboard.press("ArrowUp")
    assert page.url.endswith(head_url_suffix(0, 0))
    page.keyboard.press("Escape")
    page.wait_for_url("**/index.html")
    # on the overview the arrows walk the heat map and Enter opens the focused head
    page.keyboard.press("ArrowRight")
    for key in ("ArrowDown", "ArrowDown", "ArrowRight", "ArrowUp"):
        page.keyboard.press(key)
    assert page.evaluate("[document.activeElement.dataset.layer, document.activeElement.dataset.head]") == ["1", "1"]
    page.keyboard.press("Enter")
    page.wait_for_url("**" + head_url_suffix(1, 1))
    recorder.assert_clean()
    recorder.close()


def test_script_in_model_id_is_shown_as_text(browser, report, tmp_path):
    atlas = ModeAtlas.load(report.parent / "atlas_model")
    evil = ModeAtlas(meta={**atlas.meta, "model": EVIL}, layers=atlas.layers, null=atlas.null)
    out = build_report(evil, tmp_path / "evil").out
    recorder = Recorder(browser)
    for path in (out / "index.html", out / "heads" / head_page_name(0, 1, N_LAYERS, N_HEADS)):
        page = recorder.open(path)
        assert page.inner_text("header .model") == EVIL
        assert page.evaluate("window.__xss") is None
        assert page.locator("script").count() == 1 and page.locator('img[src="x"]').count() == 0
    assert recorder.page.title().endswith(EVIL)
    recorder.assert_clean()
    recorder.close()


def test_narrow_window_has_no_horizontal_overflow(browser, report, tmp_path):
    recorder = Recorder(browser, width=390, height=844)
    for path, name in ((report / "index.html", "overview_narrow.png"),
                       (report / "heads" / head_page_name(2, 1, N_LAYERS, N_HEADS), "head_narrow.png"),
                       (report / "compare.html", "compare_narrow.png"),
                       (report / "preference.html", "preference_narrow.png")):
        page = recorder.open(path)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), name
        screenshot(page, tmp_path, name)
    recorder.assert_clean()
    recorder.close()


def vit_h_shaped_atlas(seed: int = 0) -> ModeAtlas:
    """A ViT-H/14-shaped atlas (32 layers × 16 heads, d_model 1280, d_head 80) from random W_q, W_k whose
    similarity falls with depth (W_k = m·W_q + noise, m from +0.8 to −0.3)."""
    from qkdissect.decomposition import LayerModes
    from qkdissect.factored import factored_svd
    from qkdissect.files import library_versions
    from qkdissect.metrics import gaussian_null

    L, H, d_head, d_model = 32, 16, 80, 1280
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for mix in torch.linspace(0.8, -0.3, L).tolist():
        W_q = torch.randn(H, d_head, d_model, generator=generator)
        W_k = (mix + 0.2 * torch.randn(H, 1, 1, generator=generator)) * W_q + torch.randn(H, d_head, d_model,
                                                                                          generator=generator)
        U, S, V = factored_svd(W_q, W_k)
        layers.append(LayerModes(U, S, V, torch.zeros(H, d_model)))
    meta = {"model": "random ViT-H/14 shape", "family": "timm-vit", "modality": "image", "n_layers": L,
            "n_heads": H, "n_kv_heads": H, "d_model": d_model, "d_head": d_head, "scale": d_head ** -0.5,
            "prefix_tokens": ["cls"], "n_prefix_tokens": 1, "versions": library_versions()}
    return ModeAtlas(meta=meta, layers=tuple(layers), null=gaussian_null(d_model, d_head, n_samples=200))


@pytest.mark.slow
def test_vit_h_report_builds_and_opens_fast(browser, tmp_path):
    atlas = vit_h_shaped_atlas()
    started = time.perf_counter()
    result = build_report(atlas, tmp_path / "vith")
    build_seconds = time.perf_counter() - started
    sizes = [p.stat().st_size for p in (result.out / "heads").glob("*.html")]
    assert len(sizes) == 512 and max(sizes) < 200_000 and result.index.stat().st_size < 400_000
    recorder = Recorder(browser)
    timings = {}
    for name in ("index.html", "heads/" + head_page_name(17, 9, 32, 16), "heads/" + head_page_name(31, 15, 32, 16)):
        started = time.perf_counter()
        page = recorder.open(result.out / name)
        timings[name] = (time.perf_counter() - started,
                         page.evaluate("performance.getEntriesByType('navigation')[0].loadEventEnd") / 1000)
    assert recorder.page.locator("#heatmap a.cell").count() == 0  # last page opened is a head page
    recorder.open(result.out / "index.html")
    assert recorder.page.locator("#heatmap a.cell").count() == 512
    recorder.assert_clean()
    recorder.close()
    print(f"\nViT-H-shaped report: build {build_seconds:.2f} s, {result.n_bytes / 1e6:.1f} MB, "
          + ", ".join(f"{k}: open {wall:.3f} s (load event {load:.3f} s)" for k, (wall, load) in timings.items()))
    assert all(wall < 2.0 for wall, _ in timings.values()), timings
