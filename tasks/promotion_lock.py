"""The lock under which `champion` moves. MLflow has no compare-and-set for aliases: two runs finishing together
could each read the old champion and both take the alias, so the read-judge-move of one registered model happens
under a lock that every process which can move it shares. Which lock that is depends on the tracking store:

- a PostgreSQL store given directly (`MLFLOW_TRACKING_URI=postgresql://...`): a PostgreSQL advisory lock in that
  database, held by a connection of this process (freed by the server if the process dies);
- a tracking server (`http(s)://...`): a Prefect global concurrency limit of one slot on the Prefect server the
  process reports to (`PREFECT_API_URL`), with a lease the server takes back if its holder dies. It holds across
  machines when they report to the same Prefect server, as a work pool's workers do;
- a local store (SQLite): a file lock, since only processes of this machine can open it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import mlflow

from tasks.base_model import machine_lock

_logger = logging.getLogger("loraflow.register")


@contextlib.contextmanager
def promotion_lock(name: str) -> Iterator[str]:
    """Hold the lock for `name`'s champion; yields what it is (recorded on the version it decides)."""
    uri = mlflow.get_tracking_uri()
    scheme = urlsplit(uri).scheme.split("+")[0]
    key = f"{uri}\n{name}"
    if scheme == "postgresql":
        with _advisory_lock(uri, key) as held:
            yield held
    elif scheme in ("http", "https") and os.environ.get("PREFECT_API_URL"):
        with _global_concurrency_limit(name, key) as held:
            yield held
    else:
        if scheme in ("http", "https"):
            _logger.warning(f"{name}: no Prefect server (PREFECT_API_URL) to hold the champion lock on; it is a file "
                            "lock, so runs on other machines are not serialised")
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


def limit_name(name: str, key: str) -> str:
    """A Prefect limit name for one model on one tracking server (Prefect names refuse '/', '%', '&', '<', '>')."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:60]
    return f"loraflow-champion-{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _global_concurrency_limit(name: str, key: str) -> Iterator[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    limit = limit_name(name, key)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
        except ObjectAlreadyExists:
            pass
    with concurrency(limit, occupy=1, strict=True):
        yield f"Prefect global concurrency limit {limit}"
