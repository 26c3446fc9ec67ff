"""Reading images robustly and faithfully: listing a folder, opening a file (every bit depth scaled, never
clipped; EXIF orientation applied) with a clear reason when it fails."""

from __future__ import annotations

import os
from pathlib import Path

from qkdissect.errors import QKDissectError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "open_image", "to_rgb8", "MIN_IMAGE_SIDE", "MAX_ASPECT_RATIO"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MIN_IMAGE_SIDE = 2
MAX_ASPECT_RATIO = 50.0


def list_images(folder: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files below ``folder`` (recursive), in sorted order of their relative paths.

    Sorted order (not ``os.listdir`` order) makes runs reproducible and shardable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise QKDissectError(f"image folder not found: {folder}.")
    found = [p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def to_rgb8(image):
    """An 8-bit RGB PIL image with the same picture as ``image`` (any PIL mode), never clipping a bit depth:

    * "1": 0/1 → 0/255; "L", "P", "RGB", "CMYK" (naive, R = (255−C)(255−K)/255), "YCbCr", "LAB", "HSV": Pillow's
      conversion; a palette with transparency, "RGBA", "LA", "PA", "RGBa", "La": alpha composited on white,
      out = a·c + (1 − a)·255 with a = alpha/255.
    * 16-bit grey ("I;16", "I;16B", "I;16L", "I;16N"): v·255/65535, rounded (Pillow reads 16-bit RGB PNGs as
      8-bit, keeping the high byte: v // 256).
    * 32-bit integers ("I"): on the 8-bit scale when every value is in 0..255, on the 16-bit scale when in
      0..65535; other values are refused (their range is unknown).
    * 32-bit floats ("F"): on the [0, 1] scale (×255) when every value is in [0, 1], else on the [0, 255] scale;
      values outside [0, 255] or not finite are refused.

    Raises ValueError with the reason for an image it refuses.
    """
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode == "1":
        return image.convert("L").convert("RGB")
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        grey = (values * 255 + 32767) // 65535
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("the image holds NaN or infinite pixel values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "I":
            if low < 0 or high > 65535:
                raise ValueError(f"32-bit integer pixels in {low:g}..{high:g}: neither 8- nor 16-bit data; convert "
                                 "the image to 8 or 16 bits")
            grey = values if high <= 255 else np.floor(values * 255 / 65535 + 0.5)
        else:
            if low < 0 or high > 255:
                raise ValueError(f"floating-point pixels in {low:g}..{high:g}: neither a [0, 1] nor a [0, 255] "
                                 "scale; rescale the image")
            grey = np.floor((values * 255 if high <= 1 else values) + 0.5)
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info) \
            or (mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | os.PathLike | bytes, *, name: str | None = None):
    """Open an image fully decoded as an 8-bit RGB PIL image, read faithfully (:func:`to_rgb8`), with its EXIF
    orientation applied: ``path`` is a file, or the encoded bytes of one (a WebDataset member, a Parquet cell)
    named ``name`` in messages.

    Raises QKDissectError naming the reason for: a missing or zero-byte file, a file that is not an image, a
    truncated image, a decompression bomb (more than 2 × PIL.Image.MAX_IMAGE_PIXELS pixels, refused from the
    header before decoding), pixel values whose scale is unknown, an image smaller than MIN_IMAGE_SIDE pixels or
    with an aspect ratio beyond MAX_ASPECT_RATIO.
    """
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(path, (bytes, bytearray, memoryview)):
        label = name or "<bytes>"
        if len(path) == 0:
            raise QKDissectError(f"{label}: empty file (0 bytes).")
        stream = io.BytesIO(path)
    else:
        path = Path(path)
        label = str(path) if name is None else name
        if not path.is_file():
            raise QKDissectError(f"{label}: file not found.")
        if path.stat().st_size == 0:
            raise QKDissectError(f"{label}: empty file (0 bytes).")
        stream = path
    try:
        with Image.open(stream) as image:
            image.load()
            result = to_rgb8(ImageOps.exif_transpose(image) or image)
    except UnidentifiedImageError:
        raise QKDissectError(f"{label}: not an image file (unrecognised format).") from None
    except Image.DecompressionBombError as error:
        raise QKDissectError(f"{label}: refused as a decompression bomb ({error}).") from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError) as error:
        raise QKDissectError(f"{label}: unreadable or truncated image ({error}).") from None
    width, height = result.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise QKDissectError(f"{label}: image too small ({width}×{height} pixels).")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise QKDissectError(f"{label}: extreme aspect ratio ({width}×{height}); crop it first.")
    return result
