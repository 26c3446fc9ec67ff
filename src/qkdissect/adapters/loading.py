"""``load_model(spec)``: models by name (timm / Hugging Face), from folders, or built in.

Spec grammar:
    timm:NAME            timm.create_model(NAME) — pretrained weights from the local Hugging Face cache or
                         downloaded, or ``checkpoint=FILE`` (safetensors / torch state dict), or random init
    hf:ID_OR_PATH        transformers ``AutoModel.from_pretrained`` (a ``save_pretrained`` folder, or a hub id
                         ORG/NAME[@REVISION] — from the cache or downloaded; timm-format hub repos load with timm)
    PATH                 a folder: ``config.json`` with ``architecture`` (timm) or ``model_type`` (HF)
    builtin:NAME         a model that ships with qkdissect (see ``builtin_models()``)
    NAME                 a timm model name
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qkdissect.adapters.base import ModelAdapter, Preprocessing
from qkdissect.adapters.registry import get_adapter
from qkdissect.errors import QKDissectError
from qkdissect.weights import check_finite_weights, check_loading_info

__all__ = ["LoadedModel", "load_model", "load_state_dict", "register_builtin", "builtin_models", "wrap_model"]


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for qkdissect: the module (eval mode), its adapter, and where it came from."""

    model: nn.Module
    adapter: ModelAdapter
    spec: str
    checkpoint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def preprocessing(self) -> Preprocessing | None:
        return self.adapter.preprocessing()


_BUILTINS: dict[str, tuple[Callable[[], LoadedModel], str]] = {}


def register_builtin(name: str, loader: Callable[..., LoadedModel], description: str) -> None:
    """Make ``builtin:name`` load with ``loader()`` (and with ``loader(random_init=True)`` for
    ``load_model("builtin:name", random_init=True)``, when the loader accepts it)."""
    _BUILTINS[name] = (loader, description)


def builtin_models() -> dict[str, str]:
    """Names and one-line descriptions of the built-in models."""
    return {name: description for name, (_, description) in sorted(_BUILTINS.items())}


