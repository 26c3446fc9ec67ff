"""Resuming and sharding mining runs: a real SIGKILL of a real process at several points (in a forward pass, while a
checkpoint is written, while contact sheets are drawn) then ``--resume`` gives the same bytes as an uninterrupted
run and leaves no temporary file; torchrun with 2 processes over 4 shards equals one process, bit for bit; a run
resumes with another number of processes than the one interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_timm_vit
from image_sets import as_samples, bad_images, natural_images, save_timm_folder, write_shards

from qkdissect import load_model
from qkdissect.mining import load_mined, mine
from qkdissect.mining.run import CRASH_HOOK
from qkdissect.testpoints import PAUSE_AT, PAUSE_FILE

TESTS = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
TIMES = ("total_seconds", "mining_seconds", "images_per_second", "created", "decomposition_seconds")
ARGS = ["--top", "3", "--batch-size", "2", "--workers", "0", "--sheets-modes", "0", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A timm model folder and 4 shards of 5 samples (17 images, 3 bad ones) — units of 3 batches each."""
    root = tmp_path_factory.mktemp("resume")
    samples = as_samples(natural_images(17, seed=3))
    for name, blob, _ in bad_images()[:3]:
        stem, extension = name.rsplit(".", 1)
        samples.insert(7, (stem, {extension: blob}))
    write_shards(root / "shards", samples, per_shard=5)
    folder = save_timm_folder(make_timm_vit(seed=4), root / "model")
    return {"model": folder, "spec": str(root / "shards") + "/shard-{000000..000003}.tar", "root": root}


@pytest.fixture(scope="module")
def loaded(data):
    return load_model(str(data["model"]))


@pytest.fixture(scope="module")
def reference(data, loaded, tmp_path_factory):
    """One uninterrupted in-process run (with sheets) that every other run must equal."""
    out = tmp_path_factory.mktemp("reference") / "mined"
    mine(loaded, data["spec"], out, **settings())
    return out


def settings(**changes):
    return {"top_k": 3, "batch_size": 2, "workers": 0, "sheet_modes": (0,), "checkpoint_every": 2, **changes}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")])}


def files_of(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_identical(out: Path, reference: Path) -> None:
    """Every file byte for byte; mined.json and atlas.json too except the times of the run."""
    got, want = files_of(out), files_of(reference)
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for name in want:
        if name in ("mined.json", "atlas/atlas.json"):
            a, b = json.loads(got[name]), json.loads(want[name])
            for key in TIMES:
                a.pop(key, None), b.pop(key, None)
            assert a == b
        else:
            assert got[name] == want[name], name
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name in ("checkpoint", ".qkdissect-tmp")]


