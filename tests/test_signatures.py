"""Public tensor functions state their shapes in their signatures (jaxtyping), and the annotations are valid:
every one resolves to a jaxtyping type whose named dimensions agree across arguments."""

from __future__ import annotations

import inspect
import typing

import pytest
from jaxtyping import AbstractArray, Bool, Float

import qkdissect.factored as factored
import qkdissect.metrics as metrics
import qkdissect.projection as projection
from qkdissect.atlas import ModeAtlas

FUNCTIONS = [
    factored.factored_svd, factored.fix_signs, factored.trace_over_nuclear,
    metrics.mode_cosines, metrics.weighted_cosine, metrics.symmetric_fraction, metrics.defined_modes,
    metrics.defined_weighted_cosine,
    projection.atlas_input, projection.project, projection.logits_from_modes, projection.attention_from_modes,
    projection.qk_norm_factors, projection.mode_contributions, projection.residual_logits,
    projection.key_bias_logits, projection.logit_variance_shares,
]


def _arrays(hint) -> list:
    """The jaxtyping array types inside ``hint`` (through tuples and Optional)."""
    if isinstance(hint, type) and issubclass(hint, AbstractArray):
        return [hint]
    return [a for arg in typing.get_args(hint) for a in _arrays(arg)]


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_tensor_arguments_carry_their_shapes(function):
    hints = typing.get_type_hints(function, globalns={**function.__globals__, "Float": Float, "Bool": Bool,
                                                       "ModeAtlas": ModeAtlas})
    tensors = [name for name, p in inspect.signature(function).parameters.items()
               if name in hints and "Tensor" in str(hints[name])]
    assert tensors, f"{function.__name__} takes no tensor"
    for name in tensors:
        assert _arrays(hints[name]), f"{function.__name__}({name}) has no shape in its signature"
    assert _arrays(hints["return"]) or "LogitVarianceShares" in str(hints["return"])


def test_shapes_name_the_model_dimensions():
    hints = typing.get_type_hints(factored.factored_svd, globalns={**vars(factored), "Float": Float})
    assert hints["W_q"].dim_str == "*batch d_head d_model"
    U, S, V = typing.get_args(hints["return"])
    assert (U.dim_str, S.dim_str, V.dim_str) == ("*batch d_model r", "*batch r", "*batch d_model r")
