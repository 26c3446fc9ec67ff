"""Model adapters: one per family, found by module type (see ``registry``)."""

from qkdissect.adapters import hf as _hf  # noqa: F401  (registers)
from qkdissect.adapters import hf_swin as _hf_swin  # noqa: F401  (registers)
from qkdissect.adapters import hf_text as _hf_text  # noqa: F401  (registers)
from qkdissect.adapters import hf_vision as _hf_vision  # noqa: F401  (registers)
from qkdissect.adapters import timm_eva as _timm_eva  # noqa: F401  (registers)
from qkdissect.adapters import timm_relpos as _timm_relpos  # noqa: F401  (registers)
from qkdissect.adapters import timm_vit as _timm_vit  # noqa: F401  (registers)
from qkdissect.adapters.base import AttentionLayer, ModelAdapter, Preprocessing
from qkdissect.adapters.loading import (
    LoadedModel,
    builtin_models,
    load_model,
    load_state_dict,
    register_builtin,
    wrap_model,
)
from qkdissect.adapters.registry import get_adapter, register_adapter, registered_adapters

__all__ = [
    "AttentionLayer",
    "LoadedModel",
    "ModelAdapter",
    "Preprocessing",
    "builtin_models",
    "get_adapter",
    "load_model",
    "load_state_dict",
    "register_adapter",
    "register_builtin",
    "registered_adapters",
    "wrap_model",
]
