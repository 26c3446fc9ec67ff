"""Exact logits of one layer from head-space vectors and its :class:`AttentionForm` (a leaf).

With a = γ ⊙ P z the head-space vector *before* the per-token division (z = W x̃ + b the raw
projection; P, γ of the QK-norm, identity without one):

    ρ = √(mean((a/γ)²) + eps)  (layer, rms)    ρ = max(‖a‖, eps)  (l2)
    q = a / ρ + β
    logit_ij = s_h · Re Σ_f conj(q_{i,f} z_{i,f}) k_{j,f} z_{j,f} + B_h[i, j] + masks

(z the rotation of each token, see ``qkdissect.forms.rotary``). Masked pairs get −inf (causal,
sliding window) or the model's own additive value (Swin's −100 shift mask).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError
from qkdissect.forms.rotary import rotations, to_complex
from qkdissect.forms.spec import AttentionForm, QKNorm

__all__ = ["additive_terms", "fold_qk_norm", "head_logits", "layer_logits", "norm_factors", "normalise",
           "valid_pairs"]


def norm_factors(a: Tensor, norm: QKNorm, side: str) -> Tensor:
    """Per-token factor ρ of the QK-norm: a (..., d_head) -> (...)."""
    gamma = norm.q_weight if side == "q" else norm.k_weight
    y = a if gamma is None else a / gamma.to(a)
    if norm.kind == "l2":
        return torch.linalg.vector_norm(y, dim=-1).clamp_min(norm.eps)
    return torch.sqrt((y * y).mean(dim=-1) + norm.eps)


def normalise(a: Tensor, norm: QKNorm | None, side: str) -> tuple[Tensor, Tensor | None]:
    """(a / ρ + β, ρ); (a, None) without a QK-norm. ``side`` is "q" or "k"."""
    if norm is None:
        return a, None
    rho = norm_factors(a, norm, side)
    beta = norm.q_bias if side == "q" else norm.k_bias
    out = a / rho[..., None]
    if beta is not None:
        out = out + beta.to(out)
    return out, rho


def head_logits(q: Tensor, k: Tensor, form: AttentionForm, scale: float) -> Tensor:
    """s_h · q̃_i·k̃_j. q, k: (B, H, N, d_head) normalised, unrotated -> (B, H, N, N)."""
    if form.rotary is not None:
        z = rotations(form.rotary, q.shape[-2], q.shape[-1], dtype=torch.float64 if q.dtype == torch.float64
                      else torch.float32).to(q.device)  # (G, N, P)
        qc = to_complex(q, form.rotary.layout, form.rotary.rotary_dim) * z
        kc = to_complex(k, form.rotary.layout, form.rotary.rotary_dim) * z
        q = torch.cat([qc.real, qc.imag], dim=-1)
        k = torch.cat([kc.real, kc.imag], dim=-1)
    logits = q @ k.transpose(-1, -2)
    if form.head_scale is not None:
        return logits * form.head_scale.to(logits)[None, :, None, None]
    return logits * scale


def additive_terms(form: AttentionForm | None, batch: int, n_tokens: int, dtype: torch.dtype,
                   device: torch.device | str = "cpu", masks: bool = True) -> Tensor | None:
    """Relative bias + window mask + causal/sliding mask of the form, broadcastable to
    (batch, H, N, N); None when the form adds nothing. For window layers ``batch`` counts
    windows (B · n_windows) and must hold whole images. ``masks=False``: the bias alone."""
    if form is None:
        return None
    if not masks:
        form = AttentionForm(bias=form.bias)
    total: Tensor | None = None

    def add(term: Tensor) -> None:
        nonlocal total
        total = term if total is None else total + term

    if form.bias is not None:
        if form.bias.index.shape[0] != n_tokens:
            raise QKDissectError(f"this layer's relative position bias covers {form.bias.index.shape[0]} tokens but "
                                 f"the input has {n_tokens}; use inputs of the atlas' size.")
        add(form.bias.dense().to(device=device, dtype=dtype)[None])
    if form.windows is not None and form.windows.mask is not None:
        mask = form.windows.mask
        n_windows = mask.shape[0]
        if batch % n_windows or mask.shape[-1] != n_tokens:
            raise QKDissectError(f"this layer attends in {n_windows} windows of {mask.shape[-1]} tokens; the input "
                                 f"({batch} rows of {n_tokens} tokens) does not hold whole images of the atlas' size.")
        add(mask.to(device=device, dtype=dtype)[torch.arange(batch) % n_windows][:, None])
    if form.causal or form.sliding_window is not None:
        query = torch.arange(n_tokens, device=device)[:, None]
        key = torch.arange(n_tokens, device=device)[None, :]
        blocked = torch.zeros(n_tokens, n_tokens, dtype=torch.bool, device=device)
        if form.causal:
            blocked |= key > query
        if form.sliding_window is not None:
            blocked |= (query - key) >= form.sliding_window
        add(torch.zeros(n_tokens, n_tokens, dtype=dtype, device=device).masked_fill(blocked, float("-inf"))[None, None])
    return total


def fold_qk_norm(W: Tensor, b: Tensor | None, norm: QKNorm | None, side: str) -> tuple[Tensor, Tensor | None]:
    """The linear part of the QK-norm folded into the projection: W' = D P W, b' = D P b.

    W: (H, d_head, d_model); b: (H, d_head) or None. P centres the head coordinates (LayerNorm),
    D = diag(γ). What is left of the norm is the per-token 1/ρ and β (see :func:`normalise`).
    """
    if norm is None:
        return W, b
    gamma = norm.q_weight if side == "q" else norm.k_weight
    if gamma is not None and bool((gamma == 0).any()):
        raise QKDissectError("this layer's QK-norm has gains that are exactly zero: ρ (which uses every head "
                             "coordinate) cannot be recovered from the folded projection. Not supported.")
    if norm.kind == "layer":
        W = W - W.mean(dim=-2, keepdim=True)
        b = None if b is None else b - b.mean(dim=-1, keepdim=True)
    if gamma is not None:
        W = W * gamma.to(W)[:, None]
        b = None if b is None else b * gamma.to(b)
    return W, b


def valid_pairs(form: AttentionForm | None, batch: int, n_tokens: int, device: torch.device | str = "cpu"
                ) -> Tensor | None:
    """(batch or 1, N, N) bool: pairs that attend (causal, sliding window, Swin's shift mask — where
    the model adds a large negative value), None when every pair attends."""
    if form is None:
        return None
    terms = additive_terms(AttentionForm(windows=form.windows, causal=form.causal, sliding_window=form.sliding_window),
                           batch, n_tokens, torch.float64, device)
    if terms is None:
        return None
    return (terms > -50.0).reshape(-1, n_tokens, n_tokens)


def layer_logits(layer: Any, x: Tensor) -> Tensor:
    """Logits of every head straight from a layer's parameters (``AttentionLayer``; no atlas):
    q = N_q(W_q x̃ + b_q), k = N_k(W_k x̃ + b_k), rotated, scaled, plus bias and masks. x: (B, N, d_model)
    -> (B, H, N, N). The QK-norm here is the model's own formula γ⊙(Pz)/ρ + β on the raw projection."""
    layer = layer.expanded()
    q = torch.einsum("bnd,hed->bhne", x, layer.W_q.to(x))
    k = torch.einsum("bnd,hed->bhne", x, layer.W_k.to(x))
    if layer.b_q is not None:
        q = q + layer.b_q.to(x)[None, :, None, :]
    if layer.b_k is not None:
        k = k + layer.b_k.to(x)[None, :, None, :]
    form = layer.form or AttentionForm()
    norm = form.qk_norm
    if norm is not None:
        q = _model_norm(q, norm, "q")
        k = _model_norm(k, norm, "k")
    logits = head_logits(q, k, form, float(layer.scale))
    extra = additive_terms(form, x.shape[0], x.shape[1], logits.dtype, logits.device)
    return logits if extra is None else logits + extra


def _model_norm(z: Tensor, norm: QKNorm, side: str) -> Tensor:
    gamma = norm.q_weight if side == "q" else norm.k_weight
    beta = norm.q_bias if side == "q" else norm.k_bias
    if norm.kind == "l2":
        return z / torch.linalg.vector_norm(z, dim=-1, keepdim=True).clamp_min(norm.eps)
    if norm.kind == "layer":
        z = z - z.mean(dim=-1, keepdim=True)
    out = z / torch.sqrt((z * z).mean(dim=-1, keepdim=True) + norm.eps)
    if gamma is not None:
        out = out * gamma.to(out)
    return out if beta is None else out + beta.to(out)
