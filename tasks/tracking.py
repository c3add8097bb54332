"""MLflow helpers for the Prefect task wrappers: everything is addressed to an explicit run id.

Prefect may run a task in another thread, where MLflow's thread-local "active run" is not visible, so no
stage relies on it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


def step_logger(run_id: str) -> Callable[[int, dict[str, float]], None]:
    """A train-stage callback that logs one step's metrics to the run."""
    client = MlflowClient()

    def log(step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    return log


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    now = int(time.time() * 1000)
    MlflowClient().log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def log_loss_plot(run_id: str, losses: list[float], artifact_file: str = "train/loss.png") -> None:
    """The training loss per step as a PNG artifact (MLflow's charts need the UI; this travels with the run)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    axes.plot(range(1, len(losses) + 1), losses)
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
    """Make `run_id` the active run in this thread for APIs that only log to the active run (log_model)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    mlflow.start_run(run_id=run_id)
    try:
        yield
    finally:
        # Leave the run RUNNING: the flow that owns it sets its final status.
        mlflow.end_run(status="RUNNING")
