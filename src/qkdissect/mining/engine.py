"""The per-batch work of mining: one forward pass with hooks gives, for every mined layer, the
query and key projections of every mode of every head, reduced over the patch tokens.

Two routes compute the projections q_p = u_k·x̃_p and k_p = v_k·x̃_p of all heads and modes:

* ``"qk"`` (fast): the model's own query / key vectors q_h = W_q,h x̃ + b_q,h are read from its
  q/k Linear outputs and mapped per head by an r × d_head matrix, u_kᵀx̃ = T_h (q_h − b_q,h),
  T_h = Uᵀ W_q,h⁺ (U lies in the row space of W_q,h). Cost per token d_model·d_head — a sixth of
  a d_model² projection for ViT-S. Used for a layer only when T_h W_q,h = Uᵀ holds to 1e-4
  (a rank-deficient W_q breaks it) and the adapter exposes the q/k Linears (timm ViT, HF).
* ``"x"`` (general): a forward pre-hook on the attention module reads x̃ and projects it onto
  [U | V] with one matmul (d_model × 2·H·r). Layers with a QK-norm divide each token's maps by its
  norm factors ρ_q, ρ_k (the maps the head uses, ``qkdissect.projection.project``); rotary layers
  mine their content modes M(0) (the rotation acts on pairs of tokens, not on one token's map).

Either way there is one einsum / matmul per layer over all heads and modes, then max / min /
sums over the token axis on the tensor; nothing loops over heads or modes. Peak positions and
maps are gathered only for each batch's own top-k' images (the only ones that can enter the
top-k), because reductions that return indices are an order of magnitude slower than amax.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from qkdissect.adapters.loading import LoadedModel
from qkdissect.errors import QKDissectError
from qkdissect.forms.logits import norm_factors
from qkdissect.mining.state import RunningStats, TopK, fixed_sum, merge_stats, merge_topk, to_fixed
from qkdissect.positional import head_vectors
from qkdissect.projection import StopForward
from qkdissect.testpoints import pause_point

if TYPE_CHECKING:
    from qkdissect.atlas import ModeAtlas

__all__ = ["AMP_DTYPES", "LayerRoute", "MiningEngine"]

ROUTE_TOLERANCE = 1e-4
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class LayerRoute:
    """How one layer's projections are computed. ``T`` (2, H, r, d_head) and ``t0`` (2, H, r) for
    the qk route (index 0 query, 1 key); ``W`` (2·H·r, d_model), ``a``/``c`` (d_model,) (x̃ → a⊙x̃ + c
    for a folded atlas, else None) for the x route. ``kv_index`` (H,) maps query heads to key heads."""

    layer: int
    kind: str
    T: Tensor | None = None
    t0: Tensor | None = None
    kv_index: Tensor | None = None
    W: Tensor | None = None
    a: Tensor | None = None
    c: Tensor | None = None
    norm: Any = None  # the atlas' LayerModes of a QK-norm layer (x route divides by ρ)


def _affine(atlas: ModeAtlas, layer: int, d_model: int) -> tuple[Tensor, Tensor]:
    """(a, c) with atlas_input(x̃) = a⊙x̃ + c, float64."""
    a, c = torch.ones(d_model, dtype=torch.float64), torch.zeros(d_model, dtype=torch.float64)
    modes = atlas.layers[layer]
    if atlas.meta.get("ln_folded"):
        if modes.ln_weight is not None:
            a = 1.0 / modes.ln_weight.double()
        if modes.ln_bias is not None:
            c = -modes.ln_bias.double() * a
    return a, c


def build_route(loaded: LoadedModel, atlas: ModeAtlas, layer: int, raw, prefer: str = "auto") -> LayerRoute:
    """The route for ``layer`` (see the module docstring); ``raw`` is the adapter's AttentionLayer."""
    modes = atlas.layers[layer]
    U, V = modes.U.double(), modes.V.double()  # (H, d, r)
    a, c = _affine(atlas, layer, atlas.d_model)
    folded = bool(atlas.meta.get("ln_folded"))
    if prefer in ("auto", "qk") and loaded.adapter.qk_linears(layer) is not None:
        n_heads = raw.n_heads
        kv = torch.tensor(raw.kv_head_of if raw.kv_head_of is not None else range(n_heads), dtype=torch.long)
        zeros = torch.zeros(n_heads, raw.d_head, dtype=torch.float64)
        b_q = zeros if raw.b_q is None else raw.b_q.double()
        b_k = zeros if raw.b_k is None else raw.b_k.double()[kv]
        T, t0, ok = [], [], True
        for frame, W, bias in ((U, raw.W_q.double(), b_q), (V, raw.W_k.double()[kv], b_k)):
            target = frame.transpose(1, 2) * a  # (H, r, d): rows u_kᵀ diag(a)
            T_side = target @ torch.linalg.pinv(W)  # (H, r, d_head)
            residual = torch.linalg.matrix_norm(T_side @ W - target) / torch.linalg.matrix_norm(target).clamp_min(1e-300)
            ok = ok and bool((residual < ROUTE_TOLERANCE).all())
            T.append(T_side)
            t0.append(frame.transpose(1, 2) @ c - (T_side @ bias[..., None])[..., 0])
        if ok:
            return LayerRoute(layer, "qk", T=torch.stack(T).float(), t0=torch.stack(t0).float(),
                              kv_index=None if raw.kv_head_of is None else kv)
        if prefer == "qk":
            raise QKDissectError(f"layer {layer}: the modes are not in the row space of W_q / W_k (rank-deficient "
                                 "projections); use the x route.")
    elif prefer == "qk":
        raise QKDissectError(f"the {loaded.family} adapter does not expose layer {layer}'s q/k projections.")
    W = torch.cat([U, V], dim=0).transpose(1, 2).reshape(-1, atlas.d_model)  # (2·H·r, d): rows u_k of each head, then v_k
    norm = modes if modes.form is not None and modes.form.qk_norm is not None else None
    return LayerRoute(layer, "x", W=W.float().contiguous(), a=a.float() if folded else None,
                      c=c.float() if folded else None, norm=norm)


