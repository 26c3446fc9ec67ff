"""Transfer through a shared first layer: theory and simulation (spec §2, transfer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkdissect.dynamics import make_transfer_pair, simulate_transfer, transfer_theory

SMALL = dict(n_in=80, n_out_source=40, n_out_target=40)


def test_transfer_pair_has_the_requested_alignment_and_strengths() -> None:
    pair = make_transfer_pair(30, 7, 5, 3.0, 1.0, 0.6, n_seeds=4, seed=0)
    vs, vt = pair.source.teacher.V[..., 0], pair.target.teacher.V[..., 0]
    torch.testing.assert_close((vs * vt).sum(-1), torch.full((4,), 0.6, dtype=torch.float64))
    assert pair.stacked_sigma_hat.shape == (4, 12, 30)
    sv = torch.linalg.svdvals(pair.target.teacher.matrix)[:, 0]
    torch.testing.assert_close(sv, torch.ones(4, dtype=torch.float64))


def test_stacked_teacher_modes_from_theory_match_svd() -> None:
    th = transfer_theory(3.0, 1.0, 0.5, **SMALL)
    pair = make_transfer_pair(80, 40, 40, 3.0, 1.0, 0.5, n_seeds=2, seed=1)
    u, s, _ = torch.linalg.svd(pair.stacked_teacher)
    np.testing.assert_allclose(s[:, :2].numpy(), np.broadcast_to(th.stacked_strengths, (2, 2)), rtol=1e-10)
    share = (u[:, 40:, :2] ** 2).sum(1).numpy()  # target-block norm of each left vector
    np.testing.assert_allclose(share, np.broadcast_to(th.target_share, (2, 2)), rtol=1e-8)


@pytest.fixture(scope="module")
def sims() -> dict[float, object]:
    return {q: simulate_transfer(3.0, 1.0, q, n_seeds=8, seed=2, **SMALL) for q in (0.0, 1.0)}


def test_aligned_strong_source_gives_positive_transfer(sims) -> None:
    th = transfer_theory(3.0, 1.0, 1.0, **SMALL)
    sim = sims[1.0]
    assert th.benefit > 0.3
    assert sim.benefit > 0.3
    assert sim.benefit == pytest.approx(th.benefit, abs=0.1)


def test_misaligned_source_gives_negative_transfer(sims) -> None:
    # orthogonal input features: the joint problem only adds output noise dimensions
    th = transfer_theory(3.0, 1.0, 0.0, **SMALL)
    sim = sims[0.0]
    assert th.benefit < 0
    assert sim.benefit < 0


def test_benefit_grows_with_alignment_and_source_snr_in_theory() -> None:
    qs = [0.0, 0.25, 0.5, 0.75, 1.0]
    for s_s in (2.0, 4.0):
        b = [transfer_theory(s_s, 1.0, q, **SMALL).benefit for q in qs]
        assert np.all(np.diff(b) >= -1e-9), b
    weak = transfer_theory(0.5, 1.0, 1.0, **SMALL).benefit
    strong = transfer_theory(4.0, 1.0, 1.0, **SMALL).benefit
    assert weak < 0 < strong  # a weak source hurts even when aligned
