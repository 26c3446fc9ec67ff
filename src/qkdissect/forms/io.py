"""Attention forms to and from flat tensor dictionaries (safetensors) plus a JSON description."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.forms.spec import AttentionForm, QKNorm, RelativeBias, RotaryTable, WindowLayout

__all__ = ["form_from_tensors", "form_to_tensors"]


def form_to_tensors(form: AttentionForm, prefix: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors keyed ``{prefix}.…``, JSON fields) that :func:`form_from_tensors` reads back."""
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {"causal": form.causal, "sliding_window": form.sliding_window}

    def put(name: str, value: Tensor | None) -> None:
        if value is not None:
            tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous().clone()

    if form.rotary is not None:
        r = form.rotary
        put("rotary.cos", r.cos)
        put("rotary.sin", r.sin)
        put("rotary.positions", r.positions)
        meta["rotary"] = {"layout": r.layout, "rotary_dim": r.rotary_dim, "pairs": r.pairs,
                          "variable_length": r.variable_length, "info": r.info}
    if form.qk_norm is not None:
        n = form.qk_norm
        for name in ("q_weight", "q_bias", "k_weight", "k_bias"):
            put(f"qk_norm.{name}", getattr(n, name))
        meta["qk_norm"] = {"kind": n.kind, "eps": n.eps}
    if form.bias is not None:
        put("bias.table", form.bias.table)
        put("bias.index", form.bias.index)
        meta["bias"] = {"info": form.bias.info}
    if form.windows is not None:
        w = form.windows
        put("windows.token_index", w.token_index)
        put("windows.mask", w.mask)
        meta["windows"] = {"grid": list(w.grid), "window": list(w.window), "shift": list(w.shift)}
    put("head_scale", form.head_scale)
    return tensors, meta


def form_from_tensors(tensors: dict[str, Tensor], prefix: str, meta: dict[str, Any]) -> AttentionForm:
    """Inverse of :func:`form_to_tensors`; QKDissectError when a tensor is missing."""

    def get(name: str, required: bool = True) -> Tensor | None:
        key = f"{prefix}.{name}"
        if key not in tensors:
            if required:
                raise QKDissectError(f"the atlas lacks {key}; it is incomplete — re-run `qkdissect dissect`.")
            return None
        return tensors[key]

    rotary = qk_norm = bias = windows = None
    if "rotary" in meta:
        r = meta["rotary"]
        rotary = RotaryTable(cos=get("rotary.cos"), sin=get("rotary.sin"), layout=r["layout"],
                             rotary_dim=int(r["rotary_dim"]), positions=get("rotary.positions"), pairs=r["pairs"],
                             variable_length=bool(r["variable_length"]), info=dict(r.get("info", {})))
    if "qk_norm" in meta:
        n = meta["qk_norm"]
        qk_norm = QKNorm(kind=n["kind"], eps=float(n["eps"]), q_weight=get("qk_norm.q_weight", False),
                         q_bias=get("qk_norm.q_bias", False), k_weight=get("qk_norm.k_weight", False),
                         k_bias=get("qk_norm.k_bias", False))
    if "bias" in meta:
        bias = RelativeBias(table=get("bias.table"), index=get("bias.index").long(), info=dict(meta["bias"].get("info", {})))
    if "windows" in meta:
        w = meta["windows"]
        windows = WindowLayout(grid=tuple(w["grid"]), window=tuple(w["window"]), shift=tuple(w["shift"]),
                               token_index=get("windows.token_index").long(), mask=get("windows.mask", False))
    return AttentionForm(rotary=rotary, qk_norm=qk_norm, bias=bias, windows=windows, causal=bool(meta.get("causal")),
                         sliding_window=meta.get("sliding_window"), head_scale=get("head_scale", False))


def same_form(a: AttentionForm | None, b: AttentionForm | None) -> bool:
    """Structural equality of two forms (tensors compared exactly); for tests and round trips."""
    if a is None or b is None:
        return a is b

    def eq(x: Any, y: Any) -> bool:
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            return isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and bool(
                torch.equal(torch.nan_to_num(x.double(), nan=1e300), torch.nan_to_num(y.double(), nan=1e300)))
        if hasattr(x, "__dataclass_fields__"):
            return type(x) is type(y) and all(eq(getattr(x, f), getattr(y, f)) for f in x.__dataclass_fields__)
        return x == y

    return eq(a, b)
