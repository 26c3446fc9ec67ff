"""Ownership of output folders (qkdissect.outputs): a command replaces or deletes only files its manifest lists."""

from __future__ import annotations

import json
import os

import pytest

from qkdissect.errors import QKDissectError
from qkdissect.outputs import JOURNAL, STAGING, OutputFolder, check_out, output_files, write_output

FORMAT, INDEX = "qkdissect-test", "index.json"


def write(out, files, *, replace=True, flag=None, document=None):
    def writer(staging):
        for name, text in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_text(text)
        return document or {"answer": 42}

    return write_output(out, FORMAT, INDEX, writer, replace=replace, flag=flag)


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_fresh_folder_gets_files_and_an_index_listing_them(tmp_path):
    out = tmp_path / "a" / "b"
    index = write(out, {"x.txt": "1", "sub/y.txt": "2"})
    document = json.loads(index.read_text())
    assert document == {"answer": 42, "format": FORMAT, "files": ["sub/y.txt", "x.txt"]}
    assert tree(out) == {"index.json": index.read_bytes(), "sub/y.txt": b"2", "x.txt": b"1"}
    assert not (out / STAGING).exists() and output_files(out, INDEX) == ["sub/y.txt", "x.txt"]


def test_rebuild_removes_only_listed_files_and_keeps_the_users(tmp_path):
    out = tmp_path / "o"
    write(out, {"keep.txt": "old", "gone.txt": "old", "deep/gone.txt": "old"})
    (out / "mine.tex").write_text("thesis")
    (out / "deep" / "notes.txt").write_text("notes")
    write(out, {"keep.txt": "new", "fresh.txt": "new"})
    assert tree(out) == {"deep/notes.txt": b"notes", "fresh.txt": b"new", "index.json": (out / INDEX).read_bytes(),
                         "keep.txt": b"new", "mine.tex": b"thesis"}


def test_emptied_folders_are_pruned(tmp_path):
    out = tmp_path / "o"
    write(out, {"a/b/c.txt": "1"})
    write(out, {"d.txt": "2"})
    assert not (out / "a").exists() and (out / "d.txt").is_file()


def test_foreign_non_empty_folder_is_refused_untouched(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "report.json").write_text('{"title": "x"}')
    (out / "ch1.tex").write_text("t")
    before = tree(out)
    with pytest.raises(QKDissectError, match="not a previous qkdissect test"):
        write(out, {"x": "1"})
    with pytest.raises(QKDissectError, match="no qkdissect manifest"):
        write(tmp_path / "thesis", {"x": "1"}, document={})
    assert tree(out) == before and not (out / STAGING).exists()


@pytest.mark.parametrize("bad", ["../victim.png", "../../victim.png", "/etc/passwd", "a/../../victim", "./x", "",
                                 "a\\..\\b", STAGING + "/x", 7])
def test_manifest_entries_outside_out_are_refused_and_nothing_is_deleted(tmp_path, bad):
    victim = tmp_path / "victim.png"
    victim.write_text("precious")
    out = tmp_path / "data" / "o"
    write(out, {"x.txt": "1"})
    document = json.loads((out / INDEX).read_text())
    document["files"] = ["x.txt", bad]
    (out / INDEX).write_text(json.dumps(document))
    before = tree(tmp_path)
    with pytest.raises(QKDissectError):
        write(out, {"y.txt": "2"})
    assert tree(tmp_path) == before and not (out / STAGING).exists()


def test_symlinks_in_manifest_paths_are_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("p")
    out = tmp_path / "o"
    write(out, {"sub/x.txt": "1"})
    (out / "sub" / "x.txt").unlink()
    (out / "sub").rmdir()
    os.symlink(outside, out / "sub")
    document = json.loads((out / INDEX).read_text())
    document["files"] = ["sub/precious.txt"]
    (out / INDEX).write_text(json.dumps(document))
    with pytest.raises(QKDissectError, match="symbolic link"):
        write(out, {"y.txt": "2"})
    assert (outside / "precious.txt").read_text() == "p"


