"""Every MLflow call of a run, addressed to an explicit run id: the flows' Prefect tasks (flows/stages.py) and the
training workers log through here; the stages themselves never do.

Prefect may run a task in another thread, where MLflow's thread-local "active run" is not visible, so nothing here
relies on it.

Each logging call is a small JSON entry applied through `_send`. While a flow holds its run in `flow_run`, a
tracking server that goes away does not end the run: the entries it cannot take are kept, in order, in the run's
`unlogged.jsonl`, and `replay` applies them later (`loraflow sync RUN_ID`). MLflow has no offline mode for a
remote tracking server, so this record is hand-written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conf.environment import shown_uri
from conf.schema import UserError
from tasks.base_model import machine_lock


class TrackingUnreachable(UserError):
    """The MLflow tracking store named by MLFLOW_TRACKING_URI cannot be used: a server that does not answer, or a
    local store that cannot be opened."""


STEP_METRIC = "train_loss"
SAMPLES_TABLE = "eval/during_training.json"
UNLOGGED_FILE = "unlogged.jsonl"

Entry = dict[str, Any]
Apply = Callable[[MlflowClient, str, Entry], None]

_logger = logging.getLogger("loraflow.tracking")
_records: dict[str, Path] = {}  # run id -> its unlogged record, for the runs a flow in this process holds
_record_lock = threading.Lock()


def check_tracking_store(timeout: float = 10.0) -> None:
    """Before any work: the tracking store can be used. A server must answer its health check (MLflow's own client
    would retry for minutes); a local store (SQLite) is opened, which also sets up its tables on first use."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        reason = _unanswered(timeout)
        if reason is not None:
            raise TrackingUnreachable(f"MLFLOW_TRACKING_URI {shown_uri(uri)}: the tracking server does not answer ({reason})")
        return
    try:
        # MLflow creates and migrates a new SQLite store's tables on first open; two processes doing it at once fail
        # ("Online migration expected to match one row"), so one process at a time opens a local store.
        with machine_lock("store", uri):
            MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # MLflow raises its own errors and SQLAlchemy's alike for a store it cannot open
        reason = str(error).strip().splitlines()[0][:300]
        raise TrackingUnreachable(f"MLFLOW_TRACKING_URI {shown_uri(uri)}: the tracking store cannot be opened ({reason})") from None


def _unanswered(timeout: float) -> str | None:
    """Why the tracking server does not answer its health check, or None when it does (or the store is local)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (OSError, ValueError) as error:
        return str(getattr(error, "reason", None) or error)
    return None


def _log_artifact(client: MlflowClient, run_id: str, entry: Entry) -> None:
    path = Path(entry["path"])
    if path.is_dir():
        client.log_artifacts(run_id, str(path), entry["artifact_path"])
    else:
        client.log_artifact(run_id, str(path), entry["artifact_path"])


def _log_new_metrics(client: MlflowClient, run_id: str, entry: Entry) -> None:
    """Summary metrics; a resumed run keeps the ones it already has rather than logging them twice."""
    logged = client.get_run(run_id).data.metrics
    fresh = [Metric(key, value, entry["timestamp"], 0) for key, value in entry["metrics"].items() if key not in logged]
    if fresh:
        client.log_batch(run_id, metrics=fresh)


def _log_inputs(client: MlflowClient, run_id: str, entry: Entry) -> None:
    import pandas as pd
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    def local_file(path: str):
        # Named as a local file outright: a bare path would match two registered sources, and MLflow warns.
        return get_dataset_source_from_json(json.dumps({"uri": path}), "local")

    client.log_inputs(run_id, datasets=[
        DatasetInput(
            mlflow.data.from_pandas(pd.read_json(dataset["path"], lines=True), source=local_file(dataset["path"]),
                                    name=dataset["name"], digest=dataset["digest"])._to_mlflow_entity(),
            [InputTag(MLFLOW_DATASET_CONTEXT, dataset["name"])],
        )
        for dataset in entry["datasets"]
    ])


def _log_loss_plot(client: MlflowClient, run_id: str, entry: Entry) -> None:
    """The run's logged training loss per step (all of it, across resumes) as a PNG artifact.

    MLflow's own charts need the UI; this picture travels with the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5))
    history = sorted(client.get_metric_history(run_id, STEP_METRIC), key=lambda metric: metric.step)
    axes.plot([metric.step for metric in history], [metric.value for metric in history])
    axes.set(xlabel="step", ylabel="train loss", title="training loss")
    axes.grid(alpha=0.3)
    client.log_figure(run_id, figure, entry["artifact_file"])
    pyplot.close(figure)


