"""Resumable and idempotent: a command killed with a real SIGKILL at any point and run again finishes with exactly the
files of an uninterrupted run (apart from the recorded timings), and no temporary file is left.

The kill points are reproducible: the test hook ``QKDISSECT_TEST_KILL_AT=STAGE:N`` makes the subprocess SIGKILL itself
when it reports progress N of STAGE (``maps``, ``preference``, ``pages`` of the report) or after moving its N-th
file into place (``move:FORMAT``), or just before writing its index (``index:FORMAT:0``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import IMAGE_HW, make_timm_vit, save_timm_folder
from typer.testing import CliRunner

from qkdissect.cli import app
from qkdissect.outputs import STAGING
from qkdissect.progress import KILL_HOOK

SRC = Path(__file__).resolve().parents[1] / "src"
TIMINGS = {"decomposition_seconds", "build_seconds", "seconds"}


def qkdissect(*args, kill: str | None = None) -> None:
    """Run the CLI: in a subprocess that SIGKILLs itself at ``kill``, else in this process (faster)."""
    if kill is None:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", KILL_HOOK: kill,
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run([sys.executable, "-m", "qkdissect", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"not killed at {kill}: {done.returncode}\n{done.stderr[-2000:]}"


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def contents(folder: Path) -> dict[str, object]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found[path.relative_to(folder).as_posix()] = (without_timings(json.loads(data))
                                                          if path.suffix == ".json" else data)
    return found


def assert_same_and_clean(folder: Path, reference: Path) -> None:
    assert not (folder / STAGING).exists() and not list(folder.rglob("*.tmp")), "temporary files left"
    got, want = contents(folder), contents(reference)
    assert sorted(got) == sorted(want)
    different = [name for name in want if got[name] != want[name]]
    assert not different, f"files differ from the uninterrupted run: {different}"


@pytest.fixture(scope="module", autouse=True)
def reproducible_dates():
    """SOURCE_DATE_EPOCH fixes the "created" stamps, here and in the subprocesses (which inherit it)."""
    before = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    yield
    if before is None:
        os.environ.pop("SOURCE_DATE_EPOCH")
    else:
        os.environ["SOURCE_DATE_EPOCH"] = before


@pytest.fixture(scope="module")
def setup(tmp_path_factory, natural_image_folder):
    root = tmp_path_factory.mktemp("kill")
    model = save_timm_folder(make_timm_vit(seed=2), root / "model")
    images = sorted(natural_image_folder.iterdir())[:4]
    data = root / "o3"
    qkdissect("oddoneout", "--out", data, "--n", 6, "--size", f"{IMAGE_HW[0]}x{IMAGE_HW[1]}", "--objects", 3,
              "--radius", 5)
    return {"root": root, "model": model, "images": images, "data": data}


def test_dissect_killed_while_moving_its_files_and_rebuilt(setup):
    root, model = setup["root"], setup["model"]
    args = ("dissect", model, "--null-samples", 40)
    qkdissect(*args, "--out", root / "atlas_ref")
    out = root / "atlas_killed"
    qkdissect(*args, "--out", out, kill="move:qkdissect-atlas:1")  # first run: killed half-way into place
    qkdissect(*args, "--out", out)
    assert_same_and_clean(out, root / "atlas_ref")
    qkdissect(*args, "--out", out, kill="index:qkdissect-atlas:0")  # rebuild: every file moved, no index yet
    assert not (out / "atlas.json").exists() and (out / STAGING).is_dir()
    qkdissect(*args, "--out", out)
    assert_same_and_clean(out, root / "atlas_ref")


def test_maps_killed_during_the_forward_passes(setup):
    root, model, images = setup["root"], setup["model"], setup["images"]
    args = ("maps", model, *images, "--layer", 1, "--head", 2, "--modes", "0-2")
    qkdissect(*args, "--out", root / "maps_ref")
    out = root / "maps_killed"
    qkdissect(*args, "--out", out, kill="maps:2")
    assert not (out / "maps.json").exists()
    qkdissect(*args, "--out", out)
    assert_same_and_clean(out, root / "maps_ref")


def test_preference_killed_during_the_forward_passes(setup):
    root, model, data = setup["root"], setup["model"], setup["data"]
    args = ("preference", model, "--data", data, "--batch-size", 2, "--bootstrap", 50, "--top-modes", "1,2")
    qkdissect(*args, "--out", root / "pref_ref")
    out = root / "pref_killed"
    qkdissect(*args, "--out", out, kill="preference:4")
    qkdissect(*args, "--out", out)
    assert_same_and_clean(out, root / "pref_ref")


def test_report_killed_while_writing_pages_and_while_moving_them(setup):
    root, model = setup["root"], setup["model"]
    atlas = root / "atlas_for_report"
    qkdissect("dissect", model, "--null-samples", 40, "--out", atlas)
    qkdissect("report", atlas, "--out", root / "report_ref")
    out = root / "report_killed"
    qkdissect("report", atlas, "--out", out, kill="pages:5")
    assert not out.exists() or not (out / "index.html").exists()
    qkdissect("report", atlas, "--out", out)
    assert_same_and_clean(out, root / "report_ref")
    qkdissect("report", atlas, "--out", out, kill="move:qkdissect-report:7")
    qkdissect("report", atlas, "--out", out)
    assert_same_and_clean(out, root / "report_ref")
