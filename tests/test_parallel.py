"""qkdissect.parallel: order kept, errors raised, torch's thread count restored, no nesting."""

from __future__ import annotations

import threading

import pytest
import torch

from qkdissect.parallel import chunk_bounds, single_threaded_kernels, thread_map, worker_count


@pytest.fixture
def three_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(threads)


def test_chunk_bounds_cover_the_range_in_order():
    for n in (0, 1, 7, 45, 144):
        for workers in (1, 2, 3, 5):
            bounds = chunk_bounds(n, workers)
            assert len(bounds) == workers and bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:]))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_thread_map_keeps_order_runs_single_threaded_kernels_and_restores_threads(three_threads):
    seen = []

    def piece(i: int) -> int:
        seen.append((threading.current_thread().name, torch.get_num_threads(), worker_count(100)))
        return i * i

    assert worker_count(100) == 3 and worker_count(100, min_per_worker=40) == 2 and worker_count(5, 16) == 1
    assert thread_map(piece, list(range(7)), 3) == [i * i for i in range(7)]
    assert all(name.startswith("qkdissect-worker") and threads == 1 and nested == 1 for name, threads, nested in seen)
    assert torch.get_num_threads() == 3


def test_thread_map_raises_the_pieces_error_and_still_restores_threads(three_threads):
    def piece(i: int) -> int:
        if i == 4:
            raise ValueError("piece 4 failed")
        return i

    with pytest.raises(ValueError, match="piece 4 failed"):
        thread_map(piece, list(range(6)), 2)
    assert torch.get_num_threads() == 3


def test_single_threaded_kernels_nests_and_restores_the_outer_count(three_threads):
    with single_threaded_kernels():
        assert torch.get_num_threads() == 1 and worker_count(100) == 3  # the count to restore still decides
        with single_threaded_kernels():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3


def test_a_generator_is_advanced_in_order_in_the_calling_thread_with_bounded_items_in_flight(three_threads):
    produced, finished = [], []
    lock = threading.Lock()
    caller = threading.current_thread().name

    def items():
        for i in range(10):
            with lock:
                assert len(produced) - len(finished) <= 3  # at most `workers` waiting or running
            assert threading.current_thread().name == caller
            produced.append(i)
            yield i

    def piece(i: int) -> int:
        with lock:
            finished.append(i)
        return -i

    assert thread_map(piece, items(), 3) == [-i for i in range(10)]
    assert produced == list(range(10)) and sorted(finished) == list(range(10))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_forked_child_gets_a_working_pool(three_threads):
    """After the parent has used its pool, a forked child (data-loader workers are forked) can still map."""
    import multiprocessing

    assert thread_map(abs, [-1, -2, -3], 2) == [1, 2, 3]  # the parent's pool threads exist now
    context = multiprocessing.get_context("fork")
    pool = context.Pool(1)
    try:
        assert pool.apply_async(_map_in_child, ()).get(timeout=30) == [1, 2, 3]  # a stale pool would hang
    finally:
        pool.terminate()


def _map_in_child() -> list[int]:
    return thread_map(abs, [-1, -2, -3], 2)
