"""Full-matrix gradient-descent simulations against the exact theory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkdissect.dynamics import (
    discrete_mode_strength,
    gradient_descent,
    half_time,
    init_weights,
    make_linear_task,
    mode_strength,
    network_product,
    simulate_modes,
)


@pytest.fixture(scope="module")
def depth2() -> object:
    return simulate_modes([5, 4, 3, 2, 1], depth=2, a0=1e-6, lr=1e-3, n_steps=14_000, n_seeds=2)


def test_gradient_matches_autograd_with_distinct_sizes() -> None:
    # distinct sizes everywhere, so a transposed or mis-ordered factor fails loudly
    sizes = [7, 5, 9, 6]  # N_i=7, hidden 5 and 9, N_o=6
    ws = init_weights("gaussian", sizes, n_batch=3, seed=1)
    g = torch.Generator().manual_seed(2)
    sig_yx = torch.randn(3, 6, 7, generator=g, dtype=torch.float64)
    x = torch.randn(3, 7, 7, generator=g, dtype=torch.float64)
    sig_xx = x @ x.transpose(-1, -2) / 7
    lr = 0.05
    tr = gradient_descent(ws, sig_yx, lr, 1, sigma_xx=sig_xx)
    wa = [w.clone().requires_grad_() for w in ws]
    p = network_product(wa)
    loss = 0.5 * torch.einsum("boi,bij,boj->", p, sig_xx, p) - (sig_yx * p).sum()
    loss.backward()
    for w0, w1, wg in zip(ws, tr.weights, wa):
        assert w1.shape == w0.shape
        torch.testing.assert_close(w1, w0 - lr * wg.grad, rtol=0, atol=1e-13)


def test_depth2_simulation_within_one_percent_of_closed_form(depth2: object) -> None:
    sim = depth2
    theory = mode_strength(sim.target, 1e-6, sim.steps, depth=2, tau=1000.0)
    dev = np.abs(sim.strengths - theory[:, None, :]).max(axis=(0, 1)) / sim.target
    assert dev.max() < 0.01  # spec: max|Δa|/s < 0.01 (measured 0.0084 for s=5: step-size error)
    # simulated half-times within 0.3% of the analytic ones (lag = discretisation, ~3 epochs)
    analytic = np.broadcast_to(half_time(sim.target, 1e-6), (2, 5))
    np.testing.assert_allclose(sim.half_times(), analytic, rtol=3e-3)


def test_depth2_simulation_equals_discrete_recursion_to_rounding(depth2: object) -> None:
    sim = depth2
    d = discrete_mode_strength(sim.target, 1e-6, 14_000, depth=2, lr=1e-3)
    assert np.max(np.abs(sim.strengths - d[:, None, :])) < 1e-10
    assert sim.off_mode_norm.max() < 1e-10  # decoupled init stays decoupled


def test_depth4_simulation_matches_ode_and_spec_half_times() -> None:
    sim = simulate_modes([3, 2, 1], depth=4, a0=1e-3, lr=1e-3, n_steps=20_000, n_seeds=1, hidden=5)
    # a0 is the product's strength: each of the 4 layers starts at a0^{1/4} along the mode
    w0 = init_weights("decoupled", [3, 5, 5, 5, 3], a0=1e-3, modes=(torch.eye(3)[None].double(),) * 2)
    assert torch.linalg.svdvals(w0[1])[0, 0].item() == pytest.approx(1e-3 ** 0.25)
    theory = mode_strength(sim.target, 1e-3, sim.steps, depth=4, tau=1000.0)
    dev = np.abs(sim.strengths[:, 0] - theory).max(0) / sim.target
    assert dev.max() < 0.01
    np.testing.assert_allclose(sim.half_times()[0], [5217, 7808, 15529], rtol=0.005)


def test_small_random_init_learns_modes_in_order_with_effective_a0_timing() -> None:
    s = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    sim = simulate_modes(s, depth=2, a0=1e-6, lr=1e-3, n_steps=12_000, init="random", n_seeds=4, hidden=50)
    ht = sim.half_times()
    assert np.all(np.isfinite(ht))
    assert np.all(np.diff(ht, axis=1) > 0), "modes must appear in order of strength in every seed"
    # each mode is a sigmoid: it ends at its target
    np.testing.assert_allclose(sim.strengths[-1], np.broadcast_to(s, (4, 5)), rtol=1e-3)
    # timing: decoupled prediction with a0 -> a_eff = |W2ᵀu + W1 v|²/4 is within 3%
    pred = 1000.0 / (2 * s) * np.log(s / sim.effective_a0 - 1)
    assert np.max(np.abs(ht / pred - 1)) < 0.03
    # ... while the nominal a0 misses by several percent
    assert np.max(np.abs(ht / half_time(s, 1e-6) - 1)) > 0.03


def test_deep_random_init_still_learns_in_order() -> None:
    sim = simulate_modes([3, 2, 1], depth=4, a0=1e-3, lr=1e-3, n_steps=16_000, init="random",
                         n_seeds=4, hidden=32, record_every=10)
    ht = sim.half_times()
    assert np.all(np.isfinite(ht))
    assert np.all(np.diff(ht, axis=1) > 0)


def test_orthogonal_init_layers_are_orthogonal_and_task_is_haar() -> None:
    ws = init_weights("orthogonal", [4, 6, 3], n_batch=2, gain=0.5, seed=0)
    assert ws[0].shape == (2, 6, 4) and ws[1].shape == (2, 3, 6)
    eye4 = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
    eye3 = torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    torch.testing.assert_close(ws[0].transpose(-1, -2) @ ws[0], 0.25 * eye4)
    torch.testing.assert_close(ws[1] @ ws[1].transpose(-1, -2), 0.25 * eye3)
    task = make_linear_task([3, 1], n_in=5, n_out=4, n_tasks=3, seed=0)
    assert task.matrix.shape == (3, 4, 5)
    torch.testing.assert_close(
        torch.linalg.svdvals(task.matrix)[:, :2], torch.tensor([[3.0, 1.0]] * 3, dtype=torch.float64)
    )
    torch.testing.assert_close(task.mode_strengths(task.matrix), task.strengths)
