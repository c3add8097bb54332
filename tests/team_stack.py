"""A team's stack on loopback, as real programs: PostgreSQL (Debian's package) on a throwaway data folder, an
`mlflow server` on it with a served artifact store, and a Prefect server on it. Each is started here and stopped by
its PID (its process group), so nothing is left running. docs/operations.md, "Running it for a team", runs the same
commands by hand.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from flows.prefect_server import free_port
from tests.conftest import wait_for_http

USER = "loraflow"


def postgres_bin(program: str) -> str:
    """Debian keeps the server programs out of PATH, in /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(program) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {program} is not installed (apt-get install postgresql; `make test` does)")
    return found


def as_postgres_user() -> list[str]:
    """PostgreSQL refuses to run as root: as root (CI), its programs run as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server started in its own session, with everything it started, by its PID; killed if it takes over
    5 s (what it stored is in PostgreSQL, which is stopped last, with a fast shutdown)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass


@dataclass
class TeamStack:
    folder: Path
    password: str
    pg_port: int = 0
    processes: list[subprocess.Popen] = field(default_factory=list)
    mlflow_url: str = ""
    prefect_api_url: str = ""

    def database_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{USER}:{self.password}@127.0.0.1:{self.pg_port}/{database}"

    def launch(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start a server in a session of its own, its output in <folder>/<name>.log."""
        with open(self.folder / f"{name}.log", "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.processes.append(process)
        return process

    def start_postgres(self) -> None:
        data = self.folder / "pgdata"
        password_file = self.folder / "pgpass"
        password_file.write_text(self.password + "\n")
        sockets = self.folder / "sockets"
        sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
            for path in (password_file, sockets):
                shutil.chown(path, "postgres")
        subprocess.run([*as_postgres_user(), postgres_bin("initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
                        f"--pwfile={password_file}", "-E", "UTF8"], check=True, capture_output=True)
        password_file.unlink()
        self.pg_port = free_port()
        server = self.launch("postgres", [*as_postgres_user(), postgres_bin("postgres"), "-D", str(data),
                                          "-p", str(self.pg_port), "-c", "listen_addresses=127.0.0.1",
                                          "-k", str(sockets)])
        env = os.environ | {"PGPASSWORD": self.password}
        deadline = time.monotonic() + 60
        while subprocess.run([postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(self.pg_port)],
                             capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "PostgreSQL did not start"
            time.sleep(0.3)
        for database in ("mlflow", "prefect"):
            subprocess.run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", USER, database],
                           check=True, env=env, capture_output=True)

    def start_mlflow(self) -> None:
        """The backend store's URL (password in it) reaches the server through its environment, not its argv."""
        port = free_port()
        env = os.environ | {"MLFLOW_BACKEND_STORE_URI": self.database_url("mlflow")}
        server = self.launch("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                                        "--port", str(port), "--workers", "1",
                                        "--artifacts-destination", str(self.folder / "artifacts")], env)
        self.mlflow_url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{self.mlflow_url}/health", server, 180)

    def start_prefect(self) -> None:
        port = free_port()
        env = os.environ | {
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url("prefect", "postgresql+asyncpg"),
            "PREFECT_HOME": str(self.folder / "prefect-server"),
        }
        env.pop("PREFECT_API_URL", None)
        server = self.launch("prefect", [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                         "--port", str(port), "--no-ui"], env)
        self.prefect_api_url = f"http://127.0.0.1:{port}/api"
        wait_for_http(f"{self.prefect_api_url}/health", server, 180)

    def dump(self, database: str) -> str:
        """The whole database as SQL text (pg_dump): what the store holds, for looking through."""
        return subprocess.run([postgres_bin("pg_dump"), "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", USER, database],
                              check=True, capture_output=True, text=True,
                              env=os.environ | {"PGPASSWORD": self.password}).stdout

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            stop(process, signal.SIGINT if process is self.processes[0] else signal.SIGTERM)


def team_stack_folder() -> Path:
    """Under /tmp, not pytest's 0700 folder, which the `postgres` user cannot enter."""
    return Path(tempfile.mkdtemp(prefix="loraflow-team-"))
