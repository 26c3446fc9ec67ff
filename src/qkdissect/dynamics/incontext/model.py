"""A small attention-only transformer for in-context linear regression.

Tokens (von Oswald et al. 2023; "In-Context Linear Regression Demystified"): context tokens
z_j = (x_j, y_j) ∈ R^{N_x + N_y}, j = 1…N, followed by query tokens (x_q, 0) whose y-part is
zeroed. No embedding, no positional encoding, no LayerNorm, no MLP: d_model = N_x + N_y and each
layer adds its multi-head attention output to the residual stream,

    z ← z + Σ_h W_O,h · Σ_j A_h[i, j] · W_V,h z_j,      W_Q, W_K, W_V ∈ R^{H × d_head × d_model},
                                                       W_O ∈ R^{H × d_model × d_head}
    softmax attention:  A_h[i, ·] = softmax_j∈vis(i) ( scale · (W_Q,h z_i)·(W_K,h z_j) )
    linear attention:   A_h[i, j] = [j ∈ vis(i)] · scale · (W_Q,h z_i)·(W_K,h z_j) / N

with scale = 1/√d_head and N the training context length. The prediction for a query is the
y-part of its final residual stream. Visibility (the mask): context token j sees context tokens
1…j (causal, so a 2-layer model cannot leak later samples into earlier queries); a query that
is given k samples sees context tokens 1…k and itself, never other queries — so many queries
with different k can share one sequence without altering the context or each other.

The query-key matrix of head h is M_h = W_Q,hᵀ W_K,h, exactly what qkdissect decomposes; the
adapter :class:`~qkdissect.dynamics.incontext.adapter.ICLTransformerAdapter` (registered when
``qkdissect.dynamics`` is imported) makes ``qkdissect.dissect(model)`` work on this class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from qkdissect.dynamics import checks
from qkdissect.errors import QKDissectError

__all__ = ["ATTENTION_KINDS", "ICLBatch", "icl_batch", "icl_mask", "ICLAttention", "ICLTransformer"]

ATTENTION_KINDS = ("softmax", "linear")


@dataclass(frozen=True)
class ICLBatch:
    """Model input: ``tokens`` ``(B, N + Q, d_model)`` — ``n_context`` context tokens, then Q queries —
    and ``query_k`` ``(Q,)``, the number of context samples each query sees."""

    tokens: torch.Tensor
    n_context: int
    query_k: torch.Tensor

    @property
    def n_queries(self) -> int:
        return int(self.tokens.shape[1]) - self.n_context

    @property
    def mask(self) -> torch.Tensor:
        """The dense visibility ``(N + Q, N + Q)`` (True = may attend), see :func:`icl_mask`."""
        return icl_mask(self.n_context, self.query_k)


def icl_mask(n_context: int, query_k: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Visibility ``(N + Q, N + Q)`` for N context tokens and queries that see ``query_k[m]`` samples."""
    k = _query_k(n_context, query_k)
    n, q = int(n_context), int(k.numel())
    t = n + q
    mask = torch.zeros(t, t, dtype=torch.bool)
    mask[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    mask[n:, :n] = torch.arange(n)[None, :] < k[:, None]
    mask[n + torch.arange(q), n + torch.arange(q)] = True
    return mask


def _query_k(n_context: int, query_k: Sequence[int] | torch.Tensor) -> torch.Tensor:
    k = torch.as_tensor(query_k, dtype=torch.long).reshape(-1)
    if k.numel() and (int(k.min()) < 0 or int(k.max()) > n_context):
        raise QKDissectError(f"query_k: every query sees 0…{n_context} context samples, got {k.tolist()}.")
    return k


def icl_batch(
    context_x: torch.Tensor, context_y: torch.Tensor, query_x: torch.Tensor, query_k: Sequence[int] | torch.Tensor
) -> ICLBatch:
    """Tokens [(x_j, y_j) for the context; (x_q, 0) for the queries] and the queries' context sizes.

    Shapes: context_x ``(B, N, N_x)``, context_y ``(B, N, N_y)``, query_x ``(B, Q, N_x)``, query_k ``(Q,)``.
    """
    b, n, _ = context_x.shape
    if context_y.shape[:2] != (b, n) or query_x.shape[0] != b or query_x.shape[-1] != context_x.shape[-1]:
        raise QKDissectError(
            f"icl_batch: expected context_x (B, N, N_x), context_y (B, N, N_y), query_x (B, Q, N_x), got "
            f"{tuple(context_x.shape)}, {tuple(context_y.shape)}, {tuple(query_x.shape)}."
        )
    k = _query_k(n, query_k)
    if k.numel() != query_x.shape[1]:
        raise QKDissectError(f"query_k: expected one context size per query ({query_x.shape[1]}), got {k.numel()}.")
    ctx = torch.cat([context_x, context_y], dim=-1)
    qry = torch.cat([query_x, torch.zeros(*query_x.shape[:2], context_y.shape[-1], dtype=query_x.dtype)], dim=-1)
    return ICLBatch(tokens=torch.cat([ctx, qry], dim=1), n_context=n, query_k=k)


class ICLAttention(nn.Module):
    """One multi-head attention layer (module docstring); returns the residual update.

    The visibility is structured, so only the context block (N × N, causal) and the query rows
    against the context (Q × N) plus each query's own key are computed — never Q × Q.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int, attention: str, norm_length: int):
        super().__init__()
        if attention not in ATTENTION_KINDS:
            raise QKDissectError(f"attention: expected one of {', '.join(ATTENTION_KINDS)}, got {attention!r}.")
        self.attention, self.norm_length = attention, int(norm_length)
        self.n_heads, self.d_head, self.d_model = n_heads, d_head, d_model
        self.scale = 1.0 / math.sqrt(d_head)
        self.W_q = nn.Parameter(torch.zeros(n_heads, d_head, d_model))
        self.W_k = nn.Parameter(torch.zeros(n_heads, d_head, d_model))
        self.W_v = nn.Parameter(torch.zeros(n_heads, d_head, d_model))
        self.W_o = nn.Parameter(torch.zeros(n_heads, d_model, d_head))
        self.record: list[torch.Tensor] | None = None  # set by the adapter to collect attention weights

    def _normalise(self, logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        if self.attention == "softmax":
            return logits.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        return logits * visible / self.norm_length

    def forward(self, x: torch.Tensor, n_context: int, query_k: torch.Tensor, context_rows: bool = True) -> torch.Tensor:
        """Residual update ``(B, T, d_model)``; with ``context_rows=False`` the context rows are left 0
        (a last layer whose context outputs nobody reads)."""
        n = n_context
        b, t, _ = x.shape
        xc, xq = x[:, :n], x[:, n:]

        def proj(z: torch.Tensor, W: torch.Tensor) -> torch.Tensor:  # (B, T', d) -> (B, H, T', e)
            return torch.einsum("btd,hed->bhte", z, W)

        q, kc, vc = proj(xq, self.W_q), proj(xc, self.W_k), proj(xc, self.W_v)
        k_self, v_self = proj(xq, self.W_k), proj(xq, self.W_v)
        vis_q = torch.arange(n)[None, :] < query_k[:, None]  # (Q, N)
        lq = self.scale * q @ kc.transpose(-1, -2)  # (B, H, Q, N)
        ls = self.scale * (q * k_self).sum(-1, keepdim=True)  # (B, H, Q, 1): each query's own key
        vis = torch.cat([vis_q, torch.ones(vis_q.shape[0], 1, dtype=torch.bool)], dim=1)
        aq = self._normalise(torch.cat([lq, ls], dim=-1), vis)
        out_q = aq[..., :n] @ vc + aq[..., n:] * v_self  # (B, H, Q, e)
        if context_rows or self.record is not None:
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            ac = self._normalise(self.scale * proj(xc, self.W_q) @ kc.transpose(-1, -2), causal)
            out_c = ac @ vc
        else:
            ac, out_c = None, torch.zeros(b, self.n_heads, n, self.d_head, dtype=x.dtype)
        if self.record is not None:
            dense = torch.zeros(b, self.n_heads, t, t, dtype=x.dtype)
            dense[:, :, :n, :n] = ac
            dense[:, :, n:, :n] = aq[..., :n]
            idx = torch.arange(n, t)
            dense[:, :, idx, idx] = aq[..., n]
            self.record.append(dense.detach())
        heads = torch.cat([out_c, out_q], dim=2)  # (B, H, T, e)
        return torch.einsum("bhte,hde->btd", heads, self.W_o)


class ICLTransformer(nn.Module):
    """Attention-only transformer on raw regression tokens (module docstring).

    Args:
        n_x, n_y: input / output dimensions (d_model = n_x + n_y).
        n_layers, n_heads: depth and heads per layer.
        d_head: head width (default d_model, so that one head can hold a full-rank M).
        attention: ``softmax`` or ``linear``.
        context: training context length N (normalises linear attention).
        init_scale: weights start as init_scale · N(0, 1/fan_in) (small: Saxe-like dynamics).
    """

    def __init__(
        self, n_x: int, n_y: int, *, n_layers: int = 1, n_heads: int = 4, d_head: int | None = None,
        attention: str = "softmax", context: int = 40, init_scale: float = 0.1, seed: int = 0,
    ):
        super().__init__()
        self.n_x, self.n_y = checks.count(n_x, "n_x"), checks.count(n_y, "n_y")
        self.d_model = self.n_x + self.n_y
        self.d_head = self.d_model if d_head is None else checks.count(d_head, "d_head")
        self.n_heads = checks.count(n_heads, "heads")
        self.context = checks.count(context, "context")
        self.attention = attention
        self.init_scale = float(init_scale)
        self.layers = nn.ModuleList([
            ICLAttention(self.d_model, self.n_heads, self.d_head, attention, self.context)
            for _ in range(checks.count(n_layers, "layers"))
        ])
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for layer in self.layers:
                for w in (layer.W_q, layer.W_k, layer.W_v):
                    w.copy_(torch.randn(w.shape, generator=g) * init_scale / math.sqrt(self.d_model))
                layer.W_o.copy_(torch.randn(layer.W_o.shape, generator=g) * init_scale / math.sqrt(self.d_head))

    def forward(self, batch: ICLBatch, *, context_rows: bool = True) -> torch.Tensor:
        """Final residual stream ``(B, T, d_model)``. ``context_rows=False`` skips the last layer's
        context rows (not needed for predictions; they are then left at the layer input)."""
        z = batch.tokens
        k = batch.query_k
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            z = z + layer(z, batch.n_context, k, context_rows=context_rows or index < last)
        return z

    def predict(self, batch: ICLBatch) -> torch.Tensor:
        """ŷ for every query: the y-part of its final residual stream, ``(B, Q, N_y)``."""
        return self.forward(batch, context_rows=False)[:, batch.n_context :, self.n_x :]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "attention-only transformer", "n_x": self.n_x, "n_y": self.n_y, "d_model": self.d_model,
            "d_head": self.d_head, "n_heads": self.n_heads, "n_layers": len(self.layers),
            "attention": self.attention, "context": self.context, "init_scale": self.init_scale,
            "n_parameters": sum(p.numel() for p in self.parameters()),
            "tokens": "context (x_j, y_j); queries (x_q, 0); prediction = y-part of the query's output",
        }