class MiningEngine:
    """Processes batches of pixels into top-k candidates and statistics for ``layers``.

    ``map_modes``: modes whose raw maps are kept for the top images (contact sheets).
    ``stop_early``: skip the rest of the forward pass after the last mined layer's projections.
    ``amp``: None, "bf16" or "fp16": the model's forward pass runs under autocast with that type; the
    projections onto the modes, the reductions and the state stay float32 / float64 / exact.
    """

    def __init__(self, loaded: LoadedModel, atlas: ModeAtlas, layers: Sequence[int], *, top_k: int, map_modes: Sequence[int],
                 grid: tuple[int, int], device: Any = "cpu", route: str = "auto", stop_early: bool = True,
                 amp: str | None = None):
        if route not in ("auto", "qk", "x"):
            raise QKDissectError(f"route must be auto, qk or x, got {route!r}.")
        if amp not in (None, *AMP_DTYPES):
            raise QKDissectError(f"--amp must be one of {', '.join(AMP_DTYPES)} (or none), got {amp!r}.")
        self.amp = amp
        self.loaded, self.atlas, self.layers = loaded, atlas, list(layers)
        self.top_k, self.grid, self.device, self.stop_early = top_k, grid, torch.device(device), stop_early
        self.n_prefix = len(loaded.adapter.prefix_tokens)
        self.n_patches = grid[0] * grid[1]
        self.map_modes = torch.tensor(list(map_modes), dtype=torch.long)
        modes = self.map_modes.tolist()
        contiguous = modes == list(range(modes[0], modes[0] + len(modes))) if modes else False
        self.map_slice = (None if not modes else slice(modes[0], modes[0] + len(modes)) if contiguous
                          else self.map_modes.to(self.device))  # a slice is a view: cheaper than indexing
        raw = loaded.adapter.attention_layers()
        self.routes = [self._to_device(build_route(loaded, atlas, layer, raw[layer], route)) for layer in self.layers]
        self.H, self.r = atlas.n_heads, atlas.rank

    def _to_device(self, route: LayerRoute) -> LayerRoute:
        values = {name: (getattr(route, name).to(self.device) if isinstance(getattr(route, name), Tensor) else
                         getattr(route, name)) for name in route.__dataclass_fields__}
        return LayerRoute(**values)

    @property
    def route_kinds(self) -> list[str]:
        return [route.kind for route in self.routes]

    # ----- projections ---------------------------------------------------------------------------------
    def _reduce(self, slot: int, P_full: Tensor, offset: Tensor | None, out: dict[int, Any]) -> None:
        """P_full (2, H, r, B, N) raw projections of every token (+ ``offset`` (2, H, r) still to add;
        axis 0: q, k) -> this layer's top-k' candidates (k' = min(k, B)) with their peak positions
        and maps, and the batch statistics over the patch tokens.

        Values: amax / amin over tokens (fast reductions without indices). Only the batch's own
        top-k' images per (head, mode, sign) can enter the top-k, so the peak positions (argmax /
        argmin) and maps are taken for those alone, from their token rows.
        """
        two, H, r, B, N = P_full.shape
        n, n_prefix = N - self.n_prefix, self.n_prefix
        if n != self.n_patches:
            raise QKDissectError(f"layer {self.layers[slot]} has {N} tokens, expected {n_prefix} prefix + "
                                 f"{self.n_patches} patches.")
        P = P_full[..., n_prefix:]  # (2, H, r, B, patches): prefix tokens dropped
        maximum, minimum = P.amax(dim=-1), P.amin(dim=-1)  # (2, H, r, B)
        total = P.sum(dim=-1).double()  # per image in float32 (n terms), across images exact (fixed point)
        squares = torch.linalg.vecdot(P, P).double()
        if offset is not None:  # max(P + t0) = max(P) + t0: the shift never touches the big tensor
            shift = offset[..., None]
            maximum, minimum = maximum + shift, minimum + shift
            shift = shift.double()
            squares = squares + 2 * shift * total + n * shift * shift
            total = total + n * shift
        if slot == 0:
            pause_point("forward")  # tests kill the process here, in the middle of a forward pass
        score_pos = maximum[0].clamp_min(0) * maximum[1].clamp_min(0)  # (H, r, B)
        score_neg = (-minimum[0]).clamp_min(0) * (-minimum[1]).clamp_min(0)
        scores = torch.nan_to_num(torch.stack([score_pos, score_neg], dim=2), nan=float("-inf"))  # (H, r, 2, B)
        kept = min(self.top_k, B)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)[..., :kept]  # (H, r, 2, k') batch rows
        base = torch.arange(2 * H * r, device=order.device).reshape(2, H, r, 1) * B
        rows = (base + order.reshape(1, H, r, 2 * kept)).reshape(-1)
        picked = P_full.reshape(-1, N).index_select(0, rows)[:, n_prefix:].reshape(2, H, r, 2, kept, n)
        positions = torch.stack([picked[:, :, :, 0].argmax(dim=-1), picked[:, :, :, 1].argmin(dim=-1)], dim=3)
        maps = None
        if self.map_slice is not None:  # (2, H, m, 2, k', patches) -> float16 (H, m, 2, k', 2, patches)
            raw = picked[:, :, self.map_slice]
            maps = torch.empty(raw.shape, dtype=torch.float16, device=raw.device)
            if offset is not None:
                torch.add(raw, offset[:, :, self.map_slice, None, None, None], out=maps)
            else:
                maps.copy_(raw)
            maps = maps.permute(1, 2, 3, 4, 0, 5)
        out[slot] = (torch.gather(scores, -1, order), order, positions[0].int(), positions[1].int(), maps,
                     fixed_sum(to_fixed(total), dim=-2), fixed_sum(to_fixed(squares), dim=-2),
                     maximum.amax(dim=-1), minimum.amin(dim=-1))

    def _hooks(self, out: dict[int, Any]) -> list[Any]:
        handles = []
        last = len(self.routes) - 1
        modules = self.loaded.adapter.attention_modules()
        H, r = self.H, self.r
        for slot, route in enumerate(self.routes):
            def finish(slot: int = slot) -> None:
                if self.stop_early and slot == last:
                    raise StopForward

            if route.kind == "x":
                def pre_hook(_module, args, kwargs, route=route, slot=slot, finish=finish):
                    x = args[0] if args else kwargs["hidden_states"]
                    B, N, d = x.shape
                    z = x.reshape(B * N, d).float()
                    if route.a is not None:
                        z = z * route.a + route.c
                    P_full = (route.W @ z.T).reshape(2, H, r, B, N)  # [U | V]ᵀ x̃ for every token
                    if route.norm is not None:  # the head's maps: u·x̃/ρ_q, v·x̃/ρ_k
                        a, c = head_vectors(route.norm, z.reshape(B, N, d).double())
                        norm = route.norm.form.qk_norm
                        rho = torch.stack([norm_factors(a, norm, "q"), norm_factors(c, norm, "k")])  # (2, B, H, N)
                        P_full = P_full / rho.permute(0, 2, 1, 3)[:, :, None].float()
                    self._reduce(slot, P_full, None, out)
                    finish()
                handles.append(modules[route.layer].register_forward_pre_hook(self._exact(pre_hook), with_kwargs=True))
                continue
            kind, first, second = self.loaded.adapter.qk_linears(route.layer)
            if kind == "fused":
                def fused_hook(_module, _args, output, route=route, slot=slot, finish=finish):
                    B, N, width = output.shape
                    # the q and k columns of every token as (2H, d_head, B·N): a strided view, no copy
                    X = output.reshape(B * N, width)[:, : 2 * width // 3].reshape(B * N, 2 * H, -1).permute(1, 2, 0)
                    P_full = torch.bmm(route.T.reshape(2 * H, r, -1), X.float()).reshape(2, H, r, B, N)
                    self._reduce(slot, P_full, route.t0, out)
                    finish()
                handles.append(first.register_forward_hook(self._exact(fused_hook)))
                continue
            pending: dict[str, Tensor] = {}

            def split_hook(_module, _args, output, route=route, slot=slot, finish=finish, pending=pending, side="q"):
                pending[side] = output
                if len(pending) < 2:
                    return
                q, k = pending.pop("q"), pending.pop("k")
                B, N, width = q.shape
                e = width // H
                P_full = torch.empty(2, H, r, B * N, dtype=torch.float32, device=q.device)
                k = k.reshape(B * N, -1, e)
                if route.kv_index is not None:
                    k = k[:, route.kv_index]
                torch.bmm(route.T[0], q.reshape(B * N, H, e).permute(1, 2, 0).float(), out=P_full[0])
                torch.bmm(route.T[1], k.permute(1, 2, 0).float(), out=P_full[1])
                self._reduce(slot, P_full.reshape(2, H, r, B, N), route.t0, out)
                finish()

            handles.append(first.register_forward_hook(self._exact(split_hook)))
            handles.append(second.register_forward_hook(self._exact(
                lambda m, a, o, hook=split_hook: hook(m, a, o, side="k"))))
        return handles

    def _autocast(self):
        """The forward pass's autocast context (``amp``), or nothing."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp])

    def _exact(self, hook):
        """``hook`` run with autocast switched off: the projections stay float32 under --amp."""
        if self.amp is None:
            return hook

        def run(*args, **kwargs):
            with torch.autocast(self.device.type, enabled=False):
                return hook(*args, **kwargs)

        return run

    def project_batch(self, pixels: Tensor) -> dict[int, Any]:
        """One forward pass; {slot: (max, argmax, min, argmin, Σ, Σ², maps)} per mined layer.

        ``pixels`` may be in pinned host memory: the copy to the device does not block."""
        out: dict[int, Any] = {}
        handles = self._hooks(out)
        try:
            with torch.no_grad(), self._autocast():
                self.loaded.adapter.forward(pixels.to(self.device, non_blocking=True))
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if len(out) != len(self.routes):
            raise QKDissectError("the forward pass did not reach every mined layer.")
        return out

    # ----- candidates and merge -------------------------------------------------------------------------
    def candidates(self, reduced: dict[int, Any], image_index: Tensor) -> tuple[TopK, RunningStats]:
        """Stack per-layer reductions into candidates (L, H, r, 2, k') and batch statistics."""
        parts = [reduced[slot] for slot in range(len(self.routes))]
        image_index = image_index.to(self.device, non_blocking=True)
        topk = TopK(scores=torch.stack([p[0] for p in parts]).float(),
                    image=image_index[torch.stack([p[1] for p in parts])],
                    query_pos=torch.stack([p[2] for p in parts]), key_pos=torch.stack([p[3] for p in parts]),
                    maps=None if self.map_slice is None else torch.stack([p[4] for p in parts]))
        n_images = image_index.numel()
        stats = RunningStats(
            total=torch.stack([p[5] for p in parts]), squares=torch.stack([p[6] for p in parts]),
            maximum=torch.stack([p[7] for p in parts]).float(), minimum=torch.stack([p[8] for p in parts]).float(),
            tokens=torch.tensor(n_images * self.n_patches, dtype=torch.int64, device=self.device),
            images=torch.tensor(n_images, dtype=torch.int64, device=self.device))
        return topk, stats

    def step(self, pixels: Tensor, image_index: Tensor, topk: TopK, stats: RunningStats) -> tuple[TopK, RunningStats]:
        """Process one batch and merge it into (topk, stats)."""
        candidates, batch_stats = self.candidates(self.project_batch(pixels), image_index)
        return merge_topk(topk, candidates, self.map_modes), merge_stats(stats, batch_stats)

    def bare_forward(self, pixels: Tensor) -> None:
        """The model's plain forward pass on the same batch (the benchmark's baseline), with the same ``amp``."""
        with torch.no_grad(), self._autocast():
            self.loaded.adapter.forward(pixels.to(self.device, non_blocking=True))
