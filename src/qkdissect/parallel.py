"""Run independent pieces of CPU linear algebra in parallel threads (a leaf: torch only).

torch's batched QR, SVD and eigenvalue routines decompose one small matrix after the other, and the threaded
LAPACK of a 64 × 64 or 768 × 64 matrix keeps the cores only half busy; LAPACK releases the GIL, so contiguous
chunks of a batch (or independent layers) decomposed in ``torch.get_num_threads()`` Python threads use the cores
fully. Every piece is computed by the same calls as it would be sequentially; the split depends only on the
number of pieces and torch's thread count.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

import torch

__all__ = ["chunk_bounds", "thread_map", "worker_count"]

T = TypeVar("T")
R = TypeVar("R")

_PREFIX = "qkdissect-worker"
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def worker_count(n_pieces: int, min_per_worker: int = 1) -> int:
    """Threads worth using for ``n_pieces`` pieces of at least ``min_per_worker`` each: at most torch's thread
    count, and 1 inside a worker thread (no nesting)."""
    if threading.current_thread().name.startswith(_PREFIX):
        return 1
    return max(1, min(torch.get_num_threads(), n_pieces // max(1, min_per_worker)))


def chunk_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """``workers`` contiguous ranges [start, stop) covering 0..n, sizes differing by at most one."""
    edges = [n * i // workers for i in range(workers + 1)]
    return list(zip(edges[:-1], edges[1:]))


def thread_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """``[fn(item) for item in items]``, in ``workers`` threads when ``workers`` ≥ 2 (order kept; the first
    exception is raised once all pieces have ended)."""
    if workers < 2 or len(items) < 2:
        return [fn(item) for item in items]
    pool = _shared_pool(workers)
    futures = [pool.submit(fn, item) for item in items]
    return [future.result() for future in futures]


def _shared_pool(workers: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < workers:  # torch's thread count grew
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=_PREFIX)
        return _pool
