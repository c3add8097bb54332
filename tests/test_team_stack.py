"""The nightly job and a sweep on a team's stack: PostgreSQL, an MLflow server and a Prefect server on it, a process
work pool with two workers, each in a working directory of its own, getting the flow's code by prefect.yaml's pull
step. The stack and the workers are started once for the module; the last test kills a worker.

Every server is a real program started here and stopped by its PID (tests/team_stack.py). The database's password is
in the environment of every process, as a team's machines would have it, and must reach no record.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from tasks.register import CHAMPION, HISTORY_TAG, LOCK_TAG, PROMOTION_TAG
from tests.conftest import REPO, write_tiny_recipe
from tests.team_stack import TeamStack, stop, team_stack_folder

pytestmark = pytest.mark.slow
MODEL = "team-model"
POOL = "loraflow-cpu"


@pytest.fixture(scope="module")
def stack():
    team = TeamStack(team_stack_folder(), secrets.token_hex(16))
    try:
        team.start_postgres()
        team.start_mlflow()
        team.start_prefect()
        yield team
    finally:
        team.stop_all()
        left = [p.pid for p in team.processes if p.poll() is None]
        shutil.rmtree(team.folder, ignore_errors=True)
        assert not left, f"servers still running: {left}"


@pytest.fixture(scope="module")
def workers(stack, tmp_path_factory):
    """The pool and its two workers (one flow run at a time each), both polling before the fixture returns."""
    folder = tmp_path_factory.mktemp("workers")
    prefect(stack, "work-pool", "create", POOL, "--type", "process", "--overwrite", cwd=folder)
    # From the repository, as a user deploys; LORAFLOW_REPOSITORY goes into the pull step the workers run.
    prefect(stack, "deploy", "--name", "identity-nightly", "--name", POOL, cwd=REPO, LORAFLOW_REPOSITORY=str(REPO))
    started = []
    for name in ("worker-a", "worker-b"):
        home = folder / name
        home.mkdir()
        with open(home / "worker.log", "wb") as log:
            started.append(subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name, "--limit", "1"],
                # TMPDIR: what a killed flow run leaves of Prefect's scratch goes with the test's folder.
                cwd=home, env=team_env(stack, PREFECT_HOME=str(home / ".prefect"), PREFECT_WORKER_QUERY_SECONDS="2",
                                       TMPDIR=str(home)),
                start_new_session=True, stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 120
        while len(api(stack, f"/work_pools/{POOL}/workers/filter", {})) < 2:  # both polling before any run exists
            assert time.monotonic() < deadline and all(w.poll() is None for w in started), "the workers did not start"
            time.sleep(1)
        yield Workers(folder, started)
    finally:
        for worker in started:
            stop(worker)


@dataclass
class Workers:
    folder: Path
    processes: list[subprocess.Popen]


def team_env(stack: TeamStack, **extra: str) -> dict[str, str]:
    """A team machine's environment: the team's servers, and the database URL with its password."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("LORAFLOW_ARTIFACT_ROOT", "PYTEST_XDIST_WORKER", "PREFECT_HOME")}
    return env | {
        "PREFECT_API_URL": stack.prefect_api_url,
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "MLFLOW_BACKEND_STORE_URI": stack.database_url("mlflow"),
        "PREFECT_API_DATABASE_CONNECTION_URL": stack.database_url("prefect", "postgresql+asyncpg"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    } | extra


def prefect(stack: TeamStack, *args: str, cwd: Path, **extra: str) -> str:
    """A `prefect` command against the team's Prefect server."""
    home = {"PREFECT_HOME": str(stack.folder / "prefect-cli")}
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, capture_output=True, text=True,
                            env=team_env(stack, **home, **extra), timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def api(stack: TeamStack, path: str, body: dict | None = None) -> dict | list:
    request = urllib.request.Request(f"{stack.prefect_api_url}{path}", method="POST" if body is not None else "GET",
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def trigger(stack: TeamStack, deployment: str, parameters: dict | None = None) -> str:
    """What `prefect deployment run nightly/<deployment> [--param ...]` does, through the API (no CLI start-up)."""
    found = api(stack, f"/deployments/name/nightly/{deployment}")
    return api(stack, f"/deployments/{found['id']}/create_flow_run", {"parameters": parameters or {}})["id"]


def wait_for_runs(stack: TeamStack, run_ids: list[str], workers: list[subprocess.Popen], seconds: float) -> list[dict]:
    deadline = time.monotonic() + seconds
    while True:
        runs = [api(stack, f"/flow_runs/{run_id}") for run_id in run_ids]
        if all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs):
            return runs
        assert all(worker.poll() is None for worker in workers), "a worker exited"
        assert time.monotonic() < deadline, [run["state"] for run in runs]
        time.sleep(2)


def logs_of(stack: TeamStack, run_id: str) -> str:
    entries = api(stack, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in entries)


def logged(stack: TeamStack, run_id: str, text: str, seconds: float = 60) -> bool:
    """Whether the flow run's logs (sent by its process in the background, so after its state) come to hold `text`."""
    deadline = time.monotonic() + seconds
    while text not in logs_of(stack, run_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


HOLDER = """
import sys, time
from flows.promotion import shared_lock
from tasks.promotion_lock import promotion_lock
with promotion_lock("contended-model", shared_lock()) as lock:
    print("held", time.time(), lock, flush=True)
    time.sleep(float(sys.argv[1]))
    print("releasing", time.time(), flush=True)
"""


@pytest.mark.parametrize("store", ["postgresql", "server"])
def test_the_champion_lock_holds_between_processes_that_share_no_file_lock(stack, store, tmp_path):
    """Two processes with caches of their own (so no shared file lock), as on two machines: the second gets the
    lock only after the first let it go. A PostgreSQL store takes an advisory lock, a tracking server Prefect's."""
    uri = stack.database_url("mlflow") if store == "postgresql" else stack.mlflow_url

    def holder(n: int, seconds: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", HOLDER, seconds], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env=team_env(stack, MLFLOW_TRACKING_URI=uri, LORAFLOW_CACHE=str(tmp_path / f"cache-{n}")))

    first_holder = holder(0, "4")
    held = first_holder.stdout.readline()
    assert held.startswith("held"), first_holder.communicate()[1][-2000:]
    second_holder = holder(1, "0")  # started while the first holds the lock
    first = (held + first_holder.communicate(timeout=120)[0]).split("\n")
    second = second_holder.communicate(timeout=120)[0].split("\n")
    kind = "PostgreSQL advisory lock" if store == "postgresql" else "Prefect global concurrency limit"
    assert first[0].split(" ", 2)[2].startswith(kind) and second[0].split(" ", 2)[2].startswith(kind)
    released, acquired = float(first[1].split()[1]), float(second[0].split()[1])
    assert acquired >= released


def test_two_workers_train_register_and_move_champion_under_one_lock_and_record_no_password(stack, workers, tmp_path):
    recipes = {}
    for deployment, rate in (("identity-nightly", "1e-3"), ("team-b", "2e-3")):  # two recipes, one model name
        folder = tmp_path / deployment
        folder.mkdir()
        recipe = write_tiny_recipe(folder)
        recipe.write_text(recipe.read_text()
                          .replace("batch_size: 2}", f"batch_size: 2, learning_rate: {rate}}}")
                          .replace("registry: {primary_metric: rougeL}",
                                   f"registry: {{primary_metric: rougeL, model_name: {MODEL}}}\nexperiment: {deployment}"))
        recipes[deployment] = recipe
    prefect(stack, "deploy", "flows/nightly.py:nightly", "--name", "team-b", "--pool", POOL, "--params",
            json.dumps({"recipe": str(recipes["team-b"])}), cwd=REPO, LORAFLOW_REPOSITORY=str(REPO))
    # identity-nightly as prefect.yaml deploys it (the workers fixture did), on this test's recipe.
    parameters = {"identity-nightly": {"recipe": str(recipes["identity-nightly"])}, "team-b": {}}
    both = [trigger(stack, deployment, parameters[deployment]) for deployment in recipes]
    runs = wait_for_runs(stack, both, workers.processes, 900)
    assert [run["state"]["type"] for run in runs] == ["COMPLETED", "COMPLETED"], [logs_of(stack, r) for r in both]
    starts, ends = sorted(run["start_time"] for run in runs), sorted(run["end_time"] for run in runs)
    assert starts[1] < ends[0], "the two runs did not run at once"

    client = MlflowClient(stack.mlflow_url)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 2
    for version in versions:
        assert version.tags[LOCK_TAG].startswith("Prefect global concurrency limit"), version.tags
        assert not version.tags[PROMOTION_TAG].startswith("undecided"), version.tags
    model = client.get_registered_model(MODEL)
    promoted = sorted(v.version for v in versions if v.tags[PROMOTION_TAG].startswith("beats"))
    history = json.loads(model.tags.get(HISTORY_TAG, "[]"))
    assert sorted(history) == promoted
    assert (str(model.aliases.get(CHAMPION)) if promoted else None) == (history[-1] if history else None)
    if len(history) == 2:  # the second to move the alias saw the first as champion: the moves were serialised
        assert "champion" in client.get_model_version(MODEL, history[1]).tags[PROMOTION_TAG]
    limits = api(stack, "/v2/concurrency_limits/filter", {})
    assert [limit["active_slots"] for limit in limits if limit["name"].startswith(f"loraflow-champion-{MODEL}-")] == [0]
    for run_id in both:  # the entrypoint is in no worker's folder: only the pull step's clone has it
        assert logged(stack, run_id, "Executing deployment step: git_clone")

    again = trigger(stack, "identity-nightly", parameters["identity-nightly"])
    [run] = wait_for_runs(stack, [again], workers.processes, 300)
    assert run["state"]["type"] == "COMPLETED"
    assert logged(stack, again, "skipped: the recipe and its data"), logs_of(stack, again)
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == 2

    record = stack.dump("mlflow") + stack.dump("prefect")
    record += "".join(logs_of(stack, run_id) for run_id in [*both, again])
    files = [path for path in [*workers.folder.rglob("*.log"), *stack.folder.glob("*.log"),
                               *(stack.folder / "artifacts").rglob("*")] if path.is_file()]
    assert any(path.name == "adapter_model.safetensors" for path in files)  # the artifacts are looked through
    record += "".join(path.read_bytes().decode("utf-8", errors="ignore") for path in files)
    assert stack.password not in record


def kill_worker_running(stack: TeamStack, workers: Workers, flow_run: dict) -> None:
    """A machine lost mid-point: the worker running the flow run, and the flow run's own process, killed outright."""
    pid = int(flow_run["infrastructure_pid"].rsplit(":", 1)[-1])
    owner = next(worker for worker in workers.processes
                 if pid in [child.pid for child in psutil.Process(worker.pid).children(recursive=True)])
    for process in [*psutil.Process(pid).children(recursive=True), psutil.Process(pid)]:
        process.kill()
    os.killpg(owner.pid, signal.SIGKILL)
    owner.wait(timeout=30)


def test_a_sweep_fans_its_points_out_on_the_pool_and_a_killed_worker_leaves_its_point_crashed(stack, workers, tmp_path):
    """Four points, two at once on the two workers; the worker running the third is killed: that point is
    crashed, and the sweep finishes with the others on the worker left and registers the best."""
    recipe = write_tiny_recipe(tmp_path)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(json.dumps({
        # A relative output_dir: each point writes in its flow run's clone, so the parent fetches the best adapter
        # from its MLflow run, as from another machine.
        # 60 steps of the tiny model (about 4 s): the two first points' training overlaps by more than the 2 s
        # between the workers' polls.
        "recipe": str(recipe), "overrides": ["experiment=team-sweep", "registry.model_name=team-sweep",
                                             "output_dir=outputs", "train.max_steps=60"],
        "parameters": {"train.learning_rate": [1e-3, 2e-3, 3e-3, 4e-3]},
        "runner": {"pool": POOL, "max_parallel": 2, "crashed_after_s": 45},  # heartbeats every 30 s: 15 s to spare
    }))
    deployment = api(stack, f"/deployments/name/sweep-point/{POOL}")["id"]

    def point_runs() -> list[dict]:
        return sorted(api(stack, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment]}}}),
                      key=lambda run: run["created"])

    parent = subprocess.Popen([sys.executable, "-m", "flows.cli", "sweep", str(sweep_file)], cwd=tmp_path,
                              env=team_env(stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while len(runs := point_runs()) < 3 or runs[2]["state"]["type"] != "RUNNING" or not runs[2]["infrastructure_pid"]:
        assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()[0][-3000:]
        time.sleep(1)
    kill_worker_running(stack, workers, runs[2])
    output = parent.communicate(timeout=600)[0]
    assert parent.returncode == 0, output[-3000:]

    client = MlflowClient(stack.mlflow_url)
    [sweep_run] = client.search_runs([client.get_experiment_by_name("team-sweep").experiment_id],
                                     "tags.`loraflow.kind` = 'sweep'")
    children = client.search_runs([sweep_run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{sweep_run.info.run_id}'", order_by=["attributes.start_time ASC"])
    assert len(children) == 4
    crashed = [child for child in children if child.data.tags.get("loraflow.sweep_state") == "crashed"]
    assert len(crashed) == 1 and crashed[0].info.status == "FAILED", [c.data.tags for c in children]
    assert "CRASHED" in crashed[0].data.tags["loraflow.error"].upper()
    assert sorted(child.info.status for child in children) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    first, second = children[:2]  # their training (first step to end) overlapped: two workers at once
    started = {child.info.run_id: client.get_metric_history(child.info.run_id, "train_loss")[0].timestamp
               for child in (first, second)}
    assert started[first.info.run_id] < second.info.end_time and started[second.info.run_id] < first.info.end_time
    [version] = client.search_model_versions("name = 'team-sweep'")
    assert version.run_id == sweep_run.data.tags["loraflow.best_run_id"] != crashed[0].info.run_id
    assert not version.tags[PROMOTION_TAG].startswith("undecided")
    best = sweep_run.data.tags["loraflow.best_run_id"]
    assert (tmp_path / "outputs" / best / "train" / "fetched" / "adapter_peft" / "adapter_model.safetensors").exists()

