"""A process pool for per-image CRF work, with a bounded number of images in flight."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator


def make_pool(workers: int) -> Executor | None:
    """workers: 0 -> one process per core, 1 -> no pool (in-process). Spawned, so no torch state is forked."""
    n = workers or os.cpu_count() or 1
    if n <= 1:
        return None
    return ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn"))


def bounded_map(pool: Executor | None, fn: Callable, jobs: Iterable, window: int = 16) -> Iterator:
    """Ordered map that keeps at most `window` jobs queued, so big images never pile up in memory."""
    if pool is None:
        yield from map(fn, jobs)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
