"""Training, probing and dissecting the in-context regression transformer.

* :func:`train_icl` — Adam (or SGD) on batches of tasks from a training pool; every batch holds,
  per task, N context samples and N + 1 fresh queries that see k = 0 … N of them (one forward
  pass trains every context size). Loss: mean ‖ŷ − y‖² / Σ s² (1 = predicting 0). Checkpoints
  (state dicts, safetensors) are written during training; a callback sees the model at each.
* :func:`probe_icl` — in-context mode recovery: after k context samples, queries ±c·e_i read
  out Ŵ_k[:, i] = (f(+c e_i) − f(−c e_i)) / (2c) (queries never alter the context, see the
  mask in :mod:`~qkdissect.dynamics.incontext.model`), m_α(k) = u_αᵀ Ŵ_k v_α / s_α, plus the R² of
  f(x) ≈ f(0) + Ŵ_k x on random queries.
* :func:`weight_spectra` — outer-loop trajectories with qkdissect's :func:`factored_svd`: per
  checkpoint, layer and head the singular values of M = W_Qᵀ W_K, of its x–x block
  M_xx = W_Q[:, :N_x]ᵀ W_K[:, :N_x], of OV = W_O W_V and of its y←y block W_O[N_x:] W_V[:, N_x:],
  and the diagonal of M_xx (input coordinate α; under the aligned prior coordinate α is mode α).
* :func:`cosine_statistics` — qkdissect's similarity statistics of the trained heads, for the
  full M (from the standard atlas, ``qkdissect.dissect``) and for the x–x block separately:
  per-mode cosines u·v, weighted cosine C = Σσcos/Σσ = tr/‖·‖_*, ω = tr(M_xx)/N_x and the
  relative distance ‖M_xx − ωI‖_F / ‖M_xx‖_F (0 when M_xx = ω·I).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qkdissect.dynamics import checks
from qkdissect.dynamics.incontext.model import ICLBatch, ICLTransformer, icl_batch
from qkdissect.dynamics.incontext.setting import (
    linear_readout,
    mode_recovery,
    probe_queries,
    sample_episode,
    task_subset,
)
from qkdissect.dynamics.linear.tasks import LinearTask, Seed, make_generator
from qkdissect.errors import QKDissectError
from qkdissect.factored import factored_svd
from qkdissect.metrics import gaussian_null, mode_cosines, weighted_cosine
from qkdissect.progress import ProgressFn, throttled

__all__ = [
    "training_batch",
    "ICLTrainLog",
    "train_icl",
    "load_checkpoint",
    "ICLProbe",
    "probe_icl",
    "weight_spectra",
    "cosine_statistics",
]

def training_batch(
    tasks: LinearTask, context: int, *, noise: float = 0.0, generator: torch.Generator
) -> tuple[ICLBatch, torch.Tensor]:
    """N context samples and N + 1 fresh queries (seeing k = 0 … N samples) per task; float32.

    Returns the batch and the query targets ``(B, N + 1, N_y)``.
    """
    x, y = sample_episode(tasks, context + context + 1, noise=noise, generator=generator)
    n = context
    batch = icl_batch(x[:, :n].float(), y[:, :n].float(), x[:, n:].float(), torch.arange(n + 1))
    return batch, y[:, n:].float()


def _loss(model: ICLTransformer, batch: ICLBatch, target: torch.Tensor, norm: float) -> torch.Tensor:
    """Mean over queries of ‖ŷ − y‖² / norm, per query ``(Q,)``."""
    return ((model.predict(batch) - target) ** 2).sum(-1).mean(0) / norm


@dataclass(frozen=True)
class ICLTrainLog:
    """Training record: ``steps`` ``(E,)`` of evaluations with mean relative ``train_loss`` (running
    mean since the previous evaluation) and ``test_loss`` (held-out tasks), ``test_loss_per_k``
    ``(E, N + 1)``; ``checkpoint_steps`` and their files; wall-clock ``seconds``."""

    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    test_loss_per_k: np.ndarray
    checkpoint_steps: np.ndarray
    checkpoint_files: tuple[str, ...]
    seconds: float


def checkpoint_schedule(n_steps: int, n_checkpoints: int) -> np.ndarray:
    """Checkpoint steps 0 … n_steps: three quarters of ``n_checkpoints`` geometrically spaced from step 1
    (the outer-loop transitions are sharp and early), the rest evenly spaced."""
    n_geo = max(2, round(3 * n_checkpoints / 4))
    n_lin = max(2, n_checkpoints - n_geo)
    geo = np.geomspace(1, max(1, n_steps), n_geo)
    lin = np.linspace(0, n_steps, n_lin)
    return np.unique(np.concatenate([[0, n_steps], geo, lin]).round().astype(int))


def train_icl(
    model: ICLTransformer,
    train_tasks: LinearTask,
    test_tasks: LinearTask,
    *,
    n_steps: int = 20_000,
    batch: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    noise: float = 0.0,
    n_checkpoints: int = 60,
    checkpoint_dir: str | Path | None = None,
    on_checkpoint: Callable[[int, ICLTransformer], None] | None = None,
    seed: Seed = 0,
    progress: ProgressFn | None = None,
    stage: str = "training",
) -> ICLTrainLog:
    """Train ``model`` in place (module docstring); constant learning rate (the outer-loop dynamics
    are the object of study, so no schedule shapes them)."""
    from safetensors.torch import save_file

    n_steps = checks.count(n_steps, "steps")
    batch = checks.count(batch, "batch")
    lr = checks.positive(lr, "lr")
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        raise QKDissectError(f"optimizer: expected 'adam' or 'sgd', got {optimizer!r}.")
    g = make_generator(seed)
    norm = float((train_tasks.strengths[0] ** 2).sum())
    test_batch, test_y = training_batch(test_tasks, model.context, noise=noise,
                                        generator=make_generator(int(torch.randint(2**31, (1,), generator=g))))
    ckpt_steps = set(checkpoint_schedule(n_steps, n_checkpoints).tolist())
    folder = None if checkpoint_dir is None else Path(checkpoint_dir)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    steps, tr, te, te_k, c_steps, c_files = [], [], [], [], [], []
    recent: list[float] = []
    tick = throttled(progress, stage, n_steps, updates=200)
    start = time.perf_counter()
    for step in range(n_steps + 1):
        if step in ckpt_steps:
            model.eval()
            with torch.no_grad():
                per_k = _loss(model, test_batch, test_y, norm)
            steps.append(step)
            te.append(float(per_k.mean()))
            te_k.append(per_k.numpy())
            tr.append(float(np.mean(recent)) if recent else float("nan"))
            recent = []
            c_steps.append(step)
            if folder is not None:
                path = folder / f"step_{step:07d}.safetensors"
                state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                save_file(state, str(path), metadata={"step": str(step), "config": repr(model.describe())})
                c_files.append(path.name)
            if on_checkpoint is not None:
                on_checkpoint(step, model)
            model.train()
        if step == n_steps:
            break
        idx = torch.randint(train_tasks.n_tasks, (batch,), generator=g)
        b, target = training_batch(task_subset(train_tasks, idx), model.context, noise=noise, generator=g)
        loss = _loss(model, b, target, norm).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.append(float(loss.detach()))
        tick(step + 1)
    model.eval()
    return ICLTrainLog(
        steps=np.asarray(steps), train_loss=np.asarray(tr), test_loss=np.asarray(te),
        test_loss_per_k=np.stack(te_k), checkpoint_steps=np.asarray(c_steps), checkpoint_files=tuple(c_files),
        seconds=time.perf_counter() - start,
    )


def load_checkpoint(path: str | Path, model: ICLTransformer) -> ICLTransformer:
    """Load a checkpoint written by :func:`train_icl` into ``model`` (same configuration)."""
    from qkdissect.adapters.loading import load_state_dict

    load_state_dict(model, path)
    return model.eval()


@dataclass(frozen=True)
class ICLProbe:
    """In-context mode recovery: ``ks`` ``(K,)``; ``W_hat`` ``(K, B, N_y, N_x)``; ``recovery``
    ``(K, B, r)``; ``linearity_r2`` ``(K,)``; ``probe_scale`` c."""

    ks: np.ndarray
    W_hat: np.ndarray
    recovery: np.ndarray
    linearity_r2: np.ndarray
    probe_scale: float


def probe_icl(
    model: ICLTransformer,
    tasks: LinearTask,
    ks: Sequence[int] | None = None,
    *,
    noise: float = 0.0,
    probe_scale: float = 1.0,
    n_random: int = 4,
    seed: Seed = 0,
) -> ICLProbe:
    """Read out Ŵ_k for every k in ``ks`` (default 0 … N) on every task (module docstring)."""
    if tasks.n_in != model.n_x or tasks.n_out != model.n_y:
        raise QKDissectError(
            f"tasks have N_x={tasks.n_in}, N_y={tasks.n_out} but the transformer reads N_x={model.n_x}, "
            f"N_y={model.n_y}."
        )
    c = checks.positive(probe_scale, "probe_scale")
    ks = list(range(model.context + 1)) if ks is None else [checks.count(k, "k", minimum=0) for k in ks]
    n = max(ks + [1])
    g = make_generator(seed)
    x, y = sample_episode(tasks, n, noise=noise, generator=g)
    b, n_x = tasks.n_tasks, tasks.n_in
    dtype = next(model.parameters()).dtype
    x, y = x.to(dtype), y.to(dtype)
    W_list, r2 = [], []
    model.eval()
    with torch.no_grad():
        for k in ks:
            rand_q = torch.randn(b, n_random, n_x, generator=g, dtype=torch.float64).to(dtype)
            q = probe_queries(rand_q, c)
            batch = icl_batch(x[:, :n], y[:, :n], q, [k] * q.shape[1])
            w, fit = linear_readout(model.predict(batch), rand_q, c)  # (B, N_y, N_x), ()
            W_list.append(w)
            r2.append(float(fit))
    W = torch.stack(W_list)
    return ICLProbe(ks=np.asarray(ks), W_hat=W.numpy(), recovery=mode_recovery(tasks, W).numpy(),
                    linearity_r2=np.asarray(r2), probe_scale=c)


def _svals(W_a: torch.Tensor, W_b: torch.Tensor) -> torch.Tensor:
    """Singular values of W_aᵀ W_b with qkdissect's factored SVD, ``(..., r)``."""
    return factored_svd(W_a.double(), W_b.double())[1]


