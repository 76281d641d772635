"""Process pools for per-image CRF work and training batches (core.loader), with a bounded number of jobs
in flight."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int, sig: int = signal.SIGKILL) -> None:
    """This process gets `sig` when its parent exits (Linux prctl PR_SET_PDEATHSIG; elsewhere nothing), so
    a runner killed with SIGKILL leaves no orphan behind: a worker blocked on its dead parent's pipe would
    never exit. `parent`: the pid the caller expects as parent; if it is gone already, exit now."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the prctl: no signal will come
        os._exit(1)


def spawn_pool(n: int) -> ProcessPoolExecutor:
    """n spawned worker processes (no torch state is forked) that die with this process: they hold no
    state, so they are killed outright when it dies."""
    return ProcessPoolExecutor(
        max_workers=n,
        mp_context=mp.get_context("spawn"),
        initializer=die_with_parent,
        initargs=(os.getpid(),),
    )


def make_pool(workers: int) -> Executor | None:
    """workers: 0 -> one process per core, 1 -> no pool (in-process); see spawn_pool."""
    n = workers or os.cpu_count() or 1
    if n <= 1:
        return None
    return spawn_pool(n)


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
