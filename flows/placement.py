"""Where a sweep's points run, each behind the same two calls: `start(job)` and `wait()` (the points that ended).

- InProcess: one at a time in the sweep's process, on the data the parent prepared (a Prefect task each).
- Processes: `max_concurrency` at once on this machine, one process each (`python -m flows.sweep_point`), the cores
  divided between them: training sets process-wide state (seeds, torch threads) that points sharing a process
  would trample.
- Pool: flow runs of the `sweep-point/<pool>` deployment, placed on the pool's workers by Prefect (`run_deployment`);
  a run whose worker died is marked CRASHED by a Prefect automation that watches the flow runs' heartbeats.

None of them schedules anything itself: a point starts when the sweep has a free slot, and goes where Prefect (or
the operating system) puts it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State

from conf.schema import UserError
from flows.sweep_point import PointJob, PointResult, end_point, recorded_result, run_point
from tasks.results import PreparedData

POINT_FLOW = "sweep-point"
ZOMBIE_AUTOMATION = "loraflow: flow runs silent for {seconds} s crashed"


class NoPointDeployment(UserError):
    """`--pool NAME` names a pool with no sweep-point deployment on the Prefect server."""


@task(name="sweep-point", cache_policy=NO_CACHE)
def _point_task(job: PointJob, data: PreparedData, model_dir: str) -> PointResult:
    return run_point(job, data, model_dir)


class InProcess:
    capacity = 1

    def __init__(self, data: PreparedData, model_dir: str):
        self.data, self.model_dir, self.queued = data, model_dir, []

    def start(self, job: PointJob) -> None:
        self.queued.append(job)

    def wait(self) -> list[PointResult]:
        return [_point_task(self.queued.pop(0), self.data, self.model_dir)]


def crashed(job: PointJob, why: str) -> PointResult:
    """A point whose process or worker died: its child run, left RUNNING, ends FAILED and tagged crashed."""
    if MlflowClient().get_run(job.run_id).info.status == "RUNNING":
        end_point(job.run_id, "FAILED", why, "crashed")
    return PointResult(point=job.point, run_id=job.run_id, status="CRASHED", error=why)


def threads_per_point(points_at_once: int) -> int:
    """This machine's cores divided between the points that train at once (at least one each)."""
    return max(1, (os.cpu_count() or 1) // points_at_once)


class Processes:
    def __init__(self, capacity: int, folder: Path):
        self.capacity, self.folder = capacity, folder
        self.running: dict[str, tuple[PointJob, subprocess.Popen, Path]] = {}

    def start(self, job: PointJob) -> None:
        threads = threads_per_point(self.capacity)
        job = job.model_copy(update={"threads": threads})
        self.folder.mkdir(parents=True, exist_ok=True)
        job_path, result_path = self.folder / f"{job.run_id}.job.json", self.folder / f"{job.run_id}.result.json"
        job_path.write_text(job.model_dump_json(), encoding="utf-8")
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        process = subprocess.Popen([sys.executable, "-m", "flows.sweep_point", str(job_path), str(result_path)],
                                   env=env, cwd=Path(__file__).resolve().parent.parent)
        self.running[job.run_id] = (job, process, result_path)

    def wait(self) -> list[PointResult]:
        while True:
            ended = [run_id for run_id, (_, process, _) in self.running.items() if process.poll() is not None]
            if ended:
                return [self._result(*self.running.pop(run_id)) for run_id in ended]
            time.sleep(0.5)

    @staticmethod
    def _result(job: PointJob, process: subprocess.Popen, result_path: Path) -> PointResult:
        if result_path.exists():
            return PointResult.model_validate_json(result_path.read_text(encoding="utf-8"))
        return crashed(job, f"its process exited with code {process.returncode} before it finished")


class Pool:
    """Points as flow runs of `sweep-point/<pool>`; their results read back from their MLflow child runs."""

    FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")

    def __init__(self, pool: str, capacity: int, crashed_after_s: int, poll_seconds: float = 2.0):
        from prefect.client.orchestration import get_client

        self.pool, self.capacity, self.poll_seconds = pool, capacity, poll_seconds
        self.client = get_client(sync_client=True)
        self.deployment = f"{POINT_FLOW}/{pool}"
        try:
            self.client.read_deployment_by_name(self.deployment)
        except Exception as error:  # ObjectNotFound, or a server that is not there
            raise NoPointDeployment(
                f"--pool {pool}: no deployment {self.deployment} on the Prefect server ({type(error).__name__}); "
                f"deploy it once from the repository: prefect deploy --name {pool} (prefect.yaml)") from None
        self._crash_silent_runs(crashed_after_s)
        self.running: dict[str, PointJob] = {}

    def _crash_silent_runs(self, seconds: int) -> None:
        """Prefect's own answer to a worker that died mid-run: an automation that marks a flow run CRASHED when its
        heartbeats stop (`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` on the workers must be well under `seconds`)."""
        from prefect.events.actions import ChangeFlowRunState
        from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
        from prefect.states import StateType

        name = ZOMBIE_AUTOMATION.format(seconds=seconds)
        if self.client.read_automations_by_name(name):
            return
        self.client.create_automation(AutomationCore(
            name=name, description="A flow run that stopped sending heartbeats: its process or worker died.",
            trigger=EventTrigger(
                after={"prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=seconds)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {seconds} s: its worker or process died")],
        ))

    def start(self, job: PointJob) -> None:
        from prefect.deployments import run_deployment

        run = run_deployment(self.deployment, parameters={"job": job.model_dump(mode="json")}, timeout=0,
                             flow_run_name=f"{job.name} ({job.run_id[:8]})")
        self.running[str(run.id)] = job

    def wait(self) -> list[PointResult]:
        while True:
            ended = []
            for flow_run_id, job in list(self.running.items()):
                state = self.client.read_flow_run(flow_run_id).state
                if state is not None and state.type.value in self.FINAL:
                    ended.append(self._result(self.running.pop(flow_run_id), state))
            if ended:
                return ended
            time.sleep(self.poll_seconds)

    @staticmethod
    def _result(job: PointJob, state: State) -> PointResult:
        run = MlflowClient().get_run(job.run_id)
        if run.info.status == "RUNNING":  # the point never ended its run: its flow run crashed, failed or was cancelled
            return crashed(job, f"Prefect state {state.name}: {state.message or ''}".strip())
        return recorded_result(run)
