"""Mining from every kind of image source: a file list, WebDataset shards and Parquet files give the top-k of the
same images in a folder; bad samples of every kind are skipped and listed; images are read back by their ids."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_timm_vit
from image_sets import as_samples, bad_images, natural_images, write_folder, write_parquet, write_shards

from qkdissect import dissect
from qkdissect.adapters import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.mining import mine
from qkdissect.mining.readers import ImageReader, read_unit
from qkdissect.mining.result import Listing
from qkdissect.mining.sources import open_source

SETTINGS = dict(top_k=3, batch_size=3, sheets=False, sheet_modes=(0, 2))


@pytest.fixture(scope="module")
def model():
    return wrap_model(make_timm_vit(seed=11), spec="test:tiny-timm-vit")


@pytest.fixture(scope="module")
def atlas(model):
    return dissect(model, dtype="float64", null_samples=10)


@pytest.fixture(scope="module")
def images():
    return natural_images(14)


@pytest.fixture(scope="module")
def sets(tmp_path_factory, images):
    """The 14 images as a folder, a .txt and a .csv list, 4 WebDataset shards and 2 Parquet files (3 + 2 row
    groups), the Parquet ones also as Hugging Face {bytes, path} structs."""
    root = tmp_path_factory.mktemp("sets")
    folder = write_folder(root / "folder", images)
    (root / "list.txt").write_text("".join(f"folder/{name}\n" for name, _ in images))
    (root / "list.csv").write_text("label,path\n" + "".join(f"{i},folder/{name}\n" for i, (name, _) in
                                                          enumerate(images)))
    write_shards(root / "shards", as_samples(images), per_shard=4)
    write_parquet(root / "parquet", images, files=2, row_group=3)
    write_parquet(root / "parquet_hf", images, files=1, row_group=5, struct=True)
    return {"root": root, "folder": folder, "shards": root / "shards"}


def ids_by_slot(result) -> list:
    """The top-k of every slot as (id stem, score) lists: comparable across sources whose ids differ."""
    names = {}
    for index in sorted(set(result.topk.image.flatten().tolist()) - {-1}):
        ident = result.image_paths[index]
        stem = ident.split("#")[-1] if "#" in ident else Path(ident).stem
        names[index] = stem
    if result.meta["source"]["kind"] == "parquet":  # ids are file#row: map rows back to names
        names = {index: f"img_{_parquet_row(result.image_paths[index]):03d}" for index in names}
    image = result.topk.image.flatten().tolist()
    return [names.get(i) for i in image]


def _parquet_row(ident: str) -> int:
    file, row = ident.rsplit("#", 1)
    return (7 if file.endswith("part-001.parquet") else 0) + int(row)


def assert_same_topk(a, b):
    assert ids_by_slot(a) == ids_by_slot(b)
    torch.testing.assert_close(a.topk.scores, b.topk.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.topk.query_pos, b.topk.query_pos) and torch.equal(a.topk.key_pos, b.topk.key_pos)
    torch.testing.assert_close(a.topk.maps.float(), b.topk.maps.float(), rtol=2e-3, atol=2e-3)
    for name in ("q_mean", "k_std", "q_max", "k_min"):
        torch.testing.assert_close(a.stats[name], b.stats[name], rtol=1e-5, atol=1e-6)
    assert int(a.stats["images"]) == int(b.stats["images"]) == 14


@pytest.fixture(scope="module")
def from_folder(model, atlas, sets, tmp_path_factory):
    return mine(model, sets["folder"], tmp_path_factory.mktemp("mined") / "folder", atlas=atlas, **SETTINGS)


@pytest.mark.parametrize("spec", ["list.txt", "list.csv", "shards/shard-{000000..000003}.tar", "shards",
                                  "shards/shard-000000.tar::ROOT/shards/shard-{000001..000003}.tar", "parquet",
                                  "parquet_hf/part-000.parquet"])
def test_every_source_gives_the_folder_topk(spec, model, atlas, sets, from_folder, tmp_path):
    result = mine(model, str(sets["root"] / spec).replace("ROOT", str(sets["root"])), tmp_path / "mined", atlas=atlas,
                  **SETTINGS)
    assert result.meta["n_images"] == 14 and result.meta["n_bad"] == 0
    assert_same_topk(result, from_folder)
    kind = result.meta["source"]["kind"]
    assert kind == {"list.txt": "list", "list.csv": "list"}.get(spec, "parquet" if "parquet" in spec else
                                                                 "webdataset")
    top = result.top(result.layers[0], 1, 0, 0)[0]
    ident = top["relative_path"]
    if kind == "webdataset":
        assert ident.startswith("shard-0000") and ".tar#img_" in ident and top["path"] == ident
    elif kind == "parquet":
        assert ident.split("#")[0].endswith(".parquet") and ident.split("#")[1].isdigit()
    else:
        assert Path(top["path"]).is_file()


def test_images_read_back_by_id_are_the_original_bytes(model, atlas, sets, images, tmp_path):
    by_name = dict(images)
    for spec in ("shards", "parquet", "parquet_hf"):
        result = mine(model, str(sets["root"] / spec), tmp_path / spec, atlas=atlas, **SETTINGS)
        reader = ImageReader(result.source)
        idents = list(result.image_paths)
        found = reader.read(idents)
        for position, ident in enumerate(idents):
            if spec == "shards":
                name = next(n for n in by_name if n.startswith(ident.split("#")[1] + "."))
            else:
                file, row = ident.rsplit("#", 1)
                offset = 7 if spec == "parquet" and file.endswith("part-001.parquet") else 0
                name = images[offset + int(row)][0]
            assert found[ident] == by_name[name], (spec, position, ident)
        assert isinstance(reader.read(["shard-000009.tar#nope"])["shard-000009.tar#nope"], str)


def test_bad_samples_in_shards_are_skipped_and_listed(model, atlas, images, tmp_path):
    """Shards mixing good images with every kind of bad image, a sample without an image member, a sample with
    a label only, and a truncated last shard: every bad sample is listed with its reason, the run completes."""
    samples = as_samples(images[:8])
    bad = bad_images()
    for name, data, _ in bad:
        stem, extension = name.rsplit(".", 1)
        samples.insert(2 * len(samples) // 3, (stem, {extension: data, "cls": b"1"}))
    samples.insert(5, ("label_only", {"cls": b"3", "json": b"{}"}))
    paths = write_shards(tmp_path / "shards", samples, per_shard=5)
    data = paths[-1].read_bytes()
    paths[-1].write_bytes(data[: len(data) // 2 + 100])  # cut inside the last shard
    spec = str(tmp_path / "shards") + "/shard-{000000..%06d}.tar" % (len(paths) - 1)
    result = mine(model, spec, tmp_path / "mined", atlas=atlas, **SETTINGS)
    reasons = dict(result.bad)
    log = (tmp_path / "mined" / "bad_images.log").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in log) == sorted(reasons)
    for name, _, words in bad:
        ident = next(i for i in reasons if i.endswith("#" + name.rsplit(".", 1)[0]))
        assert words in reasons[ident], (name, reasons[ident])
    assert "no image member" in next(r for i, r in reasons.items() if i.endswith("#label_only"))
    truncated = [r for i, r in reasons.items() if "truncated or corrupt" in r]
    assert len(truncated) == 1 and Path(paths[-1]).name in truncated[0]
    listed = list(result.image_paths)
    good = [i for i in listed if i not in reasons]
    assert result.meta["n_processed"] == len(good) == int(result.stats["images"])
    assert not {listed.index(i) for i in reasons} & set(result.topk.image.flatten().tolist())


def test_parquet_bad_cells_and_columns(model, atlas, images, tmp_path):
    rows = [(name, data) for name, data in images[:6]] + [("missing", None)] + \
        [(name, data) for name, data, _ in bad_images()[:3]]
    write_parquet(tmp_path / "pq", rows, files=1, row_group=4, struct=True)
    result = mine(model, str(tmp_path / "pq"), tmp_path / "mined", atlas=atlas, **SETTINGS)
    reasons = dict(result.bad)
    assert len(reasons) == 4 and any("empty cell" in r for r in reasons.values())
    assert result.meta["n_processed"] == 6
    with pytest.raises(QKDissectError, match="no column 'pixels'"):
        open_source(str(tmp_path / "pq"), batch_size=2, image_column="pixels")
    with pytest.raises(QKDissectError, match="not image bytes"):
        open_source(str(tmp_path / "pq"), batch_size=2, image_column="name")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"])}), tmp_path / "two.parquet")
    with pytest.raises(QKDissectError, match="--image-column"):
        open_source(str(tmp_path / "two.parquet"), batch_size=2)
    assert open_source(str(tmp_path / "two.parquet"), batch_size=2, image_column="b").image_column == "b"


def test_file_lists_skip_missing_files(model, atlas, sets, tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text(f"# a comment\n{sets['folder'] / 'img_000.png'}\n\nnot/there.png\n"
                       f"{sets['folder'] / 'img_001.jpg'}\n")
    result = mine(model, listing, tmp_path / "mined", atlas=atlas, **SETTINGS)
    assert result.meta["n_images"] == 3 and result.meta["n_processed"] == 2
    assert "file not found" in dict(result.bad)["not/there.png"]


def test_bad_image_specs_are_one_clear_error(tmp_path, sets):
    cases = [(tmp_path / "nothing", "no such file"), ("https://host/shard-{000..001}.tar", "not a local file"),
             (tmp_path / "x.zip", "give an image folder")]
    (tmp_path / "x.zip").write_bytes(b"PK")
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "no images"))
    (tmp_path / "a.tar.gz").write_bytes(b"")
    cases.append((str(tmp_path / "a.tar.gz") + "::" + str(tmp_path / "a.tar.gz"), "twice"))
    cases.append((str(sets["shards"] / "shard-{000000..000001}.tar") + "::" + str(tmp_path / "a.tar.gz"),
                  "not a .tar shard"))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    cases.append((tmp_path / "empty.txt", "lists no files"))
    for spec, message in cases:
        with pytest.raises(QKDissectError, match=message):
            open_source(str(spec), batch_size=4)
    with pytest.raises(QKDissectError, match="image-column"):
        open_source(sets["folder"], batch_size=4, image_column="jpg")


def test_units_are_fixed_and_streams_resume_at_a_position(sets):
    shards = open_source(str(sets["shards"]), batch_size=3)
    assert [u.name for u in shards.units] == [f"shard-{i:06d}.tar" for i in range(4)]
    whole = list(read_unit(shards, 1))
    assert [s.position for s in whole] == [0, 1, 2, 3] and whole[0].id == "shard-000001.tar#img_004"
    assert list(read_unit(shards, 1, start=2)) == whole[2:]
    parquet = open_source(str(sets["root"] / "parquet"), batch_size=3)
    assert [(u.name, u.row_group, u.first_row, u.size) for u in parquet.units] == [
        ("part-000.parquet", 0, 0, 3), ("part-000.parquet", 1, 3, 3), ("part-000.parquet", 2, 6, 1),
        ("part-001.parquet", 0, 0, 3), ("part-001.parquet", 1, 3, 3), ("part-001.parquet", 2, 6, 1)]
    rows = list(read_unit(parquet, 1, start=1))
    assert [(s.position, s.id) for s in rows] == [(1, "part-000.parquet#4"), (2, "part-000.parquet#5")]
    folder = open_source(sets["folder"], batch_size=4)
    assert [u.files for u in folder.units] == [(0, 4), (4, 8), (8, 12), (12, 14)]  # batch-sized blocks of files
    assert folder.fingerprint() == open_source(sets["folder"], batch_size=4).fingerprint()


def test_webdataset_grouping_matches_the_webdataset_package(sets):
    """The samples and keys we stream are the ones webdataset.WebDataset yields for the same shards."""
    import webdataset as wds

    spec = str(sets["shards"] / "shard-{000000..000003}.tar")
    ours = [s.id.split("#")[1] for u in range(4) for s in read_unit(open_source(spec, batch_size=2), u)]
    theirs = [sample["__key__"] for sample in wds.WebDataset(spec, shardshuffle=False)]
    assert ours == theirs


def test_listing_reads_lines_on_demand(tmp_path):
    path = tmp_path / "images.txt"
    lines = [f"dir/é{i}.png" for i in range(2500)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    listing = Listing(path)
    assert len(listing) == 2500 and listing[0] == lines[0] and listing[-1] == lines[-1]
    assert listing[1234] == lines[1234] and listing.index(lines[2001]) == 2001 and list(listing) == lines
    with pytest.raises(IndexError):
        listing[2500]


def test_report_reads_tiles_back_from_shards(model, atlas, sets, tmp_path):
    from qkdissect.report import build_report

    atlas.save(tmp_path / "atlas")
    mine(model, str(sets["shards"]), tmp_path / "mined", atlas=atlas, **SETTINGS)
    report = build_report(tmp_path / "atlas", tmp_path / "report", mined=tmp_path / "mined")
    assert report.warnings == () and report.n_images > 0
    tiles = list((report.out / "img" / "mined").rglob("*.jpg"))
    assert tiles and all(t.stat().st_size > 500 for t in tiles)


def test_sheets_from_parquet_equal_sheets_from_the_folder(model, atlas, sets, tmp_path):
    """Contact sheets read the images back from Parquet and draw the same pixels as from the folder (the
    captions name the images differently, so only the tile area is compared)."""
    from PIL import Image

    settings = {**SETTINGS, "sheets": True, "sheet_modes": (0,), "layers": [2]}
    a = mine(model, sets["folder"], tmp_path / "a", atlas=atlas, **settings)
    b = mine(model, str(sets["root"] / "parquet"), tmp_path / "b", atlas=atlas, **settings)
    assert len(a.meta["sheets"]) == len(b.meta["sheets"]) == 8
    for sa, sb in zip(a.meta["sheets"], b.meta["sheets"]):
        x = np.asarray(Image.open(tmp_path / "a" / sa["png"]))
        y = np.asarray(Image.open(tmp_path / "b" / sb["png"]))
        assert x.shape == y.shape
        tiles = slice(42, 42 + 114)  # the first tile (160 × 114 px for 56 × 40 inputs), below the two-line title
        assert np.abs(x[tiles, 6:166].astype(int) - y[tiles, 6:166].astype(int)).max() <= 2


def test_shards_with_members_in_folders_and_uppercase_extensions(model, atlas, images, tmp_path):
    """Keys with a path inside the tar (``train/n01/abc.JPEG``) as ImageNet shards have them."""
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, (name, data) in enumerate(images[:5]):
            extension = name.rsplit(".", 1)[1]
            for member, payload in ((f"train/n{i:02d}/x{i}.{'JPEG' if extension == 'jpg' else extension}", data),
                                    (f"train/n{i:02d}/x{i}.cls", b"1")):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    result = mine(model, path, tmp_path / "mined", atlas=atlas, **SETTINGS)
    assert result.meta["n_processed"] == 5 and list(result.image_paths)[0] == "s.tar#train/n00/x0"
    assert json.loads((tmp_path / "mined" / "mined.json").read_text())["source"]["kind"] == "webdataset"