def test_new_file_may_not_replace_a_users_file(tmp_path):
    out = tmp_path / "o"
    write(out, {"a.txt": "1"})
    (out / "b.txt").write_text("user's")
    with pytest.raises(QKDissectError, match="did not write"):
        write(out, {"a.txt": "2", "b.txt": "2"})
    assert (out / "b.txt").read_text() == "user's" and (out / "a.txt").read_text() == "1"
    assert not (out / STAGING).exists()


def test_other_format_and_legacy_manifests_are_refused(tmp_path):
    out = tmp_path / "o"
    write_output(out, "qkdissect-other", INDEX, lambda s: {})
    with pytest.raises(QKDissectError, match="not a qkdissect test manifest"):
        write(out, {"x": "1"})
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / INDEX).write_text(json.dumps({"format": FORMAT}))
    (legacy / "data.bin").write_text("d")
    with pytest.raises(QKDissectError, match="without the list of its files"):
        write(legacy, {"x": "1"})
    (legacy / INDEX).write_text("{not json")
    with pytest.raises(QKDissectError, match="not a qkdissect test manifest"):
        write(legacy, {"x": "1"})
    assert (legacy / "data.bin").read_text() == "d"


def test_replacing_needs_permission_when_asked(tmp_path):
    out = tmp_path / "o"
    write(out, {"a": "1"})
    with pytest.raises(QKDissectError, match="pass --overwrite"):
        write(out, {"a": "2"}, replace=False, flag="--overwrite")
    assert (out / "a").read_text() == "1"


def test_out_that_is_a_file_or_unwritable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(QKDissectError, match="is a file"):
        write(tmp_path / "f", {"a": "1"})
    with pytest.raises(QKDissectError, match="is a file|not writable|cannot be"):
        check_out(tmp_path / "f" / "sub", FORMAT, INDEX)
    with pytest.raises(QKDissectError, match="not writable|cannot be"):
        write("/sys/qkdissect-test-out", {"a": "1"})
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            with pytest.raises(QKDissectError, match="not writable"):
                write(locked / "o", {"a": "1"})
        finally:
            locked.chmod(0o755)


def test_an_error_while_writing_leaves_the_old_output_and_no_staging(tmp_path):
    out = tmp_path / "o"
    write(out, {"a": "old"})
    before = tree(out)

    def failing(staging):
        (staging / "a").write_text("half")
        raise QKDissectError("boom")

    with pytest.raises(QKDissectError, match="boom"):
        write_output(out, FORMAT, INDEX, failing)
    assert tree(out) == before and not (out / STAGING).exists()


def test_an_interrupted_finish_is_recognised_and_completed(tmp_path):
    """Simulate a kill after the old index was removed and some files were moved: the journal names them."""
    out = tmp_path / "o"
    write(out, {"a": "old", "b": "old"})
    folder = OutputFolder(out, FORMAT, INDEX).claim()
    (folder.staging / "a").write_text("new")
    (folder.staging / "c").write_text("new")
    folder._write_journal(folder.owned | {"a", "c"})
    (out / INDEX).unlink()
    os.replace(folder.staging / "c", out / "c")  # killed here: no index, c moved, a still staged
    assert (out / STAGING / JOURNAL).is_file()
    write(out, {"a": "newer", "c": "newer"})
    assert tree(out) == {"a": b"newer", "c": b"newer", "index.json": (out / INDEX).read_bytes()}


def test_a_killed_first_run_leaves_only_staging_which_the_next_run_clears(tmp_path):
    out = tmp_path / "o"
    folder = OutputFolder(out, FORMAT, INDEX).claim()
    (folder.staging / "half").write_text("x")  # killed before finish
    write(out, {"a": "1"})
    assert tree(out) == {"a": b"1", "index.json": (out / INDEX).read_bytes()}


def test_resume_keeps_the_staged_files(tmp_path):
    out = tmp_path / "o"
    folder = OutputFolder(out, FORMAT, INDEX).claim()
    (folder.staging / "checkpoint.bin").write_text("state")
    again = OutputFolder(out, FORMAT, INDEX).claim(resume=True)
    assert (again.staging / "checkpoint.bin").read_text() == "state"
    (again.staging / "checkpoint.bin").unlink()
    again.finish({})
    assert output_files(out, INDEX) == []
