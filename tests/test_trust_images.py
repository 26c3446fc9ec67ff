"""Every pixel format is read faithfully by qkdissect.images.open_image (the one reader every command uses).

Property tests (hypothesis): random modes, bit depths, sizes and aspect ratios, each compared with an independent
numpy conversion of the array the file was made from — not with Pillow's own conversion.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qkdissect.errors import QKDissectError
from qkdissect.images import open_image

MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I16", "I8", "F01", "F255", "RGB16")


def png_rgb16(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make(mode: str, height: int, width: int, seed: int, folder) -> tuple[object, np.ndarray]:
    """Write an image of ``mode`` and return (path, the expected 8-bit RGB array, computed with numpy only)."""
    rng = np.random.default_rng(seed)
    path = folder / f"{mode.replace(';', '_')}_{height}x{width}_{seed}"
    if mode == "1":
        bits = rng.random((height, width)) < 0.5
        Image.fromarray(bits).save(path.with_suffix(".png"))
        grey = bits.astype(np.uint8) * 255
        return path.with_suffix(".png"), np.repeat(grey[..., None], 3, axis=2)
    if mode == "L":
        grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
        Image.fromarray(grey, "L").save(path.with_suffix(".png"))
        return path.with_suffix(".png"), np.repeat(grey[..., None], 3, axis=2)
    if mode == "P":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        index = rng.integers(0, 256, (height, width), dtype=np.uint8)
        image = Image.fromarray(index, "P")
        image.putpalette(palette.flatten().tolist())
        image.save(path.with_suffix(".png"))
        return path.with_suffix(".png"), palette[index]
    if mode in ("RGB", "RGBA", "LA", "CMYK"):
        channels = {"RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4}[mode]
        data = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        suffix = ".tif" if mode == "CMYK" else ".png"
        Image.fromarray(data, mode).save(path.with_suffix(suffix))
        if mode == "RGB":
            return path.with_suffix(suffix), data
        if mode == "CMYK":
            c = data.astype(np.float64)
            rgb = (255 - c[..., :3]) * (255 - c[..., 3:]) / 255
            return path.with_suffix(suffix), np.floor(rgb + 0.5).astype(np.uint8)
        colour = data[..., :3] if mode == "RGBA" else np.repeat(data[..., :1], 3, axis=2)
        alpha = data[..., -1:].astype(np.float64) / 255
        return path.with_suffix(suffix), np.floor(colour * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    if mode == "I;16":
        values = rng.integers(0, 65536, (height, width)).astype(np.uint16)
        Image.fromarray(values).save(path.with_suffix(".png"))
        grey = np.floor(values.astype(np.float64) / 257 + 0.5).astype(np.uint8)
        return path.with_suffix(".png"), np.repeat(grey[..., None], 3, axis=2)
    if mode == "RGB16":
        values = rng.integers(0, 65536, (height, width, 3)).astype(np.uint16)
        path = path.with_suffix(".png")
        path.write_bytes(png_rgb16(values))
        return path, (values >> 8).astype(np.uint8)
    if mode in ("I16", "I8"):
        top = 65536 if mode == "I16" else 256
        values = rng.integers(0, top, (height, width)).astype(np.int32)
        values.flat[0] = top - 1  # the range decides the scale: make the full range present
        Image.fromarray(values).save(path.with_suffix(".tif"))
        grey = values if mode == "I8" else np.floor(values.astype(np.float64) * 255 / 65535 + 0.5)
        return path.with_suffix(".tif"), np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    scale = 1.0 if mode == "F01" else 255.0
    values = (rng.random((height, width)) * scale).astype(np.float32)
    values.flat[0] = scale
    Image.fromarray(values).save(path.with_suffix(".tif"))
    grey = np.floor(values.astype(np.float64) * (255 / scale) + 0.5)
    return path.with_suffix(".tif"), np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(MODES), height=st.integers(2, 37), width=st.integers(2, 41),
       seed=st.integers(0, 2**31 - 1))
def test_every_mode_and_depth_matches_an_independent_conversion(tmp_path, mode, height, width, seed):
    path, expected = make(mode, height, width, seed, tmp_path)
    got = np.asarray(open_image(path))
    assert got.dtype == np.uint8 and got.shape == (height, width, 3)
    tolerance = 1 if mode in ("RGBA", "LA", "CMYK") else 0  # Pillow's integer compositing rounds
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= tolerance, mode


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(height=st.integers(2, 30), width=st.integers(2, 30), orientation=st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]))
def test_exif_orientation_is_applied(tmp_path, height, width, orientation):
    rng = np.random.default_rng(height * 31 + width)
    data = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(data)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}_{height}x{width}.png"
    image.save(path, exif=exif)
    # the EXIF rule written out: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90° clockwise, 7 transverse,
    # 8 rotate 90° counter-clockwise
    expected = {1: data, 2: data[:, ::-1], 3: data[::-1, ::-1], 4: data[::-1], 5: data.transpose(1, 0, 2),
                6: np.rot90(data, k=-1), 7: np.rot90(data, k=-1)[::-1], 8: np.rot90(data, k=1)}[orientation]
    assert np.array_equal(np.asarray(open_image(path)), expected)


def test_a_16_bit_gradient_is_a_gradient_not_two_levels(tmp_path):
    """Issue 14, case 4: a 0–65535 grey gradient (mode I;16) used to become pure 0/255."""
    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    Image.fromarray(gradient).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    grey = np.asarray(open_image(tmp_path / "g.png"))[..., 0]
    assert len(np.unique(grey)) == 256 and grey[0, 0] == 0 and grey[0, -1] == 255
    assert np.all(np.diff(grey[0].astype(int)) == 1)


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_refused_pixels_name_their_reason(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(30000, 30000))
    with pytest.raises(QKDissectError, match="decompression bomb"):
        open_image(tmp_path / "bomb.png")
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(QKDissectError, match="neither 8- nor 16-bit"):
        open_image(tmp_path / "i32.tif")
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(QKDissectError, match=r"\[0, 255\]"):
        open_image(tmp_path / "f.tif")
    values = np.zeros((4, 4), np.float32)
    values[1, 1] = np.nan
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with pytest.raises(QKDissectError, match="NaN"):
        open_image(tmp_path / "nan.tif")
