"""Depth sweep: orthogonal vs scaled-Gaussian initialisation (spec §1)."""

from __future__ import annotations

import numpy as np

from qkdissect.dynamics import depth_sweep


def test_orthogonal_init_time_grows_far_less_with_depth_than_gaussian() -> None:
    sw = depth_sweep((2, 4, 8), ("orthogonal", "gaussian"), (4, 3, 2, 1, 0.5), lr=4e-2,
                     max_steps=3000, n_seeds=6, seed=0)
    med = np.median(np.where(np.isnan(sw.times), np.inf, sw.times), axis=-1)  # (init, depth)
    orth, gauss = med
    assert np.all(np.isfinite(orth))
    # orthogonal: within a factor 4 from depth 2 to depth 8 (measured 59 → 96 epochs, ×1.6)
    assert orth[-1] / orth[0] < 4
    # scaled Gaussian: at least 10× slower at depth 8 (measured 39 → 1064 epochs, ×27)
    assert gauss[-1] / gauss[0] > 10
    assert gauss[-1] > 3 * orth[-1]
    np.testing.assert_allclose(sw.lrs, [4e-2, 2e-2, 1e-2])


def test_decoupled_sweep_matches_its_theory() -> None:
    sw = depth_sweep((2, 3), ("decoupled",), (3, 1), lr=5e-2, a0=1e-2, max_steps=3000, n_seeds=2)
    assert np.all(np.isfinite(sw.times))
    # discrete steps vs gradient flow: within 2% (lr·s = 0.15 at depth 2)
    np.testing.assert_allclose(sw.times[0], np.repeat(sw.theory_times[0][:, None], 2, 1), rtol=0.02)
