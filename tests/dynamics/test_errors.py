"""Bad parameters raise QKDissectError with a message that says what was expected and given."""

from __future__ import annotations

import pytest

from qkdissect.dynamics import (
    depth_sweep,
    generalization_theory,
    half_time,
    init_weights,
    inverse_spike,
    make_linear_task,
    make_transfer_pair,
    marchenko_pastur_density,
    mode_strength,
    saxe_depth2,
    simulate_generalization,
    simulate_modes,
    spike_overlap,
    spike_singular_value,
    transfer_theory,
)
from qkdissect.errors import QKDissectError


def _decoupled_too_narrow() -> None:
    task = make_linear_task([2, 1], 4, 4)
    init_weights("decoupled", [4, 1, 4], modes=(task.U, task.V))


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda: half_time([5, -1], 1e-6), ["strengths", "positive", "-1"]),
        (lambda: half_time([5, 0], 1e-6), ["positive"]),
        (lambda: half_time([], 1e-6), ["non-empty"]),
        (lambda: half_time([1, 2], 2.0), ["a0", "smaller", "2.0"]),
        (lambda: half_time([1, 2], 1.0), ["a0", "smaller"]),  # a0 = s is not allowed either
        (lambda: half_time([1, 2], 0.0), ["a0", "positive"]),
        (lambda: half_time([1, 2], 1e-3, depth=0), ["depth", ">= 1", "0"]),
        (lambda: half_time([1, 2], 1e-3, depth=2.5), ["depth", "integer"]),
        (lambda: half_time([1, 2], 1e-3, tau=-1), ["tau", "positive"]),
        (lambda: mode_strength([1.0], 1e-3, [-5.0]), ["t", ">= 0"]),
        (lambda: saxe_depth2([float("nan")], 1e-3, [0.0]), ["finite"]),
        (lambda: spike_singular_value(2.0, 1.5), ["aspect_ratio", "<= 1", "1.5", "Transpose"]),
        (lambda: spike_overlap(2.0, 0.0), ["aspect_ratio", "positive"]),
        (lambda: inverse_spike(-2.0, 0.5), ["s_hat", "non-negative"]),
        (lambda: marchenko_pastur_density([1.0], 2.0), ["aspect_ratio"]),
        (lambda: generalization_theory([3.0], 50, 100), ["aspect_ratio", "<= 1"]),
        (lambda: generalization_theory([3.0, -1.0], 100, 100), ["strengths", "positive"]),
        (lambda: simulate_generalization([3.0], 100, 100, init="orthogonal"), ["init", "decoupled"]),
        (lambda: simulate_modes([3.0, 1.0], depth=0), ["depth"]),
        (lambda: simulate_modes([3.0, 1.0], a0=5.0), ["a0", "smaller"]),
        (lambda: simulate_modes([3.0, 1.0], init="xavier"), ["init", "decoupled", "xavier"]),
        (lambda: simulate_modes([3.0, 1.0], lr=0.0), ["lr", "positive"]),
        (lambda: init_weights("decoupled", [3, 3]), ["modes"]),
        (lambda: _decoupled_too_narrow(), ["hidden", ">= the number of modes (2)"]),
        (lambda: make_linear_task([3, 2, 1], n_in=2), ["n_in", "3"]),
        (lambda: make_transfer_pair(10, 5, 5, 3.0, 1.0, 1.5), ["alignment", "[0, 1]"]),
        (lambda: transfer_theory(3.0, 1.0, 0.5, n_in=50, n_out_source=40, n_out_target=40),
         ["(N_oS + N_oT)/N_i", "<= 1"]),
        (lambda: depth_sweep((2, 0)), ["depth"]),
        (lambda: depth_sweep((2,), ("he",)), ["init", "he"]),
    ],
)
def test_bad_parameters_raise_clear_errors(call, words) -> None:
    with pytest.raises(QKDissectError) as info:
        call()
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
