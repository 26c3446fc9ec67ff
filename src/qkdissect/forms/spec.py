"""What an attention layer does to q and k besides the bilinear form: the *form* of its logits.

For head h, query token i, key token j (x̃ the attention input, W, b the projections):

    a_i = W_q x̃_i + b_q,   c_j = W_k x̃_j + b_k                       (head space, d_head)
    q_i = N_q(a_i),        k_j = N_k(c_j)                            (QK-norm, identity if none)
    q̃_i = R(θ_i) q_i,      k̃_j = R(θ_j) k_j                          (rotary, identity if none)
    logit_ij = s_h · q̃_i·k̃_j + B_h[i, j] + mask_ij                    (scale, relative bias, masks)

An :class:`AttentionForm` records N, R, B, the masks and per-head scales exactly as the model
applies them, for the model's own token layout. Families describe their form through their
adapter; this module only holds the data (a leaf: torch and errors only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qkdissect.errors import QKDissectError

__all__ = ["AttentionForm", "QKNorm", "RelativeBias", "RotaryTable", "WindowLayout", "window_token_index"]

LAYOUTS = ("interleaved", "half")
NORM_KINDS = ("layer", "rms", "l2")
PAIR_SETS = ("all", "causal")


@dataclass(frozen=True)
class RotaryTable:
    """Rotary position embedding as the model applies it to q and k (after any QK-norm).

    ``cos``, ``sin``: (G, T, P), G = 1 (one rotation for all heads) or n_heads (per-head
    frequencies, e.g. timm's mixed RoPE); row t is token t of the model's own token sequence;
    P = rotary_dim / 2 rotary pairs. The values are the ones the model computes (any attention
    scaling, e.g. YaRN's, stays folded in), so pair f of token t is multiplied by
    [[cos, −sin], [sin, cos]] acting on head coordinates (a, b) = (2f, 2f+1) for the
    ``interleaved`` layout and (f, f + P) for ``half`` ("rotate_half"). Only the first
    ``rotary_dim`` coordinates of a head rotate (partial rotary); tokens the model does not rotate
    (CLS, registers) have cos = 1, sin = 0 (θ = 0).

    ``positions`` (T, A): each token's position in grid units (patch row, column; or token
    index), NaN for tokens without one. ``pairs``: which (query, key) pairs attend — "all" or
    "causal" (key ≤ query) — the offset distribution of M̄. ``variable_length``: text, where a
    sequence of N ≤ T tokens uses rows 0..N−1. ``info``: JSON-ready description (module type,
    frequencies' origin, coordinate normalisation).
    """

    cos: Tensor
    sin: Tensor
    layout: str
    rotary_dim: int
    positions: Tensor
    pairs: str = "all"
    variable_length: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise QKDissectError(f"rotary layout must be one of {LAYOUTS}, got {self.layout!r}.")
        if self.pairs not in PAIR_SETS:
            raise QKDissectError(f"rotary pair set must be one of {PAIR_SETS}, got {self.pairs!r}.")
        if self.cos.shape != self.sin.shape or self.cos.dim() != 3 or 2 * self.cos.shape[-1] != self.rotary_dim:
            raise QKDissectError(f"rotary tables must be (groups, tokens, rotary_dim/2); got cos {tuple(self.cos.shape)}, "
                                 f"sin {tuple(self.sin.shape)}, rotary_dim {self.rotary_dim}.")

    @property
    def n_tokens(self) -> int:
        return self.cos.shape[1]

    @property
    def n_pairs(self) -> int:
        return self.cos.shape[2]

    @property
    def rotated(self) -> Tensor:
        """(T,) bool: tokens with a position (the others sit at θ = 0)."""
        return ~torch.isnan(self.positions).any(dim=-1)

    def rows(self, n_tokens: int) -> tuple[Tensor, Tensor]:
        """cos, sin for a sequence of ``n_tokens`` tokens, (G, N, P)."""
        if n_tokens == self.n_tokens or (self.variable_length and n_tokens <= self.n_tokens):
            return self.cos[:, :n_tokens], self.sin[:, :n_tokens]
        raise QKDissectError(
            f"this layer's rotary angles were recorded for {self.n_tokens} tokens (the model's own input size) "
            f"but the input has {n_tokens}; capture x̃ from images of the atlas' input size"
            + (" or shorter texts." if self.variable_length else "."))


@dataclass(frozen=True)
class QKNorm:
    """Per-head normalisation of q and k: N(z) = γ ⊙ P z / ρ(z) + β over the d_head coordinates.

    kind "layer": P = I − 11ᵀ/d, ρ = √(mean((Pz)²) + eps); "rms": P = I, ρ = √(mean(z²) + eps);
    "l2" (cosine attention): P = I, ρ = max(‖z‖, eps), no γ, β. Weights/biases: (d_head,), shared
    by the heads, or None.
    """

    kind: str
    eps: float
    q_weight: Tensor | None = None
    q_bias: Tensor | None = None
    k_weight: Tensor | None = None
    k_bias: Tensor | None = None

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise QKDissectError(f"QK-norm kind must be one of {NORM_KINDS}, got {self.kind!r}.")


@dataclass(frozen=True)
class RelativeBias:
    """Learned relative position bias added to the logits: B[h, i, j] = table[index[i, j], h].

    table (R, H); index (T, T) long, T the tokens of one attention window (the whole sequence for
    BEiT, one window for Swin).
    """

    table: Tensor
    index: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def dense(self) -> Tensor:
        """(H, T, T)."""
        T = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(T, T, -1).permute(2, 0, 1)


@dataclass(frozen=True)
class WindowLayout:
    """Window attention (Swin): the grid (rows, cols) is cyclically shifted by −shift, padded to
    multiples of ``window`` and cut into windows; attention runs inside each window with the
    model's additive ``mask`` (n_windows, T_w, T_w) or None (unshifted).

    ``token_index`` (n_windows, T_w): the row-major grid index of every window token, −1 for
    padding. The captured attention input of such a layer is (B·n_windows, T_w, d_model).
    """

    grid: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]
    token_index: Tensor
    mask: Tensor | None = None

    @property
    def n_windows(self) -> int:
        return self.token_index.shape[0]


def window_token_index(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> Tensor:
    """(n_windows, wh·ww) grid indices of each window's tokens (−1 = padding), in the order Swin's
    roll(−shift) → pad bottom/right → window_partition produces them."""
    rows, cols = grid
    wh, ww = window
    index = torch.arange(rows * cols).reshape(rows, cols)
    if any(shift):
        index = torch.roll(index, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    pad_h, pad_w = (-rows) % wh, (-cols) % ww
    index = torch.nn.functional.pad(index, (0, pad_w, 0, pad_h), value=-1)
    hp, wp = index.shape
    return index.reshape(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)


@dataclass(frozen=True)
class AttentionForm:
    """Everything besides W_q, W_k, b_q, b_k that decides one layer's logits (see module docstring).

    ``head_scale`` (H,): per-head logit scale replacing the layer's scalar scale (Swin-V2's learned
    temperature of cosine attention). ``causal``: keys after the query are masked;
    ``sliding_window`` w: additionally keys with query − key ≥ w are masked.
    """

    rotary: RotaryTable | None = None
    qk_norm: QKNorm | None = None
    bias: RelativeBias | None = None
    windows: WindowLayout | None = None
    causal: bool = False
    sliding_window: int | None = None
    head_scale: Tensor | None = None

    @property
    def is_plain(self) -> bool:
        return self == AttentionForm()

    @property
    def needs_head_space(self) -> bool:
        """True when the logits are not x̃_iᵀ M x̃_j + key terms (rotation or per-token norm)."""
        return self.rotary is not None or self.qk_norm is not None

    @property
    def kind(self) -> str:
        parts = [name for name, on in (("rope", self.rotary is not None),
                                       ("qk-" + (self.qk_norm.kind if self.qk_norm else ""), self.qk_norm is not None),
                                       ("relative-bias", self.bias is not None),
                                       ("windows", self.windows is not None),
                                       ("causal", self.causal)) if on]
        return "+".join(parts) if parts else "plain"

    def with_heads(self, index: Tensor) -> "AttentionForm":
        """The form for heads ``index`` (per-head tables and scales are selected)."""
        rotary = self.rotary
        if rotary is not None and rotary.cos.shape[0] > 1:
            rotary = RotaryTable(rotary.cos[index], rotary.sin[index], rotary.layout, rotary.rotary_dim,
                                 rotary.positions, rotary.pairs, rotary.variable_length, rotary.info)
        bias = None if self.bias is None else RelativeBias(self.bias.table[:, index], self.bias.index, self.bias.info)
        return AttentionForm(rotary=rotary, qk_norm=self.qk_norm, bias=bias, windows=self.windows, causal=self.causal,
                             sliding_window=self.sliding_window,
                             head_scale=None if self.head_scale is None else self.head_scale[index])

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: what the layer does and what the atlas records exactly."""
        out: dict[str, Any] = {"kind": self.kind, "causal": self.causal}
        exact = ["W_q, W_k, b_q, b_k"]
        if self.sliding_window is not None:
            out["sliding_window"] = self.sliding_window
        if self.rotary is not None:
            r = self.rotary
            out["rotary"] = {"layout": r.layout, "rotary_dim": r.rotary_dim, "pairs": r.pairs, "n_tokens": r.n_tokens,
                             "per_head": r.cos.shape[0] > 1, "unrotated_tokens": int((~r.rotated).sum()),
                             "variable_length": r.variable_length, **r.info}
            exact.append("the model's own cos/sin of every token (unrotated tokens at θ = 0)")
        if self.qk_norm is not None:
            out["qk_norm"] = {"kind": self.qk_norm.kind, "eps": self.qk_norm.eps}
            exact.append(f"QK-norm ({self.qk_norm.kind}) gains/biases; per-token factors ρ recomputed from x̃")
        if self.bias is not None:
            out["relative_bias"] = {"table_rows": self.bias.table.shape[0], "window_tokens": self.bias.index.shape[0],
                                    **self.bias.info}
            exact.append("relative position bias table and index")
        if self.windows is not None:
            w = self.windows
            out["windows"] = {"grid": list(w.grid), "window": list(w.window), "shift": list(w.shift),
                              "n_windows": w.n_windows, "masked": w.mask is not None}
            exact.append("window partition and the model's shift mask")
        if self.head_scale is not None:
            out["head_scale"] = [float(v) for v in self.head_scale]
            exact.append("per-head logit scale")
        if self.causal:
            exact.append("causal mask")
        out["exact"] = exact
        return out
