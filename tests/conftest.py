"""Shared fixtures (the factories behind them live in helpers.py)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
if "QKDISSECT_CACHE_DIR" not in os.environ:  # never write into the user's cache from the tests
    import tempfile

    os.environ["QKDISSECT_CACHE_DIR"] = tempfile.mkdtemp(prefix="qkdissect-test-cache-")

import pytest
from helpers import make_hf, make_timm_vit


@pytest.fixture(scope="session")
def timm_vit():
    from qkdissect.adapters import wrap_model

    return wrap_model(make_timm_vit(), spec="test:tiny-timm-vit")


@pytest.fixture(scope="session", params=["vit", "deit", "dinov2", "clip", "bert"])
def hf_model(request):
    from qkdissect.adapters import wrap_model

    return wrap_model(make_hf(request.param), spec=f"test:tiny-hf-{request.param}")


@pytest.fixture(scope="session")
def natural_image_folder(tmp_path_factory):
    """A few natural images from skimage.data (grayscale and colour, different sizes) as files."""
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("natural")
    for name in ("astronaut", "coffee", "chelsea", "camera", "rocket"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder

