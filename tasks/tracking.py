"""MLflow helpers for the Prefect task wrappers: everything is addressed to an explicit run id.

Prefect may run a task in another thread, where MLflow's thread-local "active run" is not visible, so no
stage relies on it.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from conf.schema import UserError


class TrackingUnreachable(UserError):
    """The MLflow tracking server named by MLFLOW_TRACKING_URI does not answer."""


STEP_METRIC = "train_loss"
SAMPLES_TABLE = "eval/during_training.json"


def check_tracking_store(timeout: float = 10.0) -> None:
    """Before any work: a tracking server answers its health check (MLflow's own client would retry for minutes).

    Local stores (sqlite, files) need no check.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise TrackingUnreachable(f"MLFLOW_TRACKING_URI {uri}: the tracking server does not answer ({reason})") from None


def step_logger(run_id: str) -> Callable[[int, dict[str, float]], None]:
    """A train-stage callback that logs one step's metrics to the run.

    A resumed run repeats the steps between its last checkpoint and the cut; those are already logged, so
    steps up to the last one logged are skipped and no step appears twice.
    """
    client = MlflowClient()
    last_logged = max((metric.step for metric in client.get_metric_history(run_id, STEP_METRIC)), default=0)

    def log(step: int, metrics: dict[str, float]) -> None:
        if step <= last_logged:
            return
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    return log


def sample_logger(run_id: str) -> Callable[[int, list[dict]], None]:
    """A train-stage callback that appends one step's sample answers (one row per prompt) to the run's table."""
    import pandas as pd

    client = MlflowClient()

    def log(step: int, rows: list[dict]) -> None:
        client.log_table(run_id, data=pd.DataFrame([{"step": step} | row for row in rows]), artifact_file=SAMPLES_TABLE)

    return log


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """A stage's summary metrics; a resumed run keeps the ones it already has rather than logging them twice."""
    client = MlflowClient()
    logged = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    fresh = [Metric(key, float(value), now, 0) for key, value in metrics.items() if key not in logged]
    if fresh:
        client.log_batch(run_id, metrics=fresh)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_loss_plot(run_id: str, artifact_file: str = "train/loss.png") -> None:
    """The run's logged training loss per step (all of it, across resumes) as a PNG artifact.

    MLflow's own charts need the UI; this picture travels with the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    history = sorted(MlflowClient().get_metric_history(run_id, STEP_METRIC), key=lambda metric: metric.step)
    axes.plot([metric.step for metric in history], [metric.value for metric in history])
    axes.set(xlabel="step", ylabel="train loss", title="training loss")
    axes.grid(alpha=0.3)
    MlflowClient().log_figure(run_id, figure, artifact_file)
    pyplot.close(figure)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, value)


@contextlib.contextmanager
def attached_run(run_id: str) -> Iterator[None]:
    """Make `run_id` the active run in this thread for APIs that only log to the active run (log_model).

    It may be the child of a run already active here (a sweep's point); its status is left as it was, since the
    flow that owns the run sets its final status.
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    status = MlflowClient().get_run(run_id).info.status
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield
    finally:
        mlflow.end_run(status=status)
