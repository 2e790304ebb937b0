"""The worker processes of a sweep: ``workers`` spawned processes kept busy with its points.

Workers die with the sweep: each asks the kernel for SIGKILL when its parent dies (Linux
``prctl(PR_SET_PDEATHSIG)``), or, where that is unavailable, watches its parent from a thread
and exits when it is gone. A sweep killed outright (SIGKILL) thus leaves no run going on
beside the next sweep's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .runner import run_point

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _set_parent_death_signal() -> bool:
    """Have the kernel SIGKILL this process when its parent dies; False where it cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, interval: float = 0.5) -> threading.Thread:
    """A daemon thread that ends this process once ``parent_pid`` is no longer its parent."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="tprop-watch-parent", daemon=True)
    thread.start()
    return thread


def die_with_parent(parent_pid: int) -> None:
    """A worker's initializer: end this process when the sweep process ``parent_pid`` dies."""
    if not _set_parent_death_signal():
        watch_parent(parent_pid)
    elif os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def run_parallel(todo: list[int], workers: int, task: Callable[[int], dict[str, Any]],
                 started: Callable[[int], None],
                 finished: Callable[[int, dict[str, Any]], None]) -> None:
    """Keep ``workers`` spawned processes busy with the points ``todo``, in order.

    ``task(i)`` is point ``i``'s job for :func:`~tprop.lab.runner.run_point`; ``started(i)``
    is called as it is handed out, ``finished(i, result)`` with its result (a failed result
    when its worker died).
    """
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                   initializer=die_with_parent, initargs=(os.getpid(),))

    queue = list(todo)
    pool = new_pool()
    running: dict[Any, int] = {}
    try:
        while queue or running:
            while queue and len(running) < workers:
                i = queue.pop(0)
                started(i)
                running[pool.submit(run_point, task(i))] = i
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                i = running.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool as e:
                    broken = True
                    result = {"status": "failed",
                              "error": f"worker process died ({e or 'killed'})"}
                except Exception as e:  # noqa: BLE001 - e.g. a result that failed to pickle
                    result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                finished(i, result)
            if broken:  # every run in flight died with the pool: record them, start afresh
                for i in list(running.values()):
                    finished(i, {"status": "failed", "error": "worker process died"})
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = new_pool()
    finally:
        pool.shutdown(wait=not running, cancel_futures=True)
