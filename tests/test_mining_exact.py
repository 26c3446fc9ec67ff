"""Exactness of the mining state (fixed-point sums in any order, coverage bookkeeping), the --amp path on CPU
autocast against float32, and the device plumbing (non-blocking copies, clear errors without CUDA)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from helpers import image_batch, make_timm_vit
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdissect import dissect
from qkdissect.adapters import wrap_model
from qkdissect.errors import QKDissectError
from qkdissect.mining.checkpoints import Coverage
from qkdissect.mining.engine import MiningEngine
from qkdissect.mining.state import FIXED_BITS, fixed_sum, fixed_to_float, to_fixed

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


def exact(value: float) -> Fraction:
    """The fixed-point value a float becomes: round(value·2²⁴)/2²⁴ (ties to even, as torch.round)."""
    return Fraction(round(Fraction(value) * 2**FIXED_BITS), 2**FIXED_BITS)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_fixed_point_sums_are_exact_in_any_order(values, rng):
    limbs = to_fixed(torch.tensor(values, dtype=torch.float64))
    total = fixed_sum(limbs, dim=0)
    hi, lo = (int(v) for v in total)
    assert Fraction(hi * 2**32 + lo, 2**FIXED_BITS) == sum(exact(v) for v in values)
    order = list(range(len(values)))
    rng.shuffle(order)
    pieces = [fixed_sum(limbs[order[i:i + 3]], dim=0) for i in range(0, len(order), 3)]
    assert torch.equal(fixed_sum(torch.stack(pieces), dim=0), total)  # any grouping, any order: same limbs
    assert float(fixed_to_float(total)) == pytest.approx(sum(values), rel=1e-12, abs=len(values) * 2.0**-FIXED_BITS)


def test_fixed_point_refuses_what_it_cannot_hold():
    for bad in (float("nan"), float("inf"), 2.0**40):
        with pytest.raises(QKDissectError, match="not finite or overflow"):
            to_fixed(torch.tensor([1.0, bad], dtype=torch.float64))


def test_coverage_unions_fit_together_or_are_refused(tmp_path):
    a = Coverage()
    a.add(0, 0, 4, False)
    a.add(0, 4, 5, True)
    a.add(2, 0, 3, False)
    assert a.whole == {0} and a.parts == {2: [0, 3, False]}
    b = Coverage()
    b.add(2, 3, 7, True)
    b.add(1, 0, 2, True)
    union = Coverage.union([a, b], tmp_path)
    assert union.whole == {0, 1, 2} and union.complete(3)
    assert Coverage.from_json(union.to_json()).whole == {0, 1, 2}
    assert union.to_json() == {"whole": [[0, 3]], "parts": []}
    overlap = Coverage()
    overlap.add(2, 2, 5, False)
    with pytest.raises(QKDissectError, match="do not fit together"):
        Coverage.union([a, overlap], tmp_path)
    gap = Coverage()
    gap.add(3, 1, 4, True)
    with pytest.raises(QKDissectError, match="do not fit together"):
        Coverage.union([gap], tmp_path)
    assert Coverage.union([a], tmp_path).start_of(2) == 3 and a.start_of(0) is None and a.start_of(5) == 0


@pytest.fixture(scope="module")
def model():
    return wrap_model(make_timm_vit(seed=21), spec="test:tiny-timm-vit")


@pytest.fixture(scope="module")
def atlas(model):
    return dissect(model, dtype="float64", null_samples=10)


def test_bf16_autocast_path_matches_float32(model, atlas):
    """--amp bf16 on CPU: the forward pass runs in bfloat16, the projections and the state stay float32 /
    exact; scores agree with float32 to the bf16 tolerance and the top image of every clear slot is the same."""
    grid = model.adapter.patch_grid(model.preprocessing.image_size)
    pixels = image_batch(6, seed=3)
    index = torch.arange(6)
    engines = {amp: MiningEngine(model, atlas, range(atlas.n_layers), top_k=3, map_modes=[0, 1], grid=grid, amp=amp)
               for amp in (None, "bf16")}
    (full, full_stats), (half, half_stats) = (e.candidates(e.project_batch(pixels), index) for e in engines.values())
    assert half.scores.dtype == torch.float32 and half.maps.dtype == torch.float16
    assert half_stats.total.dtype == torch.int64
    scale = full.scores.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    assert float(((half.scores - full.scores).abs() / scale).max()) < 0.1
    clear = (full.scores[..., 0] - full.scores[..., 1]) > 0.1 * scale[..., 0]
    assert clear.float().mean() > 0.3
    assert torch.equal(half.image[..., 0][clear], full.image[..., 0][clear])
    # the forward pass really ran in bfloat16 (otherwise the results would be bitwise equal)
    assert not torch.equal(half.scores, full.scores)
    with pytest.raises(QKDissectError, match="--amp"):
        MiningEngine(model, atlas, [0], top_k=3, map_modes=[], grid=grid, amp="int8")


def test_pixels_go_to_the_device_without_blocking(model, atlas):
    """The engine copies pixels and image ids with non_blocking=True (overlapping the copy from pinned memory with
    compute on CUDA); checked on CPU with a tensor subclass that records every .to() call."""
    calls, watched = [], []

    class Spy(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and any(args[0] is w for w in watched):
                calls.append(dict(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs)

    grid = model.adapter.patch_grid(model.preprocessing.image_size)
    engine = MiningEngine(model, atlas, [0, 1], top_k=2, map_modes=[0], grid=grid)
    watched += [image_batch(2).as_subclass(Spy), torch.arange(2).as_subclass(Spy)]
    engine.candidates(engine.project_batch(watched[0]), watched[1])
    assert len(calls) == 2 and all(call.get("non_blocking") is True for call in calls)


def test_cuda_without_cuda_is_one_clear_error(model, tmp_path, monkeypatch):
    from qkdissect.mining import mine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 56), "red").save(tmp_path / "img" / "a.png")
    with pytest.raises(QKDissectError, match="CUDA is not available"):
        mine(model, tmp_path / "img", tmp_path / "out", device="cuda")
    with pytest.raises(QKDissectError, match="not a device name"):
        mine(model, tmp_path / "img", tmp_path / "out", device="gpu0")
    with pytest.raises(QKDissectError, match="--amp"):
        mine(model, tmp_path / "img", tmp_path / "out", amp="fp8")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_the_loader_pins_memory_for_cuda_runs(model, tmp_path, monkeypatch):
    """mine() asks the DataLoader for pinned memory exactly when the device is CUDA (checked by recording the
    loader's arguments; the CUDA device itself is faked, the run stops at the first batch)."""
    import qkdissect.mining.run as run

    seen = {}

    def fake_loader(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(run, "batch_loader", fake_loader)
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 56), "red").save(tmp_path / "img" / "a.png")
    with pytest.raises(RuntimeError, match="stop here"):
        run.mine(model, tmp_path / "img", tmp_path / "cpu")
    assert seen["pin_memory"] is False
    monkeypatch.setattr(run, "_device", lambda name: torch.device("cpu"))

    class FakeCuda:  # what _Run sees as its device: type "cuda", moves are no-ops on CPU tensors
        type = "cuda"

        def __str__(self):
            return "cuda:0"

    monkeypatch.setattr(run, "_distributed", lambda device: (0, 1, FakeCuda(), False))
    monkeypatch.setattr(run, "MiningEngine", lambda *a, **k: type("E", (), {"route_kinds": []})())
    monkeypatch.setattr(run, "empty_state", lambda *a, **k: (None, None))
    model.model.to = lambda device: model.model  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            run.mine(model, tmp_path / "img", tmp_path / "cuda")
    finally:
        del model.model.to
    assert seen["pin_memory"] is True
