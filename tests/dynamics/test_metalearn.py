"""SGD learners (staggered, Saxe timing) and the LSTM meta-learner's probe (exact on a linear stand-in)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qkdissect.dynamics.incontext import concurrency, make_prior_tasks, sample_episode
from qkdissect.dynamics.incontext.metalearn import (
    LSTMMetaLearner,
    lstm_inputs,
    lstm_query_outputs,
    meta_train,
    probe_lstm,
    sgd_learner,
)
from qkdissect.errors import QKDissectError

S = [3.0, 1.5, 0.6]
N_X, N_Y = 5, 4


def test_sgd_learner_is_staggered_strongest_first_and_follows_saxe() -> None:
    task = make_prior_tasks(S, N_X, N_Y, n_tasks=48, seed=1)
    lr = 0.02
    tr = sgd_learner(task, hidden=12, lr=lr, batch=8, n_steps=1500, a0=1e-3, record_every=5, seed=2)
    mean = tr.recovery.mean(1)
    c = concurrency(tr.steps, mean, S)
    assert not c.censored and c.order_matches_strengths is True
    assert c.half_points[0] < c.half_points[-1]
    assert c.index > 0.3  # clearly staggered
    # Saxe depth-2 half-time with each task's effective a0: t½ = (τ/2s) ln(s/a_eff − 1), τ = 1/lr
    s = np.asarray(S)
    predicted = np.median((1 / lr) / (2 * s) * np.log(s / tr.effective_a0 - 1), axis=0)
    np.testing.assert_allclose(c.half_points, predicted, rtol=0.15)
    assert tr.loss[-1] < 0.01 * tr.loss[0]


class LinearStandIn(nn.Module):
    """A 'meta-learner' whose prediction is exactly linear in the query: ŷ_t = (c Σ_{j<t} y_j x_jᵀ) x_t.

    Same interface as LSTMMetaLearner: reads z_t = (x_t, y_{t−1}); state = (S, x_prev), batch on dim 1.
    """

    def __init__(self, n_x: int, n_y: int, c: float):
        super().__init__()
        self.n_x, self.n_y, self.c = n_x, n_y, c

    def forward(self, z, state=None):
        b = z.shape[0]
        if state is None:
            state = (torch.zeros(1, b, self.n_y * self.n_x), torch.zeros(1, b, self.n_x))
        acc, x_prev = state[0][0].reshape(b, self.n_y, self.n_x), state[1][0]
        preds = []
        for t in range(z.shape[1]):
            x_t, y_prev = z[:, t, : self.n_x], z[:, t, self.n_x :]
            acc = acc + self.c * y_prev[:, :, None] * x_prev[:, None, :]
            preds.append((acc @ x_t[:, :, None])[..., 0])
            x_prev = x_t
        return torch.stack(preds, 1), (acc.reshape(1, b, -1), x_prev[None])


def test_probe_reads_the_exact_map_of_a_linear_meta_learner() -> None:
    task = make_prior_tasks(S, N_X, N_Y, n_tasks=6, seed=3)
    c = 0.25
    model = LinearStandIn(N_X, N_Y, c)
    t_len = 7
    probe = probe_lstm(model, task, episode_length=t_len, probe_scale=0.5, seed=4)
    x, y = sample_episode(task, t_len, generator=torch.Generator().manual_seed(4))  # the probe's episode
    for k in range(t_len):
        expected = c * y[:, :k].transpose(-1, -2) @ x[:, :k]  # Ŵ_k = c Σ_{j<=k} y_j x_jᵀ
        np.testing.assert_allclose(probe.W_hat[k], expected.numpy(), atol=1e-5)
    assert np.all(probe.linearity_r2[1:] > 1 - 1e-6)
    assert probe.recovery.shape == (t_len, 6, len(S))


def test_probe_queries_do_not_alter_the_context() -> None:
    torch.manual_seed(0)
    model = LSTMMetaLearner(N_X, N_Y, hidden=9).eval()
    task = make_prior_tasks(S, N_X, N_Y, n_tasks=3, seed=5)
    x, y = sample_episode(task, 6, generator=torch.Generator().manual_seed(1))
    z = lstm_inputs(x, y).float()
    own, _ = model(z)
    extra = torch.randn(6, 3, 2, N_X)
    queries = torch.cat([x.float().transpose(0, 1)[:, :, None], extra], dim=2)  # query 0 = x_{k+1}
    f = lstm_query_outputs(model, z, y.float(), queries)
    torch.testing.assert_close(f[:, :, 0], own.transpose(0, 1), atol=1e-6, rtol=1e-5)


def test_meta_training_lowers_held_out_error() -> None:
    torch.manual_seed(0)
    model = LSTMMetaLearner(1, 1, hidden=16)  # 1-D tasks y = ±x: one sample reveals the sign
    train = make_prior_tasks([1.0], 1, 1, n_tasks=200, seed=1)
    test = make_prior_tasks([1.0], 1, 1, n_tasks=64, seed=2)
    log = meta_train(model, train, test, n_steps=300, batch=16, episode_length=6, lr=1e-2, n_evals=4, seed=3)
    assert log.test_loss[-1] < 0.5 * log.test_loss[0]
    assert log.test_loss_per_step.shape == (log.steps.size, 6)


def test_probe_rejects_mismatched_tasks() -> None:
    model = LSTMMetaLearner(N_X, N_Y, hidden=4)
    with pytest.raises(QKDissectError, match="N_x"):
        probe_lstm(model, make_prior_tasks(S, N_X + 1, N_Y, n_tasks=2), episode_length=3)
