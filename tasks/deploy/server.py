"""The server: the FastAPI app (tasks/deploy/app.py) on uvicorn, in a thread, and the watcher that keeps the alias's
version current. A model served beyond this machine needs an API key, or the user's explicit `--insecure`."""

from __future__ import annotations

import ipaddress
import threading
import time
from dataclasses import dataclass

import uvicorn

from conf.schema import UserError
from tasks.deploy.app import ServerLimits, build_app
from tasks.deploy.follower import AliasFollower, FollowerEvents
from tasks.deploy.metrics import ServerMetrics

API_KEY_ENV = "LORAFLOW_API_KEY"


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """A host other than loopback serves anyone who can reach the port: refused without a key unless `insecure`."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key and not insecure:
        raise UserError(f"--host {host} serves the model beyond this machine: give --api-key (or {API_KEY_ENV}), or "
                        "pass --insecure to serve it without one")


@dataclass
class Deployment:
    """A running server and its alias watcher."""

    server: uvicorn.Server
    watching: threading.Event
    serving: threading.Thread
    metrics: ServerMetrics

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.watching.set()
        self.server.should_exit = True
        self.serving.join(30)


def deploy(follower: AliasFollower, host: str, port: int, poll_seconds: float, limits: ServerLimits | None = None,
           api_key: str | None = None) -> Deployment:
    """Load the alias's version, then serve it and watch the alias in background threads."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(follower.name, follower.alias)
    follower.events = FollowerEvents(switched=metrics.switched, refused=metrics.refused, batch=metrics.batch.observe)
    follower.refresh()
    if follower.live is None:
        raise LookupError(f"{follower.name}@{follower.alias}: no version could be loaded (see the log above)")
    server = uvicorn.Server(uvicorn.Config(build_app(follower, limits, metrics, api_key), host=host, port=port,
                                           log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    serving = threading.Thread(target=server.run, name="loraflow-deploy-http", daemon=True)
    serving.start()
    while not server.started:
        if not serving.is_alive():
            raise OSError("the address is in use, or not this machine's")
        time.sleep(0.05)
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(poll_seconds):
            follower.refresh()

    threading.Thread(target=watch, name="loraflow-deploy-watch", daemon=True).start()
    return Deployment(server, watching, serving, metrics)