def weight_spectra(models: Sequence[ICLTransformer] | Sequence[dict[str, torch.Tensor]], n_x: int) -> dict[str, np.ndarray]:
    """Singular values per snapshot, layer and head (module docstring).

    Args:
        models: transformers or their state dicts (one per checkpoint, same configuration).
        n_x: input dimension (the x–x / y←y split of the token coordinates).
    Returns:
        ``kq``, ``kq_xx``, ``ov``, ``ov_yy``: ``(C, L, H, r)``; ``kq_xx_diag``: ``(C, L, H, N_x)``.
    """
    out: dict[str, list] = {k: [] for k in ("kq", "kq_xx", "ov", "ov_yy", "kq_xx_diag")}
    for m in models:
        state = m.state_dict() if isinstance(m, torch.nn.Module) else m
        n_layers = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        W_q = torch.stack([state[f"layers.{l}.W_q"] for l in range(n_layers)]).double()  # (L, H, e, d)
        W_k = torch.stack([state[f"layers.{l}.W_k"] for l in range(n_layers)]).double()
        W_v = torch.stack([state[f"layers.{l}.W_v"] for l in range(n_layers)]).double()
        W_o = torch.stack([state[f"layers.{l}.W_o"] for l in range(n_layers)]).double()  # (L, H, d, e)
        out["kq"].append(_svals(W_q, W_k))
        out["kq_xx"].append(_svals(W_q[..., :n_x], W_k[..., :n_x]))
        out["ov"].append(_svals(W_o.transpose(-1, -2), W_v))
        out["ov_yy"].append(_svals(W_o[..., n_x:, :].transpose(-1, -2), W_v[..., n_x:]))
        out["kq_xx_diag"].append((W_q[..., :n_x] * W_k[..., :n_x]).sum(-2))
    return {k: torch.stack(v).numpy() for k, v in out.items()}