def kill_at(point: str, data, out: Path, tmp_path: Path) -> None:
    """Start `qkdissect mine` in a fresh process, wait until it reaches ``point``, SIGKILL it."""
    marker = tmp_path / f"paused-{point.replace(':', '-')}"
    command = [sys.executable, "-m", "qkdissect", "mine", str(data["model"]), "--images", data["spec"], "--out",
               str(out), *ARGS]
    process = subprocess.Popen(command, env={**env(), PAUSE_AT: point, PAUSE_FILE: str(marker)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the run ended before {point}: {process.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"the run never reached {point}")
        time.sleep(0.1)
    assert int(marker.read_text()) == process.pid
    os.killpg(process.pid, signal.SIGKILL)  # the process and any worker it started
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("point", ["forward:5", "checkpoint:2", "sheet:3"])
def test_sigkill_then_resume_is_bit_identical(point, data, loaded, reference, tmp_path):
    out = tmp_path / "mined"
    kill_at(point, data, out, tmp_path)
    assert not (out / "mined.json").exists()
    if point.startswith("checkpoint"):  # killed between writing a checkpoint and renaming it into place
        assert list((out / "checkpoint").glob("*.safetensors.tmp"))
    if point.startswith("sheet"):
        assert len(list((out / ".qkdissect-tmp" / "sheets").rglob("*.png"))) == 3
        assert not (out / "checkpoint").exists()  # the final state is staged: the checkpoints are gone
    with pytest.raises(Exception, match="--resume"):
        mine(loaded, data["spec"], out, **settings())
    result = mine(loaded, data["spec"], out, resume=True, **settings())
    assert result.meta["n_bad"] == 3 and len(result.meta["sheets"]) == 3 * 4 * 2
    assert_identical(out, reference)


def test_a_kill_mid_shard_resumes_mid_shard(data, loaded, reference, tmp_path):
    """Killed in the 4th forward pass with checkpoints every 2 batches: the last checkpoint holds 4 of the 5
    samples of shard 0; the resumed run starts inside shard 0 at position 4 and ends identical."""
    from qkdissect.mining.checkpoints import Coverage, current_checkpoints

    out = tmp_path / "mined"
    kill_at("forward:4", data, out, tmp_path)
    (path, meta), = current_checkpoints(out / "checkpoint")
    coverage = Coverage.from_json(meta["coverage"])
    assert coverage.whole == set() and coverage.parts == {0: [0, 4, False]}
    assert coverage.start_of(0) == 4 and coverage.start_of(1) == 0
    mine(loaded, data["spec"], out, resume=True, **settings())
    assert_identical(out, reference)


def test_torchrun_two_processes_over_four_shards_equal_one(data, reference, tmp_path):
    out = tmp_path / "sharded"
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "qkdissect", "mine",
                           str(data["model"]), "--images", data["spec"], "--out", str(out), *ARGS],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("strongest modes") == 1
    sharded = load_mined(out)
    assert sharded.meta["world_size"] == 2
    document = json.loads((out / "mined.json").read_text())
    want = json.loads((reference / "mined.json").read_text())
    for key in ("world_size", *TIMES):
        document.pop(key, None), want.pop(key, None)
    assert document == want
    files = files_of(out)
    for name, blob in files_of(reference).items():
        if name not in ("mined.json", "mined.safetensors", "atlas/atlas.json"):
            assert files[name] == blob, name
    from safetensors.torch import load_file

    a, b = load_file(str(out / "mined.safetensors")), load_file(str(reference / "mined.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)  # exact, statistics included


def test_resume_with_another_number_of_processes(data, loaded, reference, tmp_path, monkeypatch):
    """One process interrupted, then torchrun with 2 resumes it (the checkpoint is continued, not dropped);
    two processes interrupted, then one resumes them. Both end identical to the uninterrupted run (apart from
    the world size in mined.json)."""
    out = tmp_path / "one_then_two"
    monkeypatch.setenv(CRASH_HOOK, "4")
    with pytest.raises(RuntimeError, match="simulated crash"):
        mine(loaded, data["spec"], out, sheets=False, **settings())
    monkeypatch.delenv(CRASH_HOOK)
    assert len(list((out / "checkpoint").glob("*.safetensors"))) == 1
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "qkdissect", "mine",
                           str(data["model"]), "--images", data["spec"], "--out", str(out), "--resume", *ARGS],
                          env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_result(out, reference)

    out = tmp_path / "two_then_one"
    done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "qkdissect", "mine",
                           str(data["model"]), "--images", data["spec"], "--out", str(out), *ARGS],
                          env={**env(), CRASH_HOOK: "3"}, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "simulated crash" in done.stderr, done.stderr[-6000:]
    names = sorted(p.name for p in (out / "checkpoint").glob("*.safetensors"))
    assert names == ["g0001-r0000.safetensors", "g0001-r0001.safetensors"]
    mine(loaded, data["spec"], out, resume=True, **settings())
    assert_same_result(out, reference)


def assert_same_result(out: Path, reference: Path) -> None:
    from safetensors.torch import load_file

    a, b = load_file(str(out / "mined.safetensors")), load_file(str(reference / "mined.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    for name in ("images.txt", "bad_images.log"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()
    assert not (out / "checkpoint").exists() and not (out / ".qkdissect-tmp").exists()


def test_resume_refuses_an_unreadable_index_in_one_line(data, tmp_path):
    from typer.testing import CliRunner

    from qkdissect.cli import app

    out = tmp_path / "mined"
    out.mkdir()
    (out / "mined.json").write_text("{ this is not json")
    result = CliRunner().invoke(app, ["mine", str(data["model"]), "--images", data["spec"], "--out", str(out),
                                      "--resume", *ARGS])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "mined.json" in lines[0] and "Traceback" not in result.output
    assert (out / "mined.json").read_text() == "{ this is not json"


def test_a_folder_that_is_not_a_mining_run_is_refused(data, loaded, tmp_path):
    from qkdissect.errors import QKDissectError

    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter.tex").write_text("precious")
    with pytest.raises(QKDissectError, match="not empty"):
        mine(loaded, data["spec"], out, **settings())
    with pytest.raises(QKDissectError, match="not empty"):
        mine(loaded, data["spec"], out, resume=True, **settings())
    assert [p.name for p in out.iterdir()] == ["chapter.tex"]


def test_sheets_drawn_later_equal_sheets_drawn_by_the_run(data, loaded, reference, tmp_path):
    """mine(sheets=False) then `qkdissect sheets`: the same sheet files as a run that drew them, recorded in
    mined.json (sheets and files), every other file unchanged; a partial set first (one head), then the rest."""
    from typer.testing import CliRunner

    from qkdissect.cli import app

    out = tmp_path / "mined"
    mine(loaded, data["spec"], out, sheets=[(1, 2)], **settings())
    first = json.loads((out / "mined.json").read_text())
    assert [(s["layer"], s["head"]) for s in first["sheets"]] == [(1, 2)] * 2
    before = {name: blob for name, blob in files_of(out).items() if name != "mined.json"}
    result = CliRunner().invoke(app, ["sheets", str(out), "--workers", "2"])
    assert result.exit_code == 0, result.output
    after = files_of(out)
    assert all(after[name] == blob for name, blob in before.items())
    want = files_of(reference)
    sheets = sorted(name for name in want if name.startswith("sheets/"))
    assert sorted(name for name in after if name.startswith("sheets/")) == sheets
    assert all(after[name] == want[name] for name in sheets)
    document = json.loads(after["mined.json"])
    assert document["sheets"] == json.loads(want["mined.json"])["sheets"]
    assert set(sheets) <= set(document["files"]) and "mined.safetensors" in document["files"]
    assert not (out / ".qkdissect-tmp").exists()