def wrap_model(model: nn.Module | LoadedModel, spec: str | None = None) -> LoadedModel:
    """Accept what ``load_model`` returns or a plain ``nn.Module`` of a supported family."""
    if isinstance(model, LoadedModel):
        return model
    adapter = get_adapter(model)
    model.eval()
    check_finite_weights(model, adapter)
    return LoadedModel(model=model, adapter=adapter, spec=spec or f"module:{type(model).__name__}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise QKDissectError(f"checkpoint file not found: {path}. Check the path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 — any reader failure means a corrupt / foreign file
        raise QKDissectError(
            f"could not read checkpoint {path} ({type(error).__name__}: {str(error)[:200]}). "
            "It is corrupt or not a safetensors / torch state-dict file; re-download or re-save it."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise QKDissectError(f"checkpoint {path} does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint into ``model`` strictly; mismatches become one readable QKDissectError."""
    path = Path(path)
    state = _read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise QKDissectError(
            f"checkpoint {path} does not fit this architecture: {'; '.join(parts)}. "
            "Pick the model spec that matches the checkpoint (e.g. timm:vit_small_patch16_224 "
            "for a ViT-S/16 checkpoint)."
        )
    model.load_state_dict(state, strict=True)


_REMEDY = ("Go online once to download the weights, or pass --checkpoint FILE with them, or a saved model "
           "folder, or --random-init for random weights.")


def _timm_weight_names(filename: str | None) -> tuple[str, ...]:
    """The file names timm tries in a hub repo, safetensors first (as ``timm.models.load_state_dict_from_hf``)."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return (filename,)
    safe = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}
    alternative = safe.get(filename, filename[:-4] + ".safetensors" if filename.endswith(".bin") else None)
    return tuple(name for name in (alternative, filename) if name)


def timm_pretrained_source(name: str) -> tuple[str, Path | None]:
    """Where timm takes the pretrained weights of ``name`` (``arch`` or ``arch.tag``) from, and the local copy.

    Returns (``"hub repo ORG/NAME"`` or ``"URL"``, the cached file or None). Reads only local caches (the Hugging
    Face hub cache, torch hub's checkpoints folder); QKDissectError for an unknown tag or a model without weights.
    """
    from timm.models import get_pretrained_cfg, list_pretrained

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
        arch = name.split(".", 1)[0]
        tags = list_pretrained(f"{arch}.*")
        raise QKDissectError(f"timm has no pretrained weights {name!r}." + (
            f" Tags of {arch}: {', '.join(tags[:8])}." if tags else "") + " Or pass --random-init.") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise QKDissectError(f"timm has no pretrained weights for {name!r}; pass --checkpoint FILE with weights "
                             "or --random-init for random weights.")
    if cfg.hf_hub_id:
        from qkdissect.adapters.hub import cached_file

        return f"hub repo {cfg.hf_hub_id}", cached_file(cfg.hf_hub_id, _timm_weight_names(cfg.hf_hub_filename))
    from urllib.parse import urlsplit

    local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(cfg.url).path)
    return cfg.url, local if local.is_file() else None


def _timm_pretrained(name: str, **kwargs: Any) -> tuple[nn.Module, str | None]:
    """timm's pretrained model ``name``: from the local cache when there (no network), else downloaded, but
    only after a quick check that the hub can be reached. Returns (model, the weights file used or None)."""
    import timm

    from qkdissect.adapters.hub import quiet_hub, require_hub

    where, local = timm_pretrained_source(name)
    if local is not None:
        try:  # timm's own loader (its checkpoint filters and head adaptation), pointed at the cached file
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(local)},
                                     **kwargs), str(local)
        except Exception as error:  # noqa: BLE001
            raise QKDissectError(
                f"the cached weights of timm:{name} ({local}) could not be loaded ({type(error).__name__}: "
                f"{str(error)[:200]}). Delete that file to download it again, or pass --checkpoint FILE."
            ) from None
    require_hub(f"timm:{name} (pretrained weights from {where})", _REMEDY)
    try:
        with quiet_hub():
            return timm.create_model(name, pretrained=True, **kwargs), None
    except Exception as error:  # noqa: BLE001
        raise QKDissectError(
            f"could not fetch the pretrained weights of timm:{name} ({where}; {type(error).__name__}: "
            f"{str(error)[:200]}). {_REMEDY}"
        ) from None


def _timm_model(name: str, checkpoint: str | None, random_init: bool,
                **kwargs: Any) -> tuple[nn.Module, str | None]:
    """(timm model ``name``, the cached pretrained weights file it was read from, if any)."""
    import timm

    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=6, cutoff=0.6)
        raise QKDissectError(
            f"timm has no model named {name!r}." + (f" Similar names: {', '.join(close)}." if close else "")
            + " List them with `python -c \"import timm; print(timm.list_models('vit_*'))\"`."
        )
    if checkpoint is None and not random_init:
        return _timm_pretrained(name, **kwargs)
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise QKDissectError(f"timm could not build {name!r}: {error}") from None
    if checkpoint is not None:
        load_state_dict(model, checkpoint)
    return model, None


def _read_json(path: Path) -> dict[str, Any]:
    from qkdissect.files import read_json_document

    return read_json_document(path, missing="the model folder is incomplete", remedy="re-save the model")


def _hf_model(path_or_id: str, checkpoint: str | None, random_init: bool,
              revision: str | None = None) -> tuple[nn.Module, dict, Any]:
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError:  # pragma: no cover — transformers is a dependency
        raise QKDissectError("Hugging Face models need `pip install transformers`.") from None
    from qkdissect.adapters.hub import quiet_hub

    path = Path(path_or_id)
    try:
        with quiet_hub():
            hub = {"revision": revision} if revision else {}
            config = AutoConfig.from_pretrained(path_or_id, **hub)
            model_type = getattr(config, "model_type", "")
            cls = AutoModel
            if model_type == "clip":
                from transformers import CLIPVisionModel

                cls = CLIPVisionModel
                config = config.vision_config
            info = None
            if random_init or checkpoint is not None:
                model = cls.from_config(config)
            elif model_type == "clip":
                model, info = cls.from_pretrained(path_or_id, output_loading_info=True, **hub)
            else:
                model, info = cls.from_pretrained(path_or_id, config=config, output_loading_info=True, **hub)
        check_loading_info(info, path_or_id, model)
    except QKDissectError:
        raise
    except Exception as error:  # noqa: BLE001
        where = "folder" if path.exists() else "hub id"
        raise QKDissectError(
            f"transformers could not load the {where} {path_or_id!r} ({type(error).__name__}: "
            f"{str(error)[:200]}). Give a save_pretrained() folder with config.json and weights; "
            "hub ids need internet."
        ) from None
    if checkpoint is not None:
        load_state_dict(model, checkpoint)
    processor = {}
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        processor = _read_json(path / "preprocessor_config.json")
    tokenizer = None
    if path.is_dir() and any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        except Exception:  # noqa: BLE001 — a model without a usable tokenizer still dissects
            tokenizer = None
    return model, processor, tokenizer


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _timm_folder(folder: Path, config: dict[str, Any], weights: Path | None, checkpoint: str | None,
                 random_init: bool, **timm_kwargs: Any) -> nn.Module:
    """A model saved in timm's hub format: ``config.json`` (``architecture``, ``num_classes``, ``model_args``)
    and ``weights`` (read strictly)."""
    if checkpoint is None and weights is None and not random_init:
        raise QKDissectError(f"timm folder {folder} has no model.safetensors or pytorch_model.bin.")
    kwargs = {"num_classes": config.get("num_classes", 0), **timm_kwargs}
    kwargs.update(config.get("model_args", {}))
    return _timm_model(str(config["architecture"]), checkpoint or (None if random_init else str(weights)),
                       random_init=True, **kwargs)[0]


def _download_first(repo: str, filenames: tuple[str, ...], what: str) -> Path:
    """Download the first of ``filenames`` that ``repo`` has (retry messages silenced)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    from qkdissect.adapters.hub import quiet_hub, split_revision

    repo_id, revision = split_revision(repo)
    for filename in filenames:
        try:
            with quiet_hub():
                return Path(hf_hub_download(repo_id, filename, revision=revision))
        except EntryNotFoundError:
            continue
        except Exception as error:  # noqa: BLE001
            raise QKDissectError(f"could not fetch {what} ({type(error).__name__}: {str(error)[:200]}). "
                                 f"{_REMEDY}") from None
    raise QKDissectError(f"{what} has none of {', '.join(filenames)}; it is not a model qkdissect can read.")


def _hub_model(repo: str, checkpoint: str | None, random_init: bool,
               **timm_kwargs: Any) -> tuple[nn.Module, dict, Any, str | None]:
    """``hf:ORG/NAME[@REVISION]`` that is not a local folder: the snapshot in the local hub cache when it is
    complete (no network), else downloaded after a quick check that the hub can be reached. Hub repos in timm's
    format (``config.json`` with ``architecture``) load with timm. Returns (model, processor, tokenizer, folder)."""
    from qkdissect.adapters.hub import cached_file, require_hub, split_revision

    repo_id, revision = split_revision(repo)
    if repo_id.count("/") > 1 or not repo_id.strip("/") or any(c.isspace() for c in repo_id):
        raise QKDissectError(f"hf:{repo} is neither a folder nor a hub id (ORG/NAME); check the spelling.")
    what = f"hf:{repo}"
    needs_weights = checkpoint is None and not random_init
    config_file = cached_file(repo, ("config.json",))
    if config_file is None:
        require_hub(f"{what} (config.json from hub repo {repo_id})", _REMEDY)
        config_file = _download_first(repo, ("config.json",), what)
    folder = config_file.parent
    config = _read_json(config_file)
    if "architecture" in config:  # timm's hub format
        weights = cached_file(repo, _TIMM_WEIGHTS) if needs_weights else None
        if needs_weights and weights is None:
            require_hub(f"{what} (weights from hub repo {repo_id})", _REMEDY)
            weights = _download_first(repo, _TIMM_WEIGHTS, what)
        return _timm_folder(folder, config, weights, checkpoint, random_init, **timm_kwargs), {}, None, str(folder)
    if needs_weights and cached_file(repo, _HF_WEIGHTS) is None:  # transformers downloads what the model needs
        require_hub(f"{what} (weights from hub repo {repo_id})", _REMEDY)
        return (*_hf_model(repo_id, checkpoint, random_init, revision=revision), None)
    return (*_hf_model(str(folder), checkpoint, random_init), str(folder))


def load_model(
    spec: str | nn.Module, checkpoint: str | os.PathLike | None = None, *, random_init: bool = False, **timm_kwargs: Any
) -> LoadedModel:
    """Load a model by spec (see module docstring) and find its adapter.

    ``checkpoint``: a safetensors / torch state dict for the architecture named by ``spec``.
    ``random_init``: skip pretrained weights (random initialisation), e.g. for a null model.
    Names (``timm:NAME``, ``hf:ORG/NAME``, a bare timm name) are read from the local Hugging Face cache when
    they are there; otherwise they are downloaded only if the hub answers within a few seconds, and a name
    that is neither cached nor reachable is one QKDissectError.
    Raises QKDissectError for an unknown spec, a missing file, a corrupt or mismatched
    checkpoint, or an unsupported family.
    """
    checkpoint = None if checkpoint is None else str(checkpoint)
    if isinstance(spec, (nn.Module, LoadedModel)):  # a model object, as `dissect` accepts
        if random_init:
            raise QKDissectError("--random-init needs a model spec, not a model object.")
        if checkpoint is None:
            return wrap_model(spec)
        load_state_dict(spec.model if isinstance(spec, LoadedModel) else spec, checkpoint)
        wrapped = wrap_model(spec)
        check_finite_weights(wrapped.model, wrapped.adapter)
        return LoadedModel(wrapped.model, wrapped.adapter, wrapped.spec, checkpoint, wrapped.info)
    spec = str(spec)
    processor: dict = {}
    tokenizer = None
    info: dict[str, Any] = {"random_init": bool(random_init)}
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in _BUILTINS:
            known = ", ".join(f"builtin:{n}" for n in sorted(_BUILTINS)) or "none installed"
            raise QKDissectError(f"unknown built-in model {spec!r}. Available: {known}.")
        loader = _BUILTINS[name][0]
        if random_init:  # a built-in loader that supports it takes ``random_init=True``
            import inspect

            if "random_init" not in inspect.signature(loader).parameters:
                raise QKDissectError(f"{spec} has no random-init variant; drop --random-init.")
            loaded = loader(random_init=True)
        else:
            loaded = loader()
        if checkpoint is not None:
            load_state_dict(loaded.model, checkpoint)
            check_finite_weights(loaded.model, loaded.adapter)
            loaded = LoadedModel(loaded.model, loaded.adapter, spec, checkpoint, loaded.info)
        return loaded
    if spec.startswith("timm:"):
        model, weights = _timm_model(spec[5:], checkpoint, random_init, **timm_kwargs)
        info["weights"] = weights
    elif spec.startswith("hf:") and not Path(spec[3:]).exists():
        model, processor, tokenizer, folder = _hub_model(spec[3:], checkpoint, random_init, **timm_kwargs)
        info["weights"] = folder
    elif spec.startswith("hf:"):
        model, processor, tokenizer = _hf_model(spec[3:], checkpoint, random_init)
    elif Path(spec).exists():
        path = Path(spec)
        if path.is_file():
            raise QKDissectError(
                f"{spec} is a file; a checkpoint needs an architecture: use "
                f"`timm:ARCH --checkpoint {spec}` (or give a save_pretrained() folder)."
            )
        if not (path / "config.json").is_file():
            raise QKDissectError(f"folder {spec} has no config.json; it is not a saved model folder.")
        config = _read_json(path / "config.json")
        if "architecture" in config:  # timm's hub / save format
            weights = next((path / f for f in _TIMM_WEIGHTS if (path / f).is_file()), None)
            model = _timm_folder(path, config, weights, checkpoint, random_init, **timm_kwargs)
        elif "model_type" in config:
            model, processor, tokenizer = _hf_model(spec, checkpoint, random_init)
        else:
            raise QKDissectError(f"{path / 'config.json'} has neither 'architecture' (timm) nor 'model_type' (HF).")
    elif ":" in spec:
        raise QKDissectError(
            f"unknown model spec {spec!r}: the prefix {spec.split(':')[0]!r} is not one of timm:, hf:, builtin:."
        )
    else:
        import timm

        if not timm.is_model(spec):
            raise QKDissectError(
                f"unknown model {spec!r}: not a folder and not a timm model name. Use timm:NAME, "
                "hf:ID_OR_FOLDER, builtin:NAME, or a save_pretrained() folder."
            )
        model, weights = _timm_model(spec, checkpoint, random_init, **timm_kwargs)
        info["weights"] = weights
    model.eval()
    adapter = get_adapter(model)
    if processor and hasattr(adapter, "processor_config"):
        adapter.processor_config = processor
    if tokenizer is not None and hasattr(adapter, "tokenizer"):
        adapter.tokenizer = tokenizer
    check_finite_weights(model, adapter)
    return LoadedModel(model=model, adapter=adapter, spec=spec, checkpoint=checkpoint,
                       info={k: v for k, v in info.items() if v is not None})
