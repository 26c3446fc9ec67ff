"""A Hugging Face hub cache folder laid out as huggingface_hub lays it out, filled with tiny random models.

    HF_HOME/hub/models--ORG--NAME/
        refs/main                      the commit hash
        blobs/SHA256                   file contents
        snapshots/HASH/FILE -> ../../blobs/SHA256

so that ``timm:NAME`` / ``hf:ORG/NAME`` go through qkdissect's real by-name loading path with ``HF_HOME`` pointing
here and ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch


def add_repo(hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str | None = None) -> Path:
    """Put ``files`` (name -> bytes) into the cache as repo ``repo_id``'s ``main``; returns the snapshot folder."""
    commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous() for k, v in state.items()})


def add_timm_model(hf_home: Path, name: str, seed: int, scramble=None, **model_args) -> dict[str, torch.Tensor]:
    """timm's pretrained ``name`` (arch.tag, e.g. test_vit.r160_in1k) with random weights (timm's initialisation,
    or ``scramble(state, seed)``), as timm's hub repo ``timm/NAME`` holds it (config.json + model.safetensors);
    returns the state dict."""
    import timm

    torch.manual_seed(seed)
    arch = name.split(".", 1)[0]
    model = timm.create_model(arch, pretrained=False, **model_args)
    state = model.state_dict() if scramble is None else scramble(model.state_dict(), seed)
    config = {"architecture": arch, "num_classes": model.num_classes, "model_args": model_args,
              "pretrained_cfg": {"tag": name.split(".", 1)[-1], "input_size": [3, 160, 160]}}
    add_repo(hf_home, f"timm/{name}", {"config.json": json.dumps(config).encode(),
                                       "model.safetensors": safetensors_bytes(state)})
    return state


def add_hf_model(hf_home: Path, repo_id: str, model) -> dict[str, torch.Tensor]:
    """A transformers model (e.g. a tiny ViTModel) saved as the hub repo ``repo_id``; returns its state dict."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        files = {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}
    add_repo(hf_home, repo_id, files)
    return model.state_dict()
