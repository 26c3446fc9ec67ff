"""Reading images robustly: listing a folder, opening a file with a clear reason when it fails."""

from __future__ import annotations

import os
from pathlib import Path

from qkdissect.errors import QKDissectError

__all__ = ["IMAGE_EXTENSIONS", "list_images", "open_image", "MIN_IMAGE_SIDE", "MAX_ASPECT_RATIO"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
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


def open_image(path: str | os.PathLike | bytes, *, name: str | None = None):
    """Open an image fully decoded as an RGB PIL image: ``path`` is a file, or the encoded bytes of one
    (a WebDataset member, a Parquet cell) named ``name`` in messages.

    Grayscale, palette and RGBA images are converted (alpha composited on white). Raises
    QKDissectError naming the reason for: a missing or zero-byte file, a file that is not an
    image, a truncated image, a decompression bomb (more than twice PIL's ``Image.MAX_IMAGE_PIXELS``
    pixels, refused from the header before decoding), an image smaller than MIN_IMAGE_SIDE
    pixels or with an aspect ratio beyond MAX_ASPECT_RATIO.
    """
    import io

    from PIL import Image, UnidentifiedImageError

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
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                result = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                result = image.convert("RGB")
    except UnidentifiedImageError:
        raise QKDissectError(f"{label}: not an image file (unrecognised format).") from None
    except Image.DecompressionBombError as error:
        raise QKDissectError(f"{label}: image too large to decode safely (a decompression bomb? {error}).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise QKDissectError(f"{label}: unreadable or truncated image ({error}).") from None
    width, height = result.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise QKDissectError(f"{label}: image too small ({width}×{height} pixels).")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise QKDissectError(f"{label}: extreme aspect ratio ({width}×{height}); crop it first.")
    return result
