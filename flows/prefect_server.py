"""The Prefect server a command's flow runs report to.

Left alone, Prefect's embedded mode starts a temporary server inside the process when the first flow runs (about
13 s on this 2-core machine, all of it waited for). Instead, a command starts `prefect server start` (API only) on
a free loopback port as its first act and points PREFECT_API_URL at it: the server comes up on the other core
while the command imports torch and transformers and checks the recipe, and it stops when the command ends.

With PREFECT_API_URL set (a running Prefect server), nothing is started. `loraflow serve` starts a full server
(scheduler and UI) with `start_server`.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from tasks.health import wait_until_healthy


OWN_SERVER_ENV = "LORAFLOW_COMMAND_PREFECT_URL"  # the server this command started, which stops when it ends


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process before it runs: stop it when the command dies, even by SIGKILL (Linux only)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def launch_server(port: int, *options: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def wait_for_server(server: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Until the server's API answers; a server that exits or takes too long is stopped with a one-line error."""
    if not wait_until_healthy(f"http://127.0.0.1:{port}/api/health", server, timeout, interval=0.2):
        server.kill()
        raise RuntimeError(f"the Prefect server on 127.0.0.1:{port} did not start (is the port taken?)")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def start_server(port: int, timeout: float = 120) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` with its services and UI, returned once its API answers
    (scheduling needs a real server: the embedded one refuses deployments with schedules)."""
    server = launch_server(port)
    wait_for_server(server, port, timeout)
    return server


def start_in_background() -> Callable[[], float]:
    """Start the command's Prefect server; the returned function waits for it and returns the seconds it waited.

    Prefect reads PREFECT_API_URL once, when it is imported: in a process that has imported it already, Prefect is
    left to start its embedded server itself.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return lambda: 0.0
    port = free_port()
    server = launch_server(port, "--no-services", "--no-ui")
    atexit.register(stop_server, server)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    os.environ[OWN_SERVER_ENV] = os.environ["PREFECT_API_URL"]

    def wait() -> float:
        began = time.perf_counter()
        wait_for_server(server, port)
        return time.perf_counter() - began

    return wait