def _log_table(client: MlflowClient, run_id: str, entry: Entry) -> None:
    import pandas as pd

    client.log_table(run_id, data=pd.DataFrame(entry["rows"]), artifact_file=entry["artifact_file"])


APPLY: dict[str, Apply] = {
    "metrics": lambda client, run_id, entry: client.log_batch(
        run_id, metrics=[Metric(key, value, timestamp, step) for key, value, timestamp, step in entry["metrics"]]),
    "new_metrics": _log_new_metrics,
    "params": lambda client, run_id, entry: client.log_batch(
        run_id, params=[Param(key, value) for key, value in entry["params"].items()]),
    "tags": lambda client, run_id, entry: client.log_batch(
        run_id, tags=[RunTag(key, value) for key, value in entry["tags"].items()]),
    "artifact": _log_artifact,
    "table": _log_table,
    "inputs": _log_inputs,
    "loss_plot": _log_loss_plot,
    "end": lambda client, run_id, entry: client.set_terminated(run_id, entry["status"]),
}


def unlogged_record_path(run_id: str) -> Path | None:
    """Where the run's unlogged calls go, if a flow in this process holds the run (for its worker processes)."""
    return _records.get(run_id)


@contextlib.contextmanager
def recording_unlogged(run_id: str, path: Path | None) -> Iterator[None]:
    """While inside: should the tracking server go away, the run's calls are kept in `path` instead of failing."""
    if path is None:
        yield
        return
    _records[run_id] = path
    try:
        yield
    finally:
        del _records[run_id]


def offline_record(run_id: str) -> Path | None:
    """The run's unlogged record if its tracking server went away during this flow, else None."""
    path = _records.get(run_id)
    return path if path is not None and path.exists() else None


