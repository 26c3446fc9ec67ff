"""The same small image set written as a folder, a file list, WebDataset shards and Parquet files, with bad samples
of every kind, for the mining source tests. Import with ``from datasets import ...``."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from helpers import save_timm_folder  # noqa: F401 — re-exported for the source tests


def natural_images(count: int = 14, seed: int = 0) -> list[tuple[str, bytes]]:
    """(name, encoded bytes): crops / flips of skimage.data pictures in PNG, JPEG, WEBP, grey and palette modes."""
    from PIL import Image
    from skimage import data

    sources = [Image.fromarray(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea", "camera",
                                                                      "rocket")]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        w, h = image.size
        side = int(rng.uniform(0.4, 0.9) * min(w, h))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crop = image.crop((left, top, left + side, top + int(side * rng.uniform(0.7, 1.3))))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if i % 7 == 3:
            crop = crop.convert("L")
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        buffer = io.BytesIO()
        crop.convert("RGB" if fmt == "JPEG" and crop.mode not in ("RGB", "L") else crop.mode).save(buffer, fmt)
        out.append((f"img_{i:03d}.{ext}", buffer.getvalue()))
    return out


def bad_images() -> list[tuple[str, bytes, str]]:
    """(name, bytes, words the reason must contain) for the kinds of bad image."""
    from PIL import Image

    whole = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(whole, "PNG")
    tiny, wide = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1, 1), "red").save(tiny, "PNG")
    Image.new("RGB", (1000, 5), "blue").save(wide, "PNG")
    return [("empty.jpg", b"", "empty"), ("text.jpg", b"this is not a picture\n", "not an image"),
            ("truncated.png", whole.getvalue()[: len(whole.getvalue()) // 2], "truncated"),
            ("tiny.png", tiny.getvalue(), "too small"), ("wide.png", wide.getvalue(), "aspect ratio"),
            ("bomb.png", bomb_png(), "decompression bomb")]


def bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header announces side × side pixels (over twice PIL's limit) in a few hundred bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (1 + side // 8) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def write_folder(folder: Path, images: list[tuple[str, bytes]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def write_shards(folder: Path, samples: list[tuple[str, dict[str, bytes]]], per_shard: int) -> list[Path]:
    """WebDataset shards ``shard-NNNNNN.tar`` of ``per_shard`` samples (key, {extension: bytes}) each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, start in enumerate(range(0, len(samples), per_shard)):
        path = folder / f"shard-{number:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, members in samples[start:start + per_shard]:
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def as_samples(images: list[tuple[str, bytes]]) -> list[tuple[str, dict[str, bytes]]]:
    """Folder images as WebDataset samples: key = file stem, image member by its extension, plus a label."""
    samples = []
    for index, (name, data) in enumerate(images):
        stem, extension = name.rsplit(".", 1)
        samples.append((stem, {extension: data, "cls": str(index % 5).encode(),
                               "json": json.dumps({"name": name}).encode()}))
    return samples


def write_parquet(folder: Path, images: list[tuple[str, bytes | None]], *, files: int = 2, row_group: int = 4,
                  struct: bool = False) -> list[Path]:
    """Parquet files with the image bytes in column ``image`` (binary, or {bytes, path} structs as the Hugging
    Face hub writes them), a ``name`` and a ``label`` column; ``row_group`` rows per row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(images) // files)
    paths = []
    for number, start in enumerate(range(0, len(images), per_file)):
        part = images[start:start + per_file]
        if struct:
            column = pa.array([None if data is None else {"bytes": data, "path": name} for name, data in part],
                              type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        else:
            column = pa.array([data for _, data in part], type=pa.binary())
        table = pa.table({"name": [name for name, _ in part], "image": column,
                          "label": list(range(start, start + len(part)))})
        path = folder / f"part-{number:03d}.parquet"
        pq.write_table(table, path, row_group_size=row_group)
        paths.append(path)
    return paths
