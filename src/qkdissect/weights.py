"""Only real weights: a loaded model is used only when every tensor qkdissect reads was loaded and is finite.

* :func:`check_loading_info` turns a loader's report (transformers' ``output_loading_info=True``: missing,
  unexpected and mis-shaped keys) into one QKDissectError naming the tensors, instead of a warning and random
  weights. Missing parameters of modules that come after the encoder (pooler, classifier / task heads) are
  allowed: no qkdissect analysis reads them. Unexpected keys are an error when they name attention (query, key,
  value) or normalisation tensors of the model's own kind (the same name up to layer numbers, e.g. a 13th layer
  ``encoder.layer.12.attention.self.query.weight``): the checkpoint then belongs to another depth or width.
  Tensors of other parts (a CLIP text tower beside the vision tower, task heads) are ignored.
* :func:`check_finite_weights` refuses NaN / Inf in W_q, W_k, their biases and the LayerNorm feeding attention,
  naming layer and head, and in any other parameter, naming it.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from qkdissect.errors import QKDissectError

__all__ = ["UNREAD_MODULES", "check_finite_weights", "check_loading_info"]

UNREAD_MODULES = ("pooler", "classifier", "head", "heads", "lm_head", "cls", "fc_norm", "pre_logits", "score")
_ATTENTION_OR_NORM = re.compile(r"(^|[._])(q|k|v|query|key|value|qkv|in_proj|q_proj|k_proj|v_proj|attn|attention"
                                r"|self_attn|norm\w*|ln\w*|layernorm\w*|layer_norm\w*|LayerNorm)([._]|$)", re.I)


def _listing(names: Iterable[str], limit: int = 6) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _unread(name: str) -> bool:
    return any(part in UNREAD_MODULES for part in name.split("."))


def _pattern(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def check_loading_info(info: dict[str, Any] | None, source: str, model: nn.Module | None = None) -> None:
    """Raise one QKDissectError when a checkpoint did not provide every tensor qkdissect reads.

    ``info``: ``{"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}`` as returned by
    transformers' ``from_pretrained(..., output_loading_info=True)``; ``source``: the checkpoint, for the message;
    ``model``: the loaded model (its parameter names tell its own unexpected tensors from other parts').
    """
    if not info:
        return
    missing = [k for k in info.get("missing_keys", ()) if not _unread(k)]
    own = {_pattern(name) for name in model.state_dict()} if model is not None else None
    unexpected = [k for k in info.get("unexpected_keys", ()) if _ATTENTION_OR_NORM.search(k) and not _unread(k)
                  and (own is None or _pattern(k) in own)]
    mismatched = [k if isinstance(k, str) else str(k[0]) for k in info.get("mismatched_keys", ())]
    errors = [str(e) for e in info.get("error_msgs", ()) if e]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing from the checkpoint (they would be random): "
                     f"{_listing(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} tensor(s) of the wrong shape: {_listing(mismatched)}")
    if unexpected:
        parts.append(f"{len(unexpected)} attention/normalisation tensor(s) the model does not have: "
                     f"{_listing(unexpected)}")
    if errors:
        parts.append("loader errors: " + "; ".join(e[:200] for e in errors[:3]))
    if parts:
        raise QKDissectError(f"the weights in {source} do not fit the model: {'; '.join(parts)}. qkdissect "
                             "computes only on loaded weights: use the checkpoint that belongs to this "
                             "architecture and configuration.")


def _bad_heads(tensor: torch.Tensor) -> list[int]:
    """Indices along axis 0 (heads) whose slice holds a NaN or Inf."""
    finite = torch.isfinite(tensor.detach()).reshape(tensor.shape[0], -1).all(dim=-1)
    return [int(h) for h in torch.nonzero(~finite).flatten()]


def check_finite_weights(model: nn.Module, adapter: Any) -> None:
    """QKDissectError naming layer and head when W_q, W_k, b_q, b_k or the LayerNorm (γ, β) feeding attention
    hold NaN or Inf, and naming the parameter for any other non-finite parameter (buffers are left alone: masks
    hold −inf on purpose)."""
    advice = ("the checkpoint is corrupt or its training diverged; qkdissect computes only on finite weights. "
              "Use another checkpoint.")
    for index, layer in enumerate(adapter.attention_layers()):
        for name, what in (("W_q", "query weight W_q"), ("b_q", "query bias b_q"), ("W_k", "key weight W_k"),
                           ("b_k", "key bias b_k")):
            tensor = getattr(layer, name)
            if tensor is None:
                continue
            bad = _bad_heads(tensor)
            if bad:
                kind = "key head" if name in ("W_k", "b_k") and layer.kv_head_of is not None else "head"
                raise QKDissectError(f"layer {index}, {kind}{'s' if len(bad) > 1 else ''} "
                                     f"{', '.join(map(str, bad))}: the {what} holds NaN or Inf values; {advice}")
        for name, what in (("ln_weight", "weight γ"), ("ln_bias", "bias β")):
            tensor = getattr(layer, name)
            if tensor is not None and not bool(torch.isfinite(tensor.detach()).all()):
                raise QKDissectError(f"layer {index}, all heads: the LayerNorm {what} feeding attention holds NaN or "
                                     f"Inf values; {advice}")
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            raise QKDissectError(f"parameter {name} holds NaN or Inf values; {advice}")
