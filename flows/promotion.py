"""The champion lock shared between machines that report to one Prefect server: a Prefect global concurrency limit
of one slot, with a lease the server takes back if its holder dies (tasks/promotion_lock.py picks when it is used).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator

from tasks.promotion_lock import SharedLock


def limit_name(name: str, key: str) -> str:
    """A Prefect limit name for one model on one tracking server (Prefect names refuse '/', '%', '&', '<', '>')."""
    readable = re.sub(r"[^A-Za-z0-9_.-]", "-", name)[:60]
    return f"loraflow-champion-{readable}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def global_concurrency_limit(name: str, key: str) -> Iterator[str]:
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


def shared_lock() -> SharedLock | None:
    """Prefect's limit where this process reports to a Prefect server, else none (a file lock, with a warning)."""
    return global_concurrency_limit if os.environ.get("PREFECT_API_URL") else None
