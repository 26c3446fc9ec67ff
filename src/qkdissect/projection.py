"""Hooks that capture what each head sees, and query/key projections onto the modes.

For layer l with atlas modes (U, S, V, key_bias) and captured attention inputs x̃ (B, N, d_model):

    q[b, h, p, k] = u_{h,k} · x̃_{b,p}          (query map of mode k)
    k[b, h, p, k] = v_{h,k} · x̃_{b,p}          (key map of mode k)
    logit[b, h, p, p'] = scale · ( Σ_k σ_{h,k} q[b,h,p,k] k[b,h,p',k] + key_bias_h · x̃_{b,p'} )

which equals the model's own logit up to terms constant in p' (they cancel in the softmax).
x̃ is captured with a forward pre-hook on the attention module (works with fused / SDPA
attention, which returns no probabilities). For an atlas with folded LayerNorm the modes
act on n = (x̃ − β) / γ, which :func:`atlas_input` computes.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError

__all__ = [
    "atlas_input",
    "attention_from_modes",
    "capture_attention_inputs",
    "logits_from_modes",
    "project",
]


class _StopForward(Exception):
    """Raised inside the last needed hook to skip the rest of the forward pass."""


def capture_attention_inputs(
    model: Any, inputs: Any, layers: Iterable[int] | None = None, *, stop_early: bool = True
) -> dict[int, Tensor]:
    """Run ``model`` on ``inputs`` and return {layer: x̃ (B, N, d_model)} for the requested layers.

    ``stop_early`` aborts the forward pass once the deepest requested layer's input is captured.
    """
    loaded: LoadedModel = wrap_model(model)
    modules = loaded.adapter.attention_modules()
    wanted = sorted(set(range(len(modules)) if layers is None else layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= len(modules):
        raise QKDissectError(f"layers must be within 0..{len(modules) - 1}, got {wanted}.")
    captured: dict[int, Tensor] = {}
    last = wanted[-1]

    def make_hook(index: int):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            captured[index] = x.detach()
            if stop_early and index == last:
                raise _StopForward
        return hook

    handles = [modules[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in wanted]
    try:
        with torch.no_grad():
            loaded.adapter.forward(inputs)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in wanted if i not in captured]
    if missing:
        raise QKDissectError(f"the forward pass did not reach attention layers {missing}.")
    return captured


def atlas_input(atlas, layer: int, x: Tensor) -> Tensor:
    """The vector the atlas modes act on: x̃ itself, or n = (x̃ − β)/γ for a folded atlas."""
    x = x.to(atlas.layers[layer].U.dtype)
    if not atlas.meta.get("ln_folded"):
        return x
    modes = atlas.layers[layer]
    if modes.ln_bias is not None:
        x = x - modes.ln_bias.to(x.device)
    if modes.ln_weight is not None:
        if bool((modes.ln_weight == 0).any()):
            raise QKDissectError(f"layer {layer}'s LayerNorm has zero gains: x̃ cannot be mapped back to n; "
                                 "use an unfolded atlas for projections.")
        x = x / modes.ln_weight.to(x.device)
    return x


def project(atlas, layer: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """Query and key maps of every mode of every head of ``layer``.

    x: captured x̃ (B, N, d_model) -> (q, k), each (B, heads, N, r): q = x̃·u_k, k = x̃·v_k.
    """
    modes = atlas.layers[layer]
    x = atlas_input(atlas, layer, x)
    U, V = modes.U.to(x.device), modes.V.to(x.device)
    return torch.einsum("bnd,hdr->bhnr", x, U), torch.einsum("bnd,hdr->bhnr", x, V)


def logits_from_modes(atlas, layer: int, x: Tensor) -> Tensor:
    """scale·(x̃_pᵀ U diag(S) Vᵀ x̃_p' + key_bias·x̃_p'), (B, heads, N, N) — the model's logits up
    to per-query constants."""
    modes = atlas.layers[layer]
    q, k = project(atlas, layer, x)
    S = modes.S.to(q.device)
    bilinear = torch.einsum("bhpr,hr,bhqr->bhpq", q, S, k)
    salience = torch.einsum("bqd,hd->bhq", atlas_input(atlas, layer, x), modes.key_bias.to(q.device))
    return atlas.scale * (bilinear + salience[:, :, None, :])


def attention_from_modes(atlas, layer: int, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """softmax over keys of :func:`logits_from_modes`; ``key_mask`` (B, N) bool, False = masked key."""
    logits = logits_from_modes(atlas, layer, x)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :].to(logits.device), float("-inf"))
    return logits.softmax(dim=-1)
