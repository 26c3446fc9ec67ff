"""Hooks that capture what each head sees, and query/key projections onto the modes.

For layer l with atlas modes (U, S, V, key_bias) and captured attention inputs x̃ (B, N, d_model):

    q[b, h, p, k] = u_{h,k} · x̃_{b,p}          (query map of mode k)
    k[b, h, p, k] = v_{h,k} · x̃_{b,p}          (key map of mode k)
    logit[b, h, p, p'] = scale · ( Σ_k σ_{h,k} q[b,h,p,k] k[b,h,p',k] + key_bias_h · x̃_{b,p'} )

which equals the model's own logit up to terms constant in p' (they cancel in the softmax).
The contribution of mode k of head h to that logit is ``scale · σ_{h,k} q[b,h,p,k] k[b,h,p',k]``
(:func:`mode_contributions`); the key-bias term is ``scale · key_bias_h · x̃_{b,p'}``
(:func:`key_bias_logits`). Image maps drop the prefix tokens (CLS, distillation, registers: their
number comes from the adapter) and reshape the rest to the patch grid (:func:`split_tokens`).
x̃ is captured with a forward pre-hook on the attention module (works with fused / SDPA
attention, which returns no probabilities). For an atlas with folded LayerNorm the modes
act on n = (x̃ − β) / γ, which :func:`atlas_input` computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

from qkdissect.adapters.loading import LoadedModel, wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.forms.logits import additive_terms, norm_factors, normalise
from qkdissect.forms.logits import valid_pairs as form_valid_pairs
from qkdissect.forms.rotary import rotations, to_complex
from qkdissect.positional import exact_layer_logits, head_vectors

if TYPE_CHECKING:
    from jaxtyping import Bool, Float

    from qkdissect.atlas import ModeAtlas

__all__ = [
    "LogitVarianceShares",
    "StopForward",
    "atlas_input",
    "attention_from_modes",
    "capture_attention_inputs",
    "key_bias_logits",
    "logit_variance_shares",
    "logits_from_modes",
    "mode_contributions",
    "project",
    "qk_norm_factors",
    "residual_logits",
    "split_tokens",
    "valid_pairs",
    "windows_to_grid",
]


class StopForward(Exception):
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
                raise StopForward
        return hook

    handles = [modules[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in wanted]
    try:
        with torch.no_grad():
            loaded.adapter.forward(inputs)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in wanted if i not in captured]
    if missing:
        raise QKDissectError(f"the forward pass did not reach attention layers {missing}.")
    return captured


def atlas_input(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"]) -> Float[Tensor, "batch tokens d_model"]:
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


def project(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"]
            ) -> tuple[Float[Tensor, "batch heads tokens r"], Float[Tensor, "batch heads tokens r"]]:
    """Query and key maps of every mode of every head of ``layer``.

    x: captured x̃ (B, N, d_model) -> (q, k), each (B, heads, N, r): q = x̃·u_k, k = x̃·v_k. For a layer
    with a QK-norm the maps are what the head uses, q = x̃·u_k / ρ_q and k = x̃·v_k / ρ_k (the
    per-token norm factors of :func:`qk_norm_factors`); rotary layers keep the content maps (the
    rotation acts on pairs of tokens, see :func:`mode_contributions`).
    """
    modes = atlas.layers[layer]
    x = atlas_input(atlas, layer, x)
    U, V = modes.U.to(x.device), modes.V.to(x.device)
    q, k = torch.einsum("bnd,hdr->bhnr", x, U), torch.einsum("bnd,hdr->bhnr", x, V)
    norm = None if modes.form is None else modes.form.qk_norm
    if norm is not None:
        a, c = head_vectors(modes, x)
        q = q / norm_factors(a, norm, "q")[..., None]
        k = k / norm_factors(c, norm, "k")[..., None]
    return q, k


def logits_from_modes(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"]) -> Float[Tensor, "batch heads tokens tokens"]:
    """The model's logits of every head of ``layer`` rebuilt from the atlas, (B, heads, N, N).

    Plain layers: scale·(x̃_pᵀ U diag(S) Vᵀ x̃_p' + key_bias·x̃_p'), the model's logits up to per-query
    constants. Layers with another attention form add what the atlas records — relative position
    bias, window shift masks (−100 as the model adds them), causal masks (−inf) — and layers with
    rotary embeddings or QK-norm are rebuilt exactly in head space from the mode projections:
    q = G_qᵀ(Uᵀx̃) + b_q, divided by the per-token norm factor ρ and shifted by β, rotated by the
    token's recorded angles (see ``qkdissect.forms``). For window layers x holds windows
    (B·n_windows, T_w, d_model), as captured.
    """
    modes = atlas.layers[layer]
    z = atlas_input(atlas, layer, x)
    form = modes.form
    if form is not None and form.needs_head_space:
        return exact_layer_logits(modes, z, atlas.layer_scale(layer))[0]
    U, V, S = modes.U.to(z.device), modes.V.to(z.device), modes.S.to(z.device)
    q, k = torch.einsum("bnd,hdr->bhnr", z, U), torch.einsum("bnd,hdr->bhnr", z, V)
    bilinear = torch.einsum("bhpr,hr,bhqr->bhpq", q, S, k)
    salience = torch.einsum("bqd,hd->bhq", z, modes.key_bias.to(z.device))
    scale = atlas.layer_scale(layer) if form is None or form.head_scale is None else \
        form.head_scale.to(z)[None, :, None, None]
    logits = scale * (bilinear + salience[:, :, None, :])
    extra = additive_terms(form, z.shape[0], z.shape[1], logits.dtype, logits.device)
    return logits if extra is None else logits + extra


def attention_from_modes(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"],
                         key_mask: Bool[Tensor, "batch tokens"] | None = None) -> Float[Tensor, "batch heads tokens tokens"]:
    """softmax over keys of :func:`logits_from_modes`; ``key_mask`` (B, N) bool, False = masked key."""
    logits = logits_from_modes(atlas, layer, x)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :].to(logits.device), float("-inf"))
    return logits.softmax(dim=-1)


def qk_norm_factors(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"]
                    ) -> tuple[Float[Tensor, "batch heads tokens"], Float[Tensor, "batch heads tokens"]]:
    """Per-token QK-norm factors (ρ_q, ρ_k), each (B, heads, N): the std (LayerNorm), rms (RMSNorm)
    or norm (cosine attention) of each token's raw q and k that the layer divides by."""
    modes = atlas.layers[layer]
    if modes.form is None or modes.form.qk_norm is None:
        raise QKDissectError(f"layer {layer} has no QK-norm: its logits have no per-token factors.")
    _, rho_q, rho_k = exact_layer_logits(modes, atlas_input(atlas, layer, x), atlas.layer_scale(layer))
    return rho_q, rho_k


