"""Prefect's embedded server, started early: Prefect's embedded mode starts a temporary local server when a
process runs its first flow (about 13 s on this 2-core machine). Started in the background when a command
begins, it comes up while the command imports its libraries and checks the recipe, on the other core.

With PREFECT_API_URL set (a running Prefect server) there is nothing to start. Prefect's notices that it starts
and stops that server are dropped: a command that stops early with one line for a user's mistake stays one line.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable


def _not_a_server_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Starting temporary server", "Stopping temporary server"))


def start_in_background() -> Callable[[], float]:
    """Begin starting the embedded server; the returned function waits for it and returns the seconds it waited."""
    if os.environ.get("PREFECT_API_URL"):
        return lambda: 0.0
    # Prefect logs the notices on its top logger itself; a logger's filter does not touch its children's records
    # (the flow and task run logs).
    logging.getLogger("prefect").addFilter(_not_a_server_notice)

    # Imported here, not in the thread: two threads importing one package's modules can deadlock on import locks.
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    def start() -> None:
        # The same server object Prefect's client starts on its own when the first flow runs (one per process).
        SubprocessASGIServer().start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())

    starter = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    starter.start()

    def wait() -> float:
        began = time.perf_counter()
        starter.join()
        return time.perf_counter() - began

    return wait


def start_server(port: int, timeout: float = 120) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port`, returned once its API answers (scheduling needs a real server:
    the embedded one refuses deployments with schedules)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"the Prefect server on 127.0.0.1:{port} did not start (is the port taken?)") from None
            time.sleep(0.5)
