"""qkdissect adapter for :class:`~qkdissect.dynamics.incontext.model.ICLTransformer` (registered on import).

Layout: ``layers[l].W_q`` / ``W_k`` are already per head, (n_heads, d_head, d_model), no biases,
no LayerNorm: x̃ is the layer's input (the residual stream), logit = scale · (W_q x̃_i)·(W_k x̃_j)
with scale = 1/√d_head. Modality "text"-like: a token sequence, no patch grid, no prefix tokens.

``forward(inputs)`` takes an :class:`~qkdissect.dynamics.incontext.model.ICLBatch`; its ``mask`` property is
the dense visibility. ``attention_probabilities`` returns the model's own weights A per layer,
(B, n_heads, T, T): softmax probabilities for softmax attention; for *linear* attention they are
the masked scaled scores divided by the context length (no softmax), so compare them with
``mask · logits_from_modes / N`` rather than with ``attention_from_modes``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

from torch import Tensor, nn

from qkdissect.adapters.base import AttentionLayer, ModelAdapter
from qkdissect.adapters.registry import register_adapter
from qkdissect.dynamics.incontext.model import ICLBatch, ICLTransformer
from qkdissect.errors import QKDissectError

__all__ = ["ICLTransformerAdapter"]


@register_adapter
class ICLTransformerAdapter(ModelAdapter):
    family = "icl-transformer"
    modality = "text"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ICLTransformer)

    def attention_modules(self) -> list[nn.Module]:
        return list(self.model.layers)

    def attention_layers(self) -> list[AttentionLayer]:
        return [
            AttentionLayer(W_q=layer.W_q.detach().clone(), W_k=layer.W_k.detach().clone(), b_q=None, b_k=None,
                           scale=float(layer.scale))
            for layer in self.model.layers
        ]

    def forward(self, inputs: Any) -> Any:
        if isinstance(inputs, ICLBatch):
            return self.model(inputs)
        raise QKDissectError(
            f"an icl-transformer reads an ICLBatch (built by qkdissect.dynamics.incontext.model.icl_batch), got "
            f"{type(inputs).__name__}."
        )

    @contextlib.contextmanager
    def eager_attention(self) -> Iterator[list[list[Tensor]]]:
        layers = list(self.model.layers)
        store: list[list[Tensor]] = [[]]
        try:
            for layer in layers:
                layer.record = store[0]
            yield store
        finally:
            for layer in layers:
                layer.record = None

    def describe(self, layers: Sequence[AttentionLayer] | None = None) -> dict[str, Any]:
        info = super().describe(layers)
        model = self.model
        info.update({
            "attention": model.attention, "n_x": model.n_x, "n_y": model.n_y, "context": model.context,
            "token_layout": "d_model = n_x + n_y: coordinates 0..n_x-1 hold x, n_x.. hold y (zero for queries)",
            "attention_weights": ("softmax probabilities" if model.attention == "softmax"
                                  else "linear: mask * scale * q.k / context (no softmax)"),
        })
        return info
