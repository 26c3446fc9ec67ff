"""Learners vs meta-learners on linear regression (Rabinowitz 2019).

Tasks y = W x (+ ε), W = U diag(s) Vᵀ (:mod:`~qkdissect.dynamics.incontext.setting`).

**Learner** (:func:`sgd_learner`). A fresh two-layer linear network ŷ = W_2 W_1 x per task,
trained by minibatch SGD on fresh samples of that task from small random init
(W_l = a₀^{1/2} G_l / √fan_in, G_l i.i.d. N(0, 1)), loss ½ mean_b ‖W_2W_1x_b − y_b‖². Since
E[x xᵀ] = I its mean dynamics is gradient descent on ½‖W − W_2W_1‖²_F: Saxe's depth-2 dynamics
with τ = 1/lr steps, so modes appear one by one, strongest first. All tasks are trained at once
(batched matmuls, hand-written gradients).

**Meta-learner** (:class:`LSTMMetaLearner`). An LSTM reads z_t = (x_t, y_{t−1}) (y_0 = 0) and
predicts ŷ_t = readout(h_t); meta-trained by Adam over episodes of ``episode_length`` samples
from tasks of a training pool, loss the mean over t of ‖ŷ_t − y_t‖² / Σ_α s_α² (1 = predicting
0). After k context samples its prediction function is probed (:func:`probe_lstm`): from the
state h_k (after z_1…z_k), each probe input (±c·e_i, y_k) is fed to its own copy of the state,

    Ŵ_k[:, i] = (f(+c e_i) − f(−c e_i)) / (2c),     m_α(k) = u_αᵀ Ŵ_k v_α / s_α,

which removes the part of f that is even in the query (its value at 0); the context itself is
never altered. How linear f is in the query is reported as R² of f(x) ≈ f(0) + Ŵ_k x on random
queries x ~ N(0, I).

Sizes and training choices here are ours: Rabinowitz's exact LSTM sizes and training details
could not be confirmed from the sources available (abstract only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from qkdissect.dynamics import checks
from qkdissect.dynamics.incontext.setting import (
    linear_readout,
    mode_recovery,
    probe_queries,
    sample_episode,
    task_subset,
)
from qkdissect.dynamics.linear.simulate import effective_initial_strength, init_weights
from qkdissect.dynamics.linear.tasks import LinearTask, Seed, make_generator
from qkdissect.errors import QKDissectError
from qkdissect.progress import ProgressFn, throttled

__all__ = [
    "LearnerTrace",
    "sgd_learner",
    "LSTMMetaLearner",
    "MetaTrainLog",
    "meta_train",
    "LSTMProbe",
    "probe_lstm",
    "lstm_inputs",
    "lstm_query_outputs",
    "episode_loss",
]

# ----------------------------------------------------------------------------- learner


@dataclass(frozen=True)
class LearnerTrace:
    """Mode recovery of SGD learners, one per task.

    Attributes:
        steps: ``(T,)`` SGD steps of the records (samples seen = steps × batch).
        recovery: ``(T, B, r)`` m_α(t) = u_αᵀ W_2W_1 v_α / s_α per task.
        effective_a0: ``(B, r)`` a_eff = ‖W_2ᵀu_α + W_1v_α‖²/4 at init (Saxe's depth-2 curve with
            this a₀ predicts the mean dynamics, see ``simulate.effective_initial_strength``).
        loss: ``(T,)`` mean ‖W − W_2W_1‖²_F / Σs² over tasks (the expected error on a fresh sample,
            relative: 1 = predicting 0).
    """

    steps: np.ndarray
    recovery: np.ndarray
    effective_a0: np.ndarray
    loss: np.ndarray
    batch: int
    lr: float
    hidden: int


def sgd_learner(
    task: LinearTask,
    *,
    hidden: int = 32,
    lr: float = 0.01,
    batch: int = 8,
    n_steps: int = 3000,
    a0: float = 1e-3,
    noise: float = 0.0,
    record_every: int = 10,
    seed: Seed = 0,
    progress: ProgressFn | None = None,
) -> LearnerTrace:
    """Train a fresh 2-layer linear network on every task of ``task`` by minibatch SGD (module docstring)."""
    h = checks.count(hidden, "hidden")
    lr = checks.positive(lr, "lr")
    b = checks.count(batch, "batch")
    n_steps = checks.count(n_steps, "n_steps")
    every = checks.count(record_every, "record_every")
    g = make_generator(seed)
    w1, w2 = init_weights("random", [task.n_in, h, task.n_out], n_batch=task.n_tasks, a0=a0, seed=g,
                          dtype=task.U.dtype)
    eff = effective_initial_strength([w1, w2], task.U, task.V).numpy()
    target = task.matrix
    norm = float((task.strengths[0] ** 2).sum())
    steps, recs, losses = [], [], []
    tick = throttled(progress, "SGD learners", n_steps)
    for t in range(n_steps + 1):
        if t % every == 0 or t == n_steps:
            p = w2 @ w1
            steps.append(t)
            recs.append(mode_recovery(task, p))
            losses.append(float(((p - target) ** 2).sum((-1, -2)).mean() / norm))
        if t == n_steps:
            break
        x, y = sample_episode(task, b, noise=noise, generator=g)
        hid = x @ w1.transpose(-1, -2)  # (B, b, h)
        err = hid @ w2.transpose(-1, -2) - y  # (B, b, n_y)
        g2 = err.transpose(-1, -2) @ hid / b
        g1 = (err @ w2).transpose(-1, -2) @ x / b
        w2 = w2 - lr * g2
        w1 = w1 - lr * g1
        tick(t + 1)
    return LearnerTrace(
        steps=np.asarray(steps), recovery=torch.stack(recs).numpy(), effective_a0=eff,
        loss=np.asarray(losses), batch=b, lr=lr, hidden=h,
    )


# ----------------------------------------------------------------------------- meta-learner


class LSTMMetaLearner(nn.Module):
    """LSTM meta-learner: reads z_t = (x_t, y_{t−1}) ``(B, T, N_x + N_y)``, predicts ŷ_t ``(B, T, N_y)``."""

    def __init__(self, n_x: int, n_y: int, hidden: int = 128, layers: int = 1):
        super().__init__()
        self.n_x, self.n_y = checks.count(n_x, "n_x"), checks.count(n_y, "n_y")
        self.hidden, self.layers = checks.count(hidden, "hidden"), checks.count(layers, "layers")
        self.lstm = nn.LSTM(n_x + n_y, hidden, num_layers=layers, batch_first=True)
        self.readout = nn.Linear(hidden, n_y)

    def forward(
        self, z: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Predictions ``(B, T, N_y)`` and the final state ``(h, c)``, each ``(layers, B, hidden)``."""
        out, state = self.lstm(z, state)
        return self.readout(out), state

    def describe(self) -> dict[str, Any]:
        return {"kind": "LSTM", "n_x": self.n_x, "n_y": self.n_y, "hidden": self.hidden, "layers": self.layers,
                "n_parameters": sum(p.numel() for p in self.parameters()),
                "readout": "linear map of the top layer's hidden state"}