def cosine_statistics(
    model: ICLTransformer, *, spec: str = "icl-transformer", null_samples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """qkdissect's cosine statistics of every head: full M (standard atlas) and x–x block separately.

    Returns a JSON-ready dict with per-head rows and the atlas (key ``atlas``, a ModeAtlas whose
    ``meta["model"]`` is ``spec`` and ``meta["info"]`` the model's configuration).
    """
    from qkdissect.adapters.loading import LoadedModel
    from qkdissect.adapters.registry import get_adapter
    from qkdissect.decomposition import dissect

    loaded = LoadedModel(model=model.eval(), adapter=get_adapter(model), spec=spec, info=model.describe())
    atlas = dissect(loaded, dtype=torch.float64, null_samples=null_samples, seed=seed)
    n_x = model.n_x
    W_q = torch.stack([l.W_q.detach() for l in model.layers]).double()
    W_k = torch.stack([l.W_k.detach() for l in model.layers]).double()
    U, S, V = factored_svd(W_q[..., :n_x], W_k[..., :n_x])  # (L, H, n_x, r)
    cos_xx = mode_cosines(U, V)
    wc_xx = weighted_cosine(S, cos_xx)
    M_xx = W_q[..., :n_x].transpose(-1, -2) @ W_k[..., :n_x]  # (L, H, n_x, n_x): small, for ω only
    omega = torch.diagonal(M_xx, dim1=-2, dim2=-1).sum(-1) / n_x
    dev = torch.linalg.matrix_norm(M_xx - omega[..., None, None] * torch.eye(n_x, dtype=M_xx.dtype))
    rel_dev = dev / torch.linalg.matrix_norm(M_xx).clamp_min(1e-300)
    null_xx = gaussian_null(n_x, model.d_head, n_samples=null_samples, seed=seed)
    groups = []
    for l in range(len(model.layers)):
        for sign in (1, -1):
            members = [h for h in range(model.n_heads) if sign * float(omega[l, h]) > 0]
            if not members:
                continue
            # Σ_h W_Q,hᵀ W_K,h over the group = [W_Q,h…]ᵀ [W_K,h…]: factored SVD of the stacked factors
            Wq_g = W_q[l, members, :, :n_x].reshape(-1, n_x)
            Wk_g = W_k[l, members, :, :n_x].reshape(-1, n_x)
            Ug, Sg, Vg = factored_svd(Wq_g, Wk_g)
            M_g = Wq_g.T @ Wk_g
            om_g = float(torch.trace(M_g)) / n_x
            groups.append({
                "layer": l, "sign": sign, "heads": members, "omega": om_g,
                "weighted_cosine": float(weighted_cosine(Sg, mode_cosines(Ug, Vg))),
                "relative_distance_from_omega_identity": float(
                    torch.linalg.matrix_norm(M_g - om_g * torch.eye(n_x, dtype=M_g.dtype))
                    / torch.linalg.matrix_norm(M_g).clamp_min(1e-300)),
            })
    heads = []
    for l in range(len(model.layers)):
        for h in range(model.n_heads):
            full = atlas.head(l, h)
            heads.append({
                "layer": l, "head": h,
                "full_weighted_cosine": full.weighted_cosine,
                "full_cosines": full.cosines.tolist(), "full_singular_values": full.S.tolist(),
                "full_above_null": full.above_null,
                "xx_weighted_cosine": float(wc_xx[l, h]), "xx_cosines": cos_xx[l, h].tolist(),
                "xx_singular_values": S[l, h].tolist(),
                "xx_above_null": float(wc_xx[l, h]) > null_xx.weighted_band[1],
                "omega": float(omega[l, h]), "xx_relative_distance_from_omega_identity": float(rel_dev[l, h]),
            })
    return {
        "heads": heads,
        "sign_groups": groups,
        "null_full": atlas.null.to_dict(),
        "null_xx": null_xx.to_dict(),
        "definitions": {
            "weighted_cosine": "sum_k sigma_k cos(u_k, v_k) / sum_k sigma_k = tr(M)/||M||_* (qkdissect)",
            "xx_block": "M_xx = W_Q[:, :n_x]^T W_K[:, :n_x]: query x-coordinates against key x-coordinates",
            "omega": "tr(M_xx)/n_x; M_xx = omega*I gives cosines +1 (omega > 0) or -1 (omega < 0)",
            "sign_groups": "per layer, the heads with omega > 0 (and < 0) summed: sum_h M_xx,h, its omega, "
                           "weighted cosine and relative distance from omega*I (heads can split the x-space "
                           "between them so that only their sum is ~ omega*I)",
        },
        "atlas": atlas,
    }
