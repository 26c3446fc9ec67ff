"""Attention forms beyond the plain bilinear logit: rotary embeddings, QK-norm and cosine attention,
relative position bias, windows, causal masks — their description (``spec``), the rotary maths
(``rotary``) and exact logits (``logits``). A leaf package: torch, errors and factored only."""

from qkdissect.forms.spec import AttentionForm, QKNorm, RelativeBias, RotaryTable, WindowLayout, window_token_index

__all__ = ["AttentionForm", "QKNorm", "RelativeBias", "RotaryTable", "WindowLayout", "window_token_index"]