def split_tokens(values: Tensor, n_prefix: int, grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Split per-token values (..., N) into prefix tokens (..., n_prefix) and patch tokens.

    With ``grid`` = (rows, cols) the patch part is reshaped row-major to (..., rows, cols)
    (non-square grids allowed); without it, it stays (..., N − n_prefix).
    """
    n_tokens = values.shape[-1]
    if not 0 <= n_prefix <= n_tokens:
        raise QKDissectError(f"cannot drop {n_prefix} prefix tokens from a sequence of {n_tokens}.")
    prefix, patches = values[..., :n_prefix], values[..., n_prefix:]
    if grid is None:
        return prefix, patches
    rows, cols = grid
    if rows * cols != patches.shape[-1]:
        raise QKDissectError(f"{patches.shape[-1]} patch tokens do not fill a {rows}×{cols} grid "
                             f"({n_tokens} tokens, {n_prefix} prefix tokens); the image size does not "
                             "match the model's patch grid.")
    return prefix, patches.reshape(*patches.shape[:-1], rows, cols)


def mode_contributions(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"], head: int,
                       modes: Iterable[int] | None = None) -> Float[Tensor, "batch modes tokens tokens"]:
    """Contribution of each mode of one head to its logits, (B, m, N, N).

    Plain bilinear layers: C[b, k, p, p'] = s · σ_k · q[b, p, k] · k[b, p', k] (s the scale). Layers
    with rotation or QK-norm, whose query is q̃_p = R_p((Σ_k q_pk g_k + b_q)/ρ_p + β) in head space
    (g_k = row k of G_q): C[b, k, p, p'] = s · (q_pk / ρ_p) · (R_p g_k)·k̃_p' — mode k's part of the
    query against the whole key. Σ over all modes plus :func:`residual_logits` equals the head's
    logits (:func:`logits_from_modes`, before masks).
    """
    selected = _mode_index(atlas, modes)
    return _contributions(atlas, layer, atlas_input(atlas, layer, x), head, selected)


def _head_scale(atlas: ModeAtlas, layer: int, head: int) -> float:
    form = atlas.layers[layer].form
    if form is not None and form.head_scale is not None:
        return float(form.head_scale[head])
    return atlas.layer_scale(layer)


def _contributions(atlas: ModeAtlas, layer: int, z: Tensor, head: int, selected: list[int]) -> Tensor:
    modes_ = atlas.layers[layer]
    form, scale = modes_.form, _head_scale(atlas, layer, head)
    U = modes_.U[head][:, selected].to(z)
    if form is None or not form.needs_head_space:
        V, S = modes_.V[head][:, selected].to(z), modes_.S[head][selected].to(z)
        return scale * torch.einsum("bpm,m,bqm->bmpq", z @ U, S, z @ V)
    m = z @ U  # (B, N, m)
    a = z @ modes_.U[head].to(z) @ modes_.G_q[head].to(z) + modes_.head_b_q[head].to(z)
    c = z @ modes_.V[head].to(z) @ modes_.G_k[head].to(z) + modes_.head_b_k[head].to(z)
    _, rho_q = normalise(a, form.qk_norm, "q")
    k, _ = normalise(c, form.qk_norm, "k")
    coefficient = m if rho_q is None else m / rho_q[..., None]
    layout, width = ("interleaved", 0) if form.rotary is None else (form.rotary.layout, form.rotary.rotary_dim)
    g = to_complex(modes_.G_q[head][selected].to(z), layout, width)  # (m, P)
    kc = to_complex(k, layout, width)  # (B, N, P)
    if form.rotary is None:
        inner = torch.einsum("mf,bqf->bmq", g.conj(), kc).real[:, :, None, :]  # (B, m, 1, N)
    else:
        zr = rotations(form.rotary, z.shape[1], k.shape[-1], dtype=torch.float64 if z.dtype == torch.float64
                       else torch.float32).to(z.device)
        zr = zr[head if zr.shape[0] > 1 else 0]  # (N, P)
        inner = torch.einsum("mf,pf,bqf->bmpq", g.conj(), zr.conj(), kc * zr).real  # (R_p g_k)·k̃_q
    return scale * coefficient.transpose(1, 2)[..., None] * inner


def residual_logits(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"], head: int) -> Float[Tensor, "batch tokens tokens"]:
    """The part of one head's logits that no mode carries, (B, N, N): the key-bias term (plain
    layers; the same for every query), query/key offsets of rotated and normalised heads, and the
    relative position bias. Masks are not included (see :func:`valid_pairs`)."""
    return _residual(atlas, layer, atlas_input(atlas, layer, x), head)


def _residual(atlas: ModeAtlas, layer: int, z: Tensor, head: int) -> Tensor:
    modes_ = atlas.layers[layer]
    form = modes_.form
    if form is not None and form.needs_head_space:
        head_logits_ = exact_layer_logits(modes_, z, atlas.layer_scale(layer), masks=False)[0][:, head]
        return head_logits_ - _contributions(atlas, layer, z, head, list(range(atlas.rank))).sum(dim=1)
    salience = _head_scale(atlas, layer, head) * (z @ modes_.key_bias[head].to(z))
    out = salience[:, None, :].expand(-1, z.shape[1], -1)
    if form is not None and form.bias is not None:
        out = out + form.bias.dense()[head].to(z)
    return out


def valid_pairs(atlas: ModeAtlas, layer: int, x: Tensor) -> Tensor | None:
    """(B or 1, N, N) bool: the (query, key) pairs the layer lets attend (causal, sliding window,
    Swin's shift mask), None when all do. Padding is separate (``key_mask`` / ``token_mask``)."""
    return form_valid_pairs(atlas.layers[layer].form, x.shape[0], x.shape[1], x.device)


def key_bias_logits(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"], head: int) -> Float[Tensor, "batch tokens"]:
    """The key-salience part of one head's logits, scale · key_bias·x̃_p' (B, N): the same for every query.

    Only for layers without rotation or QK-norm; their remainder depends on the query too — use
    :func:`residual_logits`."""
    form = atlas.layers[layer].form
    if form is not None and form.needs_head_space:
        raise QKDissectError(f"layer {layer} ({form.kind}): the non-mode part of its logits depends on the query "
                             "as well; use qkdissect.projection.residual_logits.")
    z = atlas_input(atlas, layer, x)
    return _head_scale(atlas, layer, head) * (z @ atlas.layers[layer].key_bias[head].to(z.device))


def _mode_index(atlas: ModeAtlas, modes: Iterable[int] | None) -> list[int]:
    if modes is None:
        return list(range(atlas.rank))
    selected = [int(m) for m in modes]
    bad = [m for m in selected if not 0 <= m < atlas.rank]
    if bad:
        raise QKDissectError(f"modes {bad} do not exist: each head has modes 0..{atlas.rank - 1}.")
    return selected


@dataclass(frozen=True)
class LogitVarianceShares:
    """How much of each head's logit variance each mode explains, per input.

    With L̄ the head's logits centred over the keys of each query row (terms constant in p'
    cancel in the softmax), C̄_k mode k's centred contribution and B̄ the centred key-bias term
    (L̄ = Σ_k C̄_k + B̄), ``mode_shares[b, h, k] = ⟨C̄_k, L̄⟩ / ⟨L̄, L̄⟩`` and
    ``bias_share[b, h] = ⟨B̄, L̄⟩ / ⟨L̄, L̄⟩`` (inner products over valid query–key pairs), so that
    Σ_k mode_shares + bias_share = 1. A share is negative when the mode works against the rest.
    ``logit_variance[b, h]`` is the mean over queries of the variance of the logits over keys.
    Shapes: mode_shares (B, heads, r); bias_share, logit_variance (B, heads); float64.

    Layers with another attention form (rotation, QK-norm, relative bias, causal or window masks)
    use their exact logits and contributions (:func:`mode_contributions`): B̄ is then the whole
    residual (:func:`residual_logits`), valid pairs also respect the layer's masks, and
    ``relative_bias_share`` (B, heads) = ⟨B̄_rel, L̄⟩ / ⟨L̄, L̄⟩ is the relative position bias' part
    of ``bias_share`` (None for layers without one).
    """

    mode_shares: Tensor
    bias_share: Tensor
    logit_variance: Tensor
    relative_bias_share: Tensor | None = None


def logit_variance_shares(atlas: ModeAtlas, layer: int, x: Float[Tensor, "batch tokens d_model"],
                          token_mask: Bool[Tensor, "batch tokens"] | None = None) -> LogitVarianceShares:
    """Per-input share of each head's logit variance carried by each mode (see LogitVarianceShares).

    x: x̃ (B, N, d_model); token_mask (B, N) bool, False = a token left out both as query and as
    key (padding, or prefix tokens for a patches-only ranking). Computed from r × r Gram matrices,
    O(N·r²) per head, never forming the N × N contributions:
    ⟨C̄_k, C̄_j⟩ = σ_k σ_j (qᵀq)_kj (K̄ᵀK̄)_kj, ⟨C̄_k, B̄⟩ = σ_k (Σ_p q_pk)(K̄ᵀs̄)_k, ⟨B̄, B̄⟩ = N_q s̄ᵀs̄,
    with K̄ the key maps and s̄ the key-bias logits centred over valid keys (scale² cancels).
    """
    modes = atlas.layers[layer]
    z = atlas_input(atlas, layer, x).double()
    if token_mask is None:
        token_mask = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
    if modes.form is not None:
        return _exact_shares(atlas, layer, z, token_mask.to(z.device).bool())
    w = token_mask.to(z.device).double()  # (B, N)
    n_valid = w.sum(dim=1)  # (B,)
    if bool((n_valid < 2).any()):
        raise QKDissectError("logit variance needs at least two valid tokens per input.")
    U, V, S = modes.U.double().to(z.device), modes.V.double().to(z.device), modes.S.double().to(z.device)
    q = torch.einsum("bnd,hdr->bhnr", z, U) * w[:, None, :, None]
    k = torch.einsum("bnd,hdr->bhnr", z, V)
    s = torch.einsum("bnd,hd->bhn", z, modes.key_bias.double().to(z.device))
    weights = w[:, None, :]
    k_mean = (k * weights[..., None]).sum(dim=2, keepdim=True) / n_valid[:, None, None, None]
    s_mean = (s * weights).sum(dim=2, keepdim=True) / n_valid[:, None, None]
    k_c = (k - k_mean) * weights[..., None]
    s_c = (s - s_mean) * weights
    gram_q = torch.einsum("bhnr,bhns->bhrs", q, q)
    gram_k = torch.einsum("bhnr,bhns->bhrs", k_c, k_c)
    cross = q.sum(dim=2) * torch.einsum("bhnr,bhn->bhr", k_c, s_c)  # (Σ_p q_pk)(K̄ᵀs̄)_k
    mode_mode = S[None, :, :, None] * gram_q * gram_k * S[None, :, None, :]  # ⟨C̄_k, C̄_j⟩
    mode_bias = S[None] * cross  # ⟨C̄_k, B̄⟩
    bias_bias = n_valid[:, None] * (s_c * s_c).sum(dim=2)  # ⟨B̄, B̄⟩
    per_mode = mode_mode.sum(dim=-1) + mode_bias
    bias = mode_bias.sum(dim=-1) + bias_bias
    total = per_mode.sum(dim=-1) + bias
    safe = torch.where(total > 0, total, torch.ones_like(total))
    variance = atlas.scale ** 2 * total / (n_valid[:, None] ** 2)
    return LogitVarianceShares(mode_shares=torch.where(total[..., None] > 0, per_mode / safe[..., None], 0.0),
                               bias_share=torch.where(total > 0, bias / safe, 0.0), logit_variance=variance)


def _exact_shares(atlas: ModeAtlas, layer: int, z: Tensor, token_mask: Tensor) -> LogitVarianceShares:
    """Dense O(r·N²) per head and input: the exact contributions of a layer with an attention form. Window
    layers (rows = B · n_windows windows) sum the inner products over the windows of each image."""
    B, N = z.shape[:2]
    H, r = atlas.heads_in(layer), atlas.rank
    form = atlas.layers[layer].form
    group = 1 if form.windows is None else form.windows.n_windows
    if B % group:
        raise QKDissectError(f"layer {layer} attends in {group} windows per image; the input has {B} rows.")
    pairs = token_mask[:, :, None] & token_mask[:, None, :]
    allowed = form_valid_pairs(form, B, N, z.device)
    if allowed is not None:
        pairs = pairs & allowed
    images = B // group
    # raw sums per image and head: ⟨C̄_k, L̄⟩ (r), ⟨B̄, L̄⟩, ⟨B̄_rel, L̄⟩, ⟨L̄, L̄⟩, Σ_rows Var_row, number of rows
    mode_ip = torch.zeros(images, H, r, dtype=torch.float64)
    bias_ip, rel_ip, total, var_sum = (torch.zeros(images, H, dtype=torch.float64) for _ in range(4))
    n_rows = torch.zeros(images, dtype=torch.float64)
    for b in range(B):
        w = pairs[b].double()  # (N, N)
        rows = w.sum(-1, keepdim=True)
        live = rows[:, 0] > 0
        image = b // group
        n_rows[image] += float(live.sum())

        def centre(t: Tensor, w: Tensor = w, rows: Tensor = rows) -> Tensor:
            return (t - (t * w).sum(-1, keepdim=True) / rows.clamp_min(1)) * w

        for h in range(H):
            parts = _contributions(atlas, layer, z[b:b + 1], h, list(range(r)))[0]  # (r, N, N)
            residual = _residual(atlas, layer, z[b:b + 1], h)[0]
            C, R = centre(parts), centre(residual)
            L = C.sum(0) + R
            total[image, h] += (L * L).sum()
            mode_ip[image, h] += (C * L).sum(dim=(-1, -2))
            bias_ip[image, h] += (R * L).sum()
            var_sum[image, h] += ((L * L).sum(-1)[live] / rows[live, 0]).sum()
            if form.bias is not None:
                rel_ip[image, h] += (centre(form.bias.dense()[h].to(z)) * L).sum()
    if bool((n_rows == 0).any()) or bool((pairs.sum(-1) < 2).all(dim=-1).reshape(images, group).all(-1).any()):
        raise QKDissectError("logit variance needs at least two valid tokens per input.")
    safe = torch.where(total > 0, total, torch.ones_like(total))
    return LogitVarianceShares(mode_shares=mode_ip / safe[..., None], bias_share=bias_ip / safe,
                               logit_variance=var_sum / n_rows[:, None],
                               relative_bias_share=rel_ip / safe if form.bias is not None else None)


def windows_to_grid(values: Tensor, windows: Any) -> Tensor:
    """Per-window-token values (B·n_windows, ..., T_w) -> per-grid-token values (B, ..., rows·cols) in
    row-major grid order (the window partition undone, padding dropped; ``windows`` a WindowLayout)."""
    index = windows.token_index.to(values.device)
    n_windows, T_w = index.shape
    batch = values.shape[0] // n_windows
    middle = values.shape[1:-1]
    v = values.reshape(batch, n_windows, *middle, T_w).movedim(1, -2).reshape(batch, *middle, n_windows * T_w)
    flat = index.reshape(-1)
    keep = flat >= 0
    out = torch.zeros(batch, *middle, windows.grid[0] * windows.grid[1], dtype=values.dtype, device=values.device)
    out[..., flat[keep]] = v[..., keep]
    return out
