"""The Haar null sampler has the distribution of decomposing Gaussian matrices (KS tests, fixed seeds); the null
cache returns exactly what would be computed and never a wrong or broken entry."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from qkdissect import gaussian_null
from qkdissect.cache import cache_dir
from qkdissect.metrics import _null_dense, _null_factored, _null_haar, weighted_cosine


@pytest.mark.parametrize("d_model, d_head", [(24, 6), (40, 6), (97, 13), (10, 6)])
def test_haar_sampler_has_the_dense_distribution(d_model, d_head):
    """Weighted cosines, first / last cosines and singular values: two-sample KS against the literal sampler
    (W_q, W_k Gaussian, decomposed), and against the previous factored sampler where it applies."""
    n = 2000
    S_d, cos_d = _null_dense(d_model, d_head, n, np.random.default_rng(0))
    S_h, cos_h = _null_haar(d_model, d_head, n, np.random.default_rng(1))
    assert S_h.shape == (n, d_head) and cos_h.shape == (n, d_head)
    assert bool((S_h[:, :-1] >= S_h[:, 1:]).all())  # descending, as the SVD gives them
    references = [(S_d, cos_d)]
    if d_model >= 2 * d_head:
        references.append(_null_factored(d_model, d_head, n, np.random.default_rng(2)))
    for S_r, cos_r in references:
        assert ks_2samp(weighted_cosine(S_r, cos_r), weighted_cosine(S_h, cos_h)).pvalue > 0.001
        for k in (0, d_head // 2, d_head - 1):
            assert ks_2samp(cos_r[:, k], cos_h[:, k]).pvalue > 0.001
            assert ks_2samp(S_r[:, k], S_h[:, k]).pvalue > 0.001
    # the cosines of one head are dependent in the same way: the spread of their sum matches
    assert ks_2samp(cos_d.sum(-1), cos_h.sum(-1)).pvalue > 0.001


def test_a_wrong_sampler_would_be_caught():
    """The KS tests above have power: the sampler of a space half as wide (visibly wider cosines) fails them."""
    n = 2000
    _, cos_d = _null_dense(40, 6, n, np.random.default_rng(0))
    _, cos_narrow = _null_haar(20, 6, n, np.random.default_rng(1))
    assert ks_2samp(cos_d.flatten(), cos_narrow.flatten()).pvalue < 1e-6


def test_auto_picks_haar_and_bands_agree_with_dense():
    dense = gaussian_null(60, 7, n_samples=2000, method="dense", seed=3, cache=False)
    fast = gaussian_null(60, 7, n_samples=2000, seed=3, cache=False)
    assert fast.method == "haar"
    assert fast.weighted_band[1] == pytest.approx(dense.weighted_band[1], rel=0.15)
    assert fast.cosine_band[0] == pytest.approx(dense.cosine_band[0], rel=0.1)
    from qkdissect import QKDissectError

    with pytest.raises(QKDissectError, match="haar"):
        gaussian_null(5, 7, n_samples=20, method="haar")


def test_null_cache_returns_exactly_the_computed_band(tmp_path, monkeypatch):
    monkeypatch.setenv("QKDISSECT_CACHE_DIR", str(tmp_path / "cache"))
    computed = gaussian_null(48, 6, n_samples=300, seed=4, percentile=98.0, cache=False)
    assert not (tmp_path / "cache").exists()
    first = gaussian_null(48, 6, n_samples=300, seed=4, percentile=98.0)
    entries = list((tmp_path / "cache" / "null").glob("*.json"))
    assert len(entries) == 1 and first == computed
    again = gaussian_null(48, 6, n_samples=300, seed=4, percentile=98.0)
    assert again == computed
    # every argument is part of the key
    for other in (dict(seed=5), dict(percentile=97.0), dict(n_samples=301), dict(method="dense")):
        gaussian_null(48, 6, **{**dict(n_samples=300, seed=4, percentile=98.0), **other})
    gaussian_null(49, 6, n_samples=300, seed=4, percentile=98.0)
    assert len(list((tmp_path / "cache" / "null").glob("*.json"))) == 6
    monkeypatch.setenv("QKDISSECT_CACHE", "0")  # switched off: nothing read or written
    gaussian_null(50, 6, n_samples=300)
    assert len(list((tmp_path / "cache" / "null").glob("*.json"))) == 6


def test_null_cache_never_serves_a_broken_or_foreign_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("QKDISSECT_CACHE_DIR", str(tmp_path))
    computed = gaussian_null(30, 5, n_samples=200, seed=1, cache=False)
    gaussian_null(30, 5, n_samples=200, seed=1)
    (entry,) = (tmp_path / "null").glob("*.json")
    document = json.loads(entry.read_text())
    # a tampered value (checksum fails), a foreign key (hash collision), a truncated file, a non-object
    tampered = {**document, "value": {**document["value"], "weighted_band": [-1.0, 1.0]}}
    foreign = {**document, "key": {**document["key"], "seed": 99}}
    for content in (json.dumps(tampered), json.dumps(foreign), entry.read_text()[:50], "[1, 2]", ""):
        entry.write_text(content)
        assert gaussian_null(30, 5, n_samples=200, seed=1) == computed
        assert json.loads(entry.read_text())["value"] == document["value"]  # rewritten whole


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QKDISSECT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "qkdissect"
    monkeypatch.setenv("QKDISSECT_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_unwritable_cache_is_no_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("QKDISSECT_CACHE_DIR", str(blocker / "below"))
    assert gaussian_null(30, 5, n_samples=100, seed=2) == gaussian_null(30, 5, n_samples=100, seed=2, cache=False)


HAMMER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("qk_cache", sys.argv[1])
cache = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cache)  # the module alone: no torch import, so the four writers really overlap
ok = True
for round_ in range(int(sys.argv[2])):
    key = {"entry": round_ % 3}
    value = cache.cached_json("hammer", key, lambda: {"payload": [key["entry"]] * 5000})
    ok = ok and value == {"payload": [key["entry"]] * 5000}
print("ok" if ok else "WRONG")
"""


def test_cache_is_safe_under_concurrent_writers(tmp_path):
    """Four processes read and write the same three entries at once: every read is a whole, correct value and
    no temporary file is left."""
    import subprocess
    import sys

    import qkdissect.cache

    env = {**os.environ, "QKDISSECT_CACHE_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-c", HAMMER, qkdissect.cache.__file__, "300"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert [out.strip() for out, _ in outputs] == ["ok"] * 4, outputs
    names = sorted(p.name for p in (tmp_path / "hammer").iterdir())
    assert len(names) == 3 and all(n.endswith(".json") for n in names)


def test_haar_sampler_is_deterministic_per_seed():
    a = _null_haar(64, 8, 50, np.random.default_rng(7))
    b = _null_haar(64, 8, 50, np.random.default_rng(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
