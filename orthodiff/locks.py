"""One writer at a time per output folder: a run that finds another one writing there waits for it.

The lock is ``filelock``'s (``flock`` underneath): the system releases it when its holder exits,
even by ``kill -9``, so a crashed run never leaves a folder locked.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def exclusive(folder, name: str, what: str) -> Iterator[None]:
    """Hold ``folder/.<name>.lock`` for the block; when another process holds it, say so on stderr
    once (``what`` names the other run, e.g. "prepare") and wait until it is released."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / f".{name}.lock", thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"orthodiff: another {what} is writing {folder}; waiting for it to finish", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
