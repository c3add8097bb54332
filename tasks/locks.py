"""The one file lock: filelock's, re-entrant within a process (a flow that holds a run's lock calls stages that take
it again), for what processes of one machine share: a run's work folder, the model cache, a new local store."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout


def _lock(path: Path) -> FileLock:
    # One object per path in the process, its hold count shared by every thread: re-entrant for the whole process.
    return FileLock(path, thread_local=False, is_singleton=True)


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the lock file `path` while inside (waiting for it, or with `wait` off yielding False at once when another
    process holds it)."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(path)
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
    """Whether this process holds the lock file `path`."""
    return _lock(Path(path).resolve()).is_locked
