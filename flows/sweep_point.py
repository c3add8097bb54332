"""One point of a sweep: one recipe trained and evaluated as a child run the sweep's parent made for it.

The same code runs a point three ways: in the sweep's own process, on the data the parent prepared; in a process of
its own (`python -m flows.sweep_point JOB RESULT`, for `max_concurrency` > 1); or as a flow run of the `sweep-point`
deployment on a Prefect work pool (`runner`). Out of the parent's process a point prepares the recipe's data itself
and checks its content hash against the parent's, so every point trains and is scored on the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Literal

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from prefect import flow
from pydantic import BaseModel

from conf.environment import apply_tool_defaults
from conf.schema import RunConfig
from flows.runs import log_config, run_context
from flows.search import TrialRef, trial_pruner
from flows.stages import evaluate_task, prepare_data, train_task
from tasks.base_model import resolve_base_model
from tasks.results import PreparedData
from tasks.tracking import UNLOGGED_FILE, recording_unlogged, set_tags
from tasks.train import TrainingPruned

POINT_TAG = "loraflow.sweep_point"
STATE_TAG = "loraflow.sweep_state"  # pruned or crashed: what the run's MLflow status alone does not say
ERROR_TAG = "loraflow.error"
THREADS_TAG = "loraflow.torch_threads"


class PointJob(BaseModel):
    """A point as the parent hands it out: its resolved recipe, its values, the child run made for it, and the data
    hash it must train on (with its Optuna trial when the search is one)."""

    config: RunConfig
    point: dict[str, Any]
    run_id: str
    data_hash: str
    trial: TrialRef | None = None
    threads: int | None = None  # torch threads, when points share the machine's cores

    @property
    def name(self) -> str:
        return point_name(self.point)


class PointResult(BaseModel):
    point: dict[str, Any]
    run_id: str
    status: Literal["FINISHED", "FAILED", "PRUNED", "CRASHED"]
    metrics: dict[str, float] = {}
    weights_dir: Path | None = None
    error: str = ""
    precision: str = ""  # what training ran in; the champion's head-to-head scoring runs in it too


def point_name(point: dict[str, Any]) -> str:
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())


def recorded_result(run: Run) -> PointResult:
    """A point's outcome as its child run records it (a run still RUNNING: its process or worker died)."""
    tags, status = run.data.tags, run.info.status
    outcome = ("PRUNED" if tags.get(STATE_TAG) == "pruned" else "CRASHED" if tags.get(STATE_TAG) == "crashed"
               else status if status in ("FINISHED", "FAILED") else "CRASHED")
    return PointResult(point=json.loads(tags[POINT_TAG]), run_id=run.info.run_id, status=outcome,
                       metrics=dict(run.data.metrics) if outcome == "FINISHED" else {},
                       error=tags.get(ERROR_TAG, ""), precision=tags.get("train.precision_used", ""))


def end_point(run_id: str, status: str, error: str = "", state: str = "") -> None:
    """The child run's end: its MLflow status, and why, where it did not finish."""
    tags = ({ERROR_TAG: error[:500]} if error else {}) | ({STATE_TAG: state} if state else {})
    if tags:
        set_tags(run_id, tags)
    MlflowClient().set_terminated(run_id, status)


def run_point(job: PointJob, data: PreparedData, model_dir: str) -> PointResult:
    """Train and evaluate the point into its child run, reporting held-out losses to its trial (which may prune
    it); any failure is recorded and returned, not raised. Should the tracking server go away, the child keeps what it
    cannot log as the parent does."""
    ctx = run_context(job.config, job.run_id)
    with recording_unlogged(ctx.run_id, ctx.work_dir / UNLOGGED_FILE):
        try:
            log_config(ctx.run_id, job.config, ctx.work_dir)
            prune = trial_pruner(job.trial) if job.trial is not None else None
            trained = train_task.fn(data, model_dir, job.config, ctx, prune=prune)
            evaluated = evaluate_task.fn(data, trained, job.config, ctx)
        except TrainingPruned as pruned:  # kept, with the losses it logged, and never registered
            end_point(ctx.run_id, "KILLED", str(pruned), "pruned")
            return PointResult(point=job.point, run_id=ctx.run_id, status="PRUNED", error=str(pruned))
        except Exception as error:  # one point's failure (a bad value, out of memory) must not end the sweep
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            end_point(ctx.run_id, "FAILED", reason)
            return PointResult(point=job.point, run_id=ctx.run_id, status="FAILED", error=reason)
    end_point(ctx.run_id, "FINISHED")
    return PointResult(point=job.point, run_id=ctx.run_id, status="FINISHED", metrics=evaluated.metrics,
                       weights_dir=trained.weights_dir, precision=trained.precision)


def prepare_and_run(job: PointJob) -> PointResult:
    """A point away from the parent: the recipe's data prepared here (the tokenized cache is shared on one machine),
    refused in one line if its content hash is not the one the sweep prepared."""
    model_dir = resolve_base_model(job.config.base_model)
    ctx = run_context(job.config, job.run_id)
    data = prepare_data(job.config, model_dir, dataclasses.replace(ctx, run_id=None))
    if data.cleaned.data_hash != job.data_hash:
        reason = (f"point {job.name}: its data hash {data.cleaned.data_hash[:12]} differs from the sweep's "
                  f"{job.data_hash[:12]} (the recipe's files changed, or this machine reads other files)")
        end_point(job.run_id, "FAILED", reason)
        return PointResult(point=job.point, run_id=job.run_id, status="FAILED", error=reason)
    return run_point(job, data, model_dir)


@flow(name="sweep-point")
def sweep_point(job: PointJob) -> PointResult:
    """A sweep's point as a flow run on a work pool's worker (prefect.yaml: the sweep-point deployments)."""
    return prepare_and_run(job)


def main(job_path: str, result_path: str) -> None:
    """A point in a process of its own: the job from a JSON file, the result to another (absent if it crashed)."""
    apply_tool_defaults()
    job = PointJob.model_validate_json(Path(job_path).read_text(encoding="utf-8"))
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
        set_tags(job.run_id, {THREADS_TAG: str(torch.get_num_threads())})
    result = prepare_and_run(job)
    Path(result_path).write_text(result.model_dump_json(), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:3])