def lstm_inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_t = (x_t, y_{t−1}) with y_0 = 0: ``(B, T, N_x)``, ``(B, T, N_y)`` -> ``(B, T, N_x + N_y)``."""
    y_prev = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], dim=1)
    return torch.cat([x, y_prev], dim=-1)


def episode_loss(pred: torch.Tensor, y: torch.Tensor, norm: float) -> torch.Tensor:
    """Per-step relative error ‖ŷ_t − y_t‖² / norm averaged over the batch, ``(T,)``."""
    return ((pred - y) ** 2).sum(-1).mean(0) / norm


@dataclass(frozen=True)
class MetaTrainLog:
    """Meta-training record.

    Attributes:
        steps: ``(E,)`` meta-steps of the evaluations; train_loss / test_loss: ``(E,)`` mean
        relative error over the episode on training-pool / held-out tasks (fresh samples);
        test_loss_per_step: ``(E, T)`` the held-out error at every position t of the episode;
        seconds: wall-clock time of the training loop.
    """

    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray
    test_loss_per_step: np.ndarray
    seconds: float


def meta_train(
    model: LSTMMetaLearner,
    train_tasks: LinearTask,
    test_tasks: LinearTask,
    *,
    n_steps: int = 20_000,
    batch: int = 64,
    episode_length: int = 20,
    lr: float = 1e-3,
    clip: float = 1.0,
    noise: float = 0.0,
    n_evals: int = 40,
    seed: Seed = 0,
    progress: ProgressFn | None = None,
) -> MetaTrainLog:
    """Meta-train ``model`` (in place, float32) on episodes of tasks drawn from ``train_tasks``.

    Adam with learning rate ``lr`` and cosine decay to 0, gradient-norm clipping at ``clip``;
    every meta-step draws ``batch`` tasks from the pool (with replacement) and fresh samples.
    """
    n_steps = checks.count(n_steps, "meta steps")
    batch = checks.count(batch, "batch")
    t_len = checks.count(episode_length, "episode_length", minimum=2)
    g = make_generator(seed)
    norm = float((train_tasks.strengths[0] ** 2).sum())
    opt = torch.optim.Adam(model.parameters(), lr=checks.positive(lr, "lr"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, n_steps) / n_steps)))
    eval_at = set(np.unique(np.linspace(0, n_steps, max(2, n_evals)).astype(int)).tolist())
    test_x, test_y = sample_episode(test_tasks, t_len, noise=noise, generator=make_generator(int(torch.randint(2**31, (1,), generator=g))))
    test_z = lstm_inputs(test_x, test_y).float()
    log_steps, tr, te, te_t = [], [], [], []
    recent: list[float] = []
    start = time.perf_counter()
    tick = throttled(progress, "meta-training", n_steps, updates=200)
    model.train()
    for step in range(n_steps + 1):
        if step in eval_at:
            model.eval()
            with torch.no_grad():
                pred, _ = model(test_z)
                per_t = episode_loss(pred, test_y.float(), norm)
            model.train()
            log_steps.append(step)
            te.append(float(per_t.mean()))
            te_t.append(per_t.numpy())
            tr.append(float(np.mean(recent)) if recent else float("nan"))
            recent = []
        if step == n_steps:
            break
        idx = torch.randint(train_tasks.n_tasks, (batch,), generator=g)
        x, y = sample_episode(task_subset(train_tasks, idx), t_len, noise=noise, generator=g)
        pred, _ = model(lstm_inputs(x, y).float())
        loss = episode_loss(pred, y.float(), norm).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        recent.append(float(loss.detach()))
        tick(step + 1)
    model.eval()
    return MetaTrainLog(
        steps=np.asarray(log_steps), train_loss=np.asarray(tr), test_loss=np.asarray(te),
        test_loss_per_step=np.stack(te_t), seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class LSTMProbe:
    """Probed prediction functions of a meta-learner on held-out tasks.

    Attributes:
        ks: ``(K,)`` context sizes k = 0 … episode_length − 1.
        W_hat: ``(K, B, N_y, N_x)`` the read-out linear maps Ŵ_k.
        recovery: ``(K, B, r)`` m_α(k).
        linearity_r2: ``(K,)`` R² of f(x) ≈ f(0) + Ŵ_k x on random queries (1 = exactly linear).
        probe_scale: c, the size of the basis probes ±c·e_i.
    """

    ks: np.ndarray
    W_hat: np.ndarray
    recovery: np.ndarray
    linearity_r2: np.ndarray
    probe_scale: float


def lstm_query_outputs(model: LSTMMetaLearner, z: torch.Tensor, y: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Predictions for extra queries after every context size, without altering the context.

    Args:
        z: ``(B, T, N_x + N_y)`` the episode's inputs (:func:`lstm_inputs`); y: ``(B, T, N_y)``.
        queries: ``(T, B, Q, N_x)`` query inputs for each context size k = 0 … T − 1.
    Returns:
        ``(T, B, Q, N_y)``: f_k(q) = prediction when the state after z_1…z_k (a fresh copy per
        query) reads (q, y_k) — for q = x_{k+1} exactly the model's own prediction ŷ_{k+1}.
    """
    t_len, b, n_q, _ = queries.shape
    outs = []
    with torch.no_grad():
        state = None
        for k in range(t_len):
            y_k = y[:, k - 1] if k > 0 else torch.zeros_like(y[:, 0])
            probe_z = torch.cat([queries[k], y_k[:, None].expand(b, n_q, -1)], dim=-1)
            probe_state = None if state is None else tuple(s.repeat_interleave(n_q, dim=1) for s in state)
            f, _ = model(probe_z.reshape(b * n_q, 1, -1), probe_state)
            outs.append(f.reshape(b, n_q, -1))
            _, state = model(z[:, k : k + 1], state)  # consume z_{k+1} = (x_{k+1}, y_k)
    return torch.stack(outs)


