"""Saxe et al.'s exact mode dynamics: closed form, ODE, half-times, discrete recursion."""

from __future__ import annotations

import numpy as np
import pytest

from qkdissect.dynamics import (
    discrete_mode_strength,
    half_time,
    mode_strength,
    saxe_depth2,
    time_to_fraction,
)

SPEC_DEPTH2 = [1542.5, 1900.2, 2485.7, 3627.2, 6907.8]
SPEC_DEPTH4 = [5217.0, 7808.0, 15529.0]


def test_depth2_half_times_match_spec_to_a_tenth_of_an_epoch() -> None:
    t = half_time([5, 4, 3, 2, 1], 1e-6, depth=2, tau=1000.0)
    np.testing.assert_allclose(t, SPEC_DEPTH2, atol=0.1)


def test_depth4_half_times_match_spec_within_half_a_percent() -> None:
    t = half_time([3, 2, 1], 1e-3, depth=4, tau=1000.0)
    np.testing.assert_allclose(t, SPEC_DEPTH4, rtol=0.005)


def test_depth4_half_time_closed_form_of_the_integral() -> None:
    # For N = 4, t½ = (τ/4) ∫ da / (a^{3/2}(s − a)); with x = √a the antiderivative is
    # (2/s) [−1/x + artanh(x/√s)/√s], evaluated between √a0 and √(s/2).
    s, a0, tau = 3.0, 1e-3, 1000.0

    def prim(x: float) -> float:
        return (2.0 / s) * (-1.0 / x + np.arctanh(x / np.sqrt(s)) / np.sqrt(s))

    exact = tau / 4.0 * (prim(np.sqrt(s / 2)) - prim(np.sqrt(a0)))
    assert half_time([s], a0, depth=4, tau=tau)[0] == pytest.approx(exact, rel=1e-9)


def test_closed_form_solves_the_ode_and_hits_half_strength_at_half_time() -> None:
    s = np.array([5.0, 2.0, 0.7])
    t = np.linspace(0, 20000, 2001)
    a = saxe_depth2(s, 1e-4, t, tau=1000.0)
    # τ da/dt = 2 a (s − a), checked by central differences
    dadt = np.gradient(a, t, axis=0)
    rhs = 2 * a * (s - a) / 1000.0
    assert np.max(np.abs(dadt - rhs)[5:-5]) < 1e-3 * np.max(np.abs(rhs))
    th = half_time(s, 1e-4, depth=2, tau=1000.0)
    np.testing.assert_allclose(saxe_depth2(s, 1e-4, th, 1000.0).diagonal(), s / 2, rtol=1e-10)


@pytest.mark.parametrize("depth", [3, 4, 6])
def test_ode_reaches_fraction_at_quadrature_time(depth: int) -> None:
    s = np.array([3.0, 2.0, 1.0])
    for f in (0.1, 0.5, 0.9):
        tf = time_to_fraction(s, 1e-3, f, depth=depth, tau=500.0)
        a = mode_strength(s, 1e-3, tf, depth=depth, tau=500.0).diagonal()
        np.testing.assert_allclose(a, f * s, rtol=1e-6)


def test_depth1_and_depth2_formulas() -> None:
    t = np.array([0.0, 700.0, 3000.0])
    a1 = mode_strength([2.0], 0.1, t, depth=1, tau=1000.0)[:, 0]
    np.testing.assert_allclose(a1, 2.0 - 1.9 * np.exp(-t / 1000.0))
    assert half_time([2.0], 0.1, depth=1, tau=1000.0)[0] == pytest.approx(1000 * np.log(1.9))


def test_discrete_recursion_converges_to_gradient_flow_as_lr_shrinks() -> None:
    s = np.array([3.0, 1.0])
    devs = []
    for lr in (1e-2, 1e-3):
        n = int(round(8.0 / lr))
        d = discrete_mode_strength(s, 1e-3, n, depth=4, lr=lr)
        c = mode_strength(s, 1e-3, np.arange(n + 1), depth=4, tau=1.0 / lr)
        devs.append(np.max(np.abs(d - c) / s))
    assert devs[1] < devs[0] / 5  # first-order in lr
    assert devs[1] < 0.01


def test_deeper_networks_have_sharper_transitions() -> None:
    # 10%→90% rise time relative to the half-time shrinks with depth at fixed a0 (sigmoids sharpen)
    ratios = []
    for depth in (2, 4, 8):
        t10 = time_to_fraction([1.0], 1e-4, 0.1, depth=depth)[0]
        t90 = time_to_fraction([1.0], 1e-4, 0.9, depth=depth)[0]
        ratios.append((t90 - t10) / half_time([1.0], 1e-4, depth=depth)[0])
    assert ratios[0] > ratios[1] > ratios[2]
