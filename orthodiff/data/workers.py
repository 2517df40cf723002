"""Running independent tasks on every core: checked worker counts and an ordered process map."""

from __future__ import annotations

import os
import sys
import threading
import time

from ..errors import OrthodiffError


def resolve_workers(workers: int | None, option: str = "--workers") -> int:
    """None means every core; a count must be a positive whole number (one line otherwise)."""
    if workers is None:
        return os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise OrthodiffError(f"{option} {workers!r}: must be a positive number of processes; omit it to use every core")
    return workers


def process_map(function, tasks: list, workers: int, chunksize: int = 4):
    """``[function(task) for task in tasks]`` on ``workers`` processes, results in task order.

    Forked workers (spawned where fork is missing) each run one thread; one task or one worker
    runs in this process.
    """
    workers = min(workers, len(tasks))
    if workers <= 1:
        return [function(task) for task in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=one_thread_worker,
                             initargs=(os.getpid(),)) as pool:
        return list(pool.map(function, tasks, chunksize=max(1, min(chunksize, len(tasks) // (workers * 4) or 1))))


def one_thread_worker(parent_pid: int) -> None:
    """Pool worker setup: numerical libraries and torch use one thread (the pool supplies the
    parallelism), and the worker exits when its parent dies, so a killed command leaves no worker
    computing on or holding its memory."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"  # read by torch when the worker imports it
    if "torch" in sys.modules:  # a forked worker inherits an imported torch: tell it directly
        sys.modules["torch"].set_num_threads(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()


def _exit_when_orphaned(parent_pid: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every_s)
    os._exit(1)