def probe_lstm(
    model: LSTMMetaLearner,
    tasks: LinearTask,
    *,
    episode_length: int = 20,
    noise: float = 0.0,
    probe_scale: float = 1.0,
    n_random: int = 4,
    seed: Seed = 0,
) -> LSTMProbe:
    """Read out Ŵ_k after k = 0 … episode_length − 1 context samples of every task (module docstring)."""
    t_len = checks.count(episode_length, "episode_length", minimum=2)
    c = checks.positive(probe_scale, "probe_scale")
    if tasks.n_in != model.n_x or tasks.n_out != model.n_y:
        raise QKDissectError(
            f"tasks have N_x={tasks.n_in}, N_y={tasks.n_out} but the meta-learner reads N_x={model.n_x}, "
            f"N_y={model.n_y}."
        )
    g = make_generator(seed)
    x, y = sample_episode(tasks, t_len, noise=noise, generator=g)
    b, n_x = tasks.n_tasks, tasks.n_in
    rand_q = torch.randn(t_len, b, n_random, n_x, generator=g, dtype=torch.float64).float()
    model.eval()
    f = lstm_query_outputs(model, lstm_inputs(x, y).float(), y.float(), probe_queries(rand_q, c))  # (T, B, Q, N_y)
    W, r2 = linear_readout(f, rand_q, c)  # (T, B, N_y, N_x), (T,)
    return LSTMProbe(
        ks=np.arange(t_len), W_hat=W.numpy(), recovery=mode_recovery(tasks, W).numpy(),
        linearity_r2=r2.numpy(), probe_scale=c,
    )
