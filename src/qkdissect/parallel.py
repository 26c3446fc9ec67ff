"""Run independent pieces of CPU linear algebra in parallel threads (a leaf: torch only).

torch's batched QR, SVD and eigenvalue routines decompose one small matrix after the other, and the threaded
LAPACK of a 64 × 64 or 768 × 64 matrix keeps the cores only half busy; LAPACK releases the GIL, so contiguous
chunks of a batch (or independent layers) decomposed in ``torch.get_num_threads()`` Python threads use the cores
fully. While the pieces run, torch (and so MKL/OpenMP) is set to one thread, so that W workers never start
W × T kernel threads: on 2 cores, 4 torch threads oversubscribed that way made a ViT-B factored SVD take 16 s
instead of 0.2 s. Every piece is computed by the same calls as it would be sequentially; the split depends only
on the number of pieces and torch's thread count.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

__all__ = ["chunk_bounds", "single_threaded_kernels", "thread_map", "worker_count"]

T = TypeVar("T")
R = TypeVar("R")

_PREFIX = "qkdissect-worker"
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()
_single = {"depth": 0, "saved": 1}  # nesting count of single_threaded_kernels() and the thread count to restore


def worker_count(n_pieces: int, min_per_worker: int = 1) -> int:
    """Threads worth using for ``n_pieces`` pieces of at least ``min_per_worker`` each: at most torch's thread
    count, and 1 inside a worker thread (no nesting)."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    with _lock:
        threads = _single["saved"] if _single["depth"] else torch.get_num_threads()
    return max(1, min(threads, n_pieces // max(1, min_per_worker)))


def chunk_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ranges [start, stop) covering 0..n, sizes differing by at most one."""
    edges = [n * i // workers for i in range(workers + 1)]
    return list(zip(edges[:-1], edges[1:]))


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> list[R]:
    """``[fn(item) for item in items]``, in ``workers`` threads when ``workers`` ≥ 2 (order kept; the first
    exception is raised once the pieces already started have ended).

    ``items`` may be a generator: it is advanced in the calling thread, in order, while the workers compute, and
    at most ``workers`` items wait or run at a time — so a generator of large random draws stays in bounded
    memory and its draws overlap the computation.
    """
    if workers < 2:
        return [fn(item) for item in items]
    pool = _shared_pool(workers)
    results: list[R] = []
    pending: collections.deque[Future[R]] = collections.deque()
    with single_threaded_kernels():
        try:
            for item in items:
                if len(pending) >= workers:
                    results.append(pending.popleft().result())
                pending.append(pool.submit(fn, item))
            while pending:
                results.append(pending.popleft().result())
        finally:
            for future in pending:  # after an error: let the started pieces end before threads are restored
                future.cancel() or future.exception()
    return results


@contextlib.contextmanager
def single_threaded_kernels() -> Iterator[None]:
    """torch's intra-op thread count set to 1 inside the block and restored after it (re-entrant and safe across
    threads: the last block to end restores the count the first one found)."""
    with _lock:
        if _single["depth"] == 0:
            _single["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _single["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _single["depth"] -= 1
            if _single["depth"] == 0:
                torch.set_num_threads(_single["saved"])


def _forget_pool_after_fork() -> None:
    """A forked child (a data-loader or drawing worker) has none of the parent's threads: give it a fresh pool
    and lock instead of one whose workers do not exist there."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()
    _single["depth"] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size < workers:  # torch's thread count grew
            if _pool is not None:
                _pool.shutdown(wait=False)  # its queued pieces still run; then its threads end
            _pool, _pool_size = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_PREFIX), workers
        return _pool
