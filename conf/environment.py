"""Settings for the tools loraflow drives, applied before any of them is imported.

Prefect keeps its state in the project, and neither Prefect nor MLflow tries to phone home (no machine
here can reach it, and Prefect logs an error each time it tries). Values the user already set win.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

DEFAULT_TRACKING_DIR = Path("mlruns")
CONSOLE_LOG_LEVEL = {"prefect": "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "mlflow": "MLFLOW_LOGGING_LEVEL"}


def tool_defaults(project_dir: Path) -> dict[str, str]:
    tracking_dir = (project_dir / DEFAULT_TRACKING_DIR).resolve()
    return {
        "PREFECT_HOME": str((project_dir / ".prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The embedded server's 20 s start-up limit was missed once on this 2-core machine under load.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' weight-loading bar too; the Trainer's training bar stays
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        # A quiet console: Prefect's line per task run and MLflow's INFO lines (system metrics) only with --verbose.
        # Prefect's INFO lines still reach its server (the flow run's logs in its UI); only its console skips them.
        CONSOLE_LOG_LEVEL["prefect"]: "WARNING",
        CONSOLE_LOG_LEVEL["mlflow"]: "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        # An MLflow server (`loraflow ui`, a test's) starts job-runner processes for MLflow's GenAI jobs (scorers,
        # prompt optimisation), which loraflow never submits: about 6 s of CPU each, several per server.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # MLflow retries a failed request 7 times, with back-off sleeps adding up to about 4 minutes, holding
        # training still; with these it gives up after about 7 s and loraflow carries on offline (tasks/tracking.py).
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tracking_dir / 'mlflow.db'}",
        "LORAFLOW_ARTIFACT_ROOT": (tracking_dir / "artifacts").as_uri(),
    }


def apply_tool_defaults(project_dir: Path | None = None) -> None:
    """Set what the user has not. A user's own MLFLOW_TRACKING_URI (a tracking server) keeps its own artifact
    store: the local artifact folder is then not set."""
    defaults = tool_defaults(project_dir or Path.cwd())
    if "MLFLOW_TRACKING_URI" in os.environ:
        del defaults["LORAFLOW_ARTIFACT_ROOT"]
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # PEFT reads transformers' deprecated `is_gradient_checkpointing` on every model it wraps: nothing of ours to change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def shown_uri(uri: str) -> str:
    """`uri` with its password masked, for anything printed, logged or kept: a store or server URL may carry one
    (postgresql://user:secret@host/db) and the record must not."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user_info, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user_info.split(':', 1)[0]}:***@{host}"))