def keep_unlogged(run_id: str, entry: Entry) -> None:
    """Append `entry` to the run's unlogged record (which then exists: the run is offline from now on).

    One write of the whole line to a file opened for appending, then fsync: a crash leaves at most a torn last line,
    which reading skips, never a line of one entry mixed with another's.
    """
    line = (json.dumps(entry) + "\n").encode()
    with _record_lock:
        descriptor = os.open(_records[run_id], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _go_offline_or_raise(run_id: str, error: Exception) -> None:
    """After a failed call: if the run's tracking server is gone, the run goes offline; otherwise the call's own
    error stands (a bad request is not a lost server)."""
    reason = _unanswered(timeout=5) if run_id in _records else None
    if reason is None:
        raise error
    server = shown_uri(mlflow.get_tracking_uri())
    keep_unlogged(run_id, {"op": "lost", "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "uri": server, "error": reason})
    _logger.warning(f"the tracking server {server} went away ({reason}); the run goes on and keeps "
                    f"what it cannot log in {_records[run_id]}; `loraflow sync {run_id}` sends it once the server is back")


def _send(run_id: str, entry: Entry) -> None:
    """Apply one logging call to the run; when the run's tracking server has gone away, keep it for later instead."""
    if offline_record(run_id) is None:
        try:
            APPLY[entry["op"]](MlflowClient(), run_id, entry)
            return
        except (MlflowException, OSError) as error:  # MLflow reports a lost connection as either
            _go_offline_or_raise(run_id, error)
    keep_unlogged(run_id, entry)


def read_record(record: Path) -> tuple[list[Entry], int]:
    """The entries of an unlogged record (the first, "lost", says when, why and from which server), and how many
    torn lines (a crash mid-write) were skipped."""
    entries, torn = [], 0
    for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(entry, dict) and "op" in entry:
            entries.append(entry)
        else:
            torn += 1
    return entries, torn


def replay(run_id: str, record: Path, handlers: dict[str, Apply]) -> dict[str, int]:
    """Apply a run's unlogged record in order (`handlers` add entry kinds the flows record); returns the count of
    each kind applied. The record is rewritten after every entry, its "lost" line kept, so a replay cut short
    resumes where it stopped and still knows which server the run lost."""
    entries, _ = read_record(record)
    header = [entry for entry in entries if entry["op"] == "lost"]
    calls = [entry for entry in entries if entry["op"] != "lost"]
    apply = APPLY | handlers
    client = MlflowClient()
    applied: dict[str, int] = {}
    for done, entry in enumerate(calls, start=1):
        apply[entry["op"]](client, run_id, entry)
        applied[entry["op"]] = applied.get(entry["op"], 0) + 1
        rest = record.with_suffix(".rest")
        rest.write_text("".join(json.dumps(kept) + "\n" for kept in header + calls[done:]), encoding="utf-8")
        rest.replace(record)
    return applied


def end_run(run_id: str, status: str) -> None:
    """End the flow's active run; offline, its status waits in the record with the rest."""
    if offline_record(run_id) is None:
        mlflow.end_run(status)
        return
    keep_unlogged(run_id, {"op": "end", "status": status})
    # mlflow.end_run leaves MLflow's active run before it tells the server, which is not there to hear it: one try
    # (MLflow reads its retry count from the environment at each request).
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        with contextlib.suppress(MlflowException, OSError):
            mlflow.end_run(status)
    finally:
        if retries is None:
            del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = retries


@contextlib.contextmanager
def flow_run(output_dir: Path, **start_run: Any) -> Iterator[mlflow.ActiveRun]:
    """mlflow.start_run(**start_run) for a flow that owns its run and must outlive its tracking server.

    Should the server go away, the flow goes on: every call the run cannot log, its final status included, is kept
    in output_dir/<run id>/unlogged.jsonl in order.
    """
    run = mlflow.start_run(**start_run)
    run_id = run.info.run_id
    with recording_unlogged(run_id, output_dir / run_id / UNLOGGED_FILE):
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                end_run(run_id, status)


def _last_logged_step(run_id: str) -> int:
    if offline_record(run_id) is not None:
        return 0
    try:
        return max((metric.step for metric in MlflowClient().get_metric_history(run_id, STEP_METRIC)), default=0)
    except (MlflowException, OSError) as error:
        _go_offline_or_raise(run_id, error)
        return 0


def step_logger(run_id: str) -> Callable[[int, dict[str, float]], None]:
    """A train-stage callback that logs one step's metrics to the run.

    A resumed run repeats the steps between its last checkpoint and the cut; those are already logged, so
    steps up to the last one logged are skipped and no step appears twice.
    """
    last_logged = _last_logged_step(run_id)

    def log(step: int, metrics: dict[str, float]) -> None:
        if step <= last_logged:
            return
        now = int(time.time() * 1000)
        _send(run_id, {"op": "metrics", "metrics": [[key, value, now, step] for key, value in metrics.items()]})

    return log


def sample_logger(run_id: str) -> Callable[[int, list[dict]], None]:
    """A train-stage callback that appends one step's sample answers (one row per prompt) to the run's table."""

    def log(step: int, rows: list[dict]) -> None:
        log_table(run_id, [{"step": step} | row for row in rows], SAMPLES_TABLE)

    return log


def log_metrics(run_id: str, metrics: dict[str, float]) -> None:
    """A stage's summary metrics; a resumed run keeps the ones it already has rather than logging them twice."""
    _send(run_id, {"op": "new_metrics", "metrics": {key: float(value) for key, value in metrics.items()},
                   "timestamp": int(time.time() * 1000)})


def log_params(run_id: str, params: dict[str, str]) -> None:
    _send(run_id, {"op": "params", "params": params})


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    _send(run_id, {"op": "tags", "tags": tags})


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """A file or a folder; kept on disk where it is, so an offline run's record can point to it."""
    _send(run_id, {"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})


def log_table(run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Rows appended to the run's table `artifact_file` (MLflow's table artifact, shown in its UI)."""
    _send(run_id, {"op": "table", "rows": rows, "artifact_file": artifact_file})


def log_inputs(run_id: str, datasets: dict[str, Path], digest: str) -> None:
    """Each JSONL dataset (name -> path) as an input of the run, with its digest, as MLflow's dataset tracking shows."""
    _send(run_id, {"op": "inputs", "datasets": [
        {"name": name, "path": str(Path(path).resolve()), "digest": digest} for name, path in datasets.items()]})


def log_loss_plot(run_id: str, artifact_file: str = "train/loss.png") -> None:
    _send(run_id, {"op": "loss_plot", "artifact_file": artifact_file})


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
