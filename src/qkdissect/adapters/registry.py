"""Registry of model adapters, looked up by module type."""

from __future__ import annotations

from torch import nn

from qkdissect.adapters.base import ModelAdapter
from qkdissect.errors import QKDissectError

__all__ = ["register_adapter", "get_adapter", "registered_adapters"]

_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``cls`` available to :func:`get_adapter`."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def registered_adapters() -> tuple[type[ModelAdapter], ...]:
    return tuple(_ADAPTERS)


def _refuse_unsupported(model: nn.Module) -> None:
    """Refuse models whose query-key logits are not a position-free bilinear form."""
    from qkdissect.adapters.timm_vit import refuse_rotary

    refuse_rotary(model)
    for module in model.modules():
        name = type(module).__name__.lower()
        if "rotary" in name or "rope" in name:
            raise QKDissectError(
                f"this model contains {type(module).__name__}: rotary position embeddings make "
                "each query-key logit depend on the relative position, so there is no single "
                "bilinear form x̃_iᵀ M x̃_j to decompose; qkdissect refuses rather than produce "
                "wrong modes. Use a model with absolute position embeddings."
            )


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, found by its module types.

    Raises QKDissectError for unsupported families (naming the supported ones) and for
    models with rotary embeddings or QK-norm.
    """
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise QKDissectError(
            f"expected a torch nn.Module (or what qkdissect.load_model returns), got {type(model).__name__}."
        )
    _refuse_unsupported(model)
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    families = ", ".join(sorted(cls.family for cls in _ADAPTERS))
    raise QKDissectError(
        f"no qkdissect adapter for a model of type {type(model).__module__}.{type(model).__name__}. "
        f"Supported families: {families}. Load a supported model (see `qkdissect dissect --help`)."
    )
