"""Waiting for a server this process started to answer its health check."""

from __future__ import annotations

import subprocess
import time
import urllib.request


def wait_until_healthy(url: str, server: subprocess.Popen, seconds: float, interval: float = 0.5) -> bool:
    """True once GET `url` answers; False as soon as the `server` process exits or `seconds` pass.

    Hand-written: a retry library would poll the URL, not notice the server that died meanwhile.
    """
    deadline = time.monotonic() + seconds
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=min(5.0, seconds)):
                return True
        except OSError:
            time.sleep(interval)
    return False
