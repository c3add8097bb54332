"""The one file lock: filelock's, for what processes of one machine share: a run's work folder, the model cache, a
new local store, a local registry's champion."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout


def _lock(path: Path, process_wide: bool) -> FileLock:
    # One object per path in the process. Its hold count is per thread (other threads of the process wait, as other
    # processes do), or with `process_wide` shared by every thread of the process.
    return FileLock(path, thread_local=not process_wide, is_singleton=True)


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True, process_wide: bool = False) -> Iterator[bool]:
    """Hold the lock file `path` while inside, waiting for it (with `wait` off, yielding False at once when another
    holds it). Re-entrant in the thread that holds it; with `process_wide`, in every thread of this process (a run's
    lock, taken by the command and again by the flow on whichever thread Prefect runs it)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path, process_wide)
    try:
        lock.acquire(blocking=wait)
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def holds(path: Path) -> bool:
    """Whether this process holds the process-wide lock file `path`."""
    return _lock(Path(path).resolve(), process_wide=True).is_locked
