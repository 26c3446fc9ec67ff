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


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, found by its module types.

    Raises QKDissectError for unsupported families (naming the supported ones); an adapter
    refuses, with the reason, the variants of its family whose attention form it cannot rebuild.
    The registry only dispatches: it knows no family.
    """
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise QKDissectError(
            f"expected a torch nn.Module (or what qkdissect.load_model returns), got {type(model).__name__}."
        )
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    families = ", ".join(sorted(cls.family for cls in _ADAPTERS))
    raise QKDissectError(
        f"no qkdissect adapter for a model of type {type(model).__module__}.{type(model).__name__}. "
        f"Supported families: {families}. Load a supported model (see `qkdissect dissect --help`)."
    )
