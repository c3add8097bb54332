"""The lock under which `champion` moves. MLflow has no compare-and-set for aliases: two runs finishing together
could each read the old champion and both take the alias, so the read-judge-move of one registered model happens
under a lock that every process which can move it shares. Which lock that is depends on the tracking store:

- a PostgreSQL store given directly (`MLFLOW_TRACKING_URI=postgresql://...`): a PostgreSQL advisory lock in that
  database, held by a connection of this process (freed by the server if the process dies);
- a tracking server (`http(s)://...`): the lock the caller shares between machines (`across_machines`: the flows
  pass a Prefect global concurrency limit, flows/promotion.py), else a file lock with a warning;
- a local store (SQLite): a file lock, since only processes of this machine can open it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from urllib.parse import urlsplit

import mlflow

from tasks.base_model import machine_lock

_logger = logging.getLogger("loraflow.register")
# (model name, key of the model on its tracking server) -> a lock held across machines, yielding what it is
SharedLock = Callable[[str, str], AbstractContextManager[str]]


@contextlib.contextmanager
def promotion_lock(name: str, across_machines: SharedLock | None = None) -> Iterator[str]:
    """Hold the lock for `name`'s champion; yields what it is (recorded on the version it decides)."""
    uri = mlflow.get_tracking_uri()
    scheme = urlsplit(uri).scheme.split("+")[0]
    key = f"{uri}\n{name}"
    if scheme == "postgresql":
        with _advisory_lock(uri, key) as held:
            yield held
    elif scheme in ("http", "https") and across_machines is not None:
        with across_machines(name, key) as held:
            yield held
    else:
        if scheme in ("http", "https"):
            _logger.warning(f"{name}: no lock shared between machines (a Prefect server, PREFECT_API_URL) to hold the "
                            "champion lock on; it is a file lock, so runs on other machines are not serialised")
        with machine_lock("registry", key):
            yield "file lock (this machine)"


@contextlib.contextmanager
def _advisory_lock(uri: str, key: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    engine = create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": number})
            try:
                yield f"PostgreSQL advisory lock {number}"
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": number})
    finally:
        engine.dispose()
