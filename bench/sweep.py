"""A 4-point sweep's wall time: serial in the sweep's own process, then on a Prefect work pool with one worker, then
with two, all in one sitting on this machine.

conf/sweep_identity.yaml (LoRA rank x learning rate) with `train.max_steps` set small. Everything runs against a
Prefect server and an MLflow store (SQLite) in a scratch folder, started here; the points on the pool get the
repository's committed code by prefect.yaml's pull step, as a team's workers do. Each worker's processes get this
machine's cores divided between the workers (OMP_NUM_THREADS), so two points never fight over one core; the one
worker, and the serial sweep, use all of them.

- serial / two workers: the speed-up two workers give on this machine.
- one worker vs serial: what placing a point on the pool costs (a process to start, the code to pull, the data to
  prepare again), per point: the dispatch overhead.
- N machines of this kind, each point on a whole machine: the parent's fixed work (data, registration), plus
  ceil(points / N) rounds of a point's serial time and the dispatch overhead.

    python bench/sweep.py [--max-steps N]
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conf.environment import apply_tool_defaults  # noqa: E402

SWEEP = REPO / "conf" / "sweep_identity.yaml"
POOL = "loraflow-bench"


def prefect(*args: str, env: dict[str, str], cwd: Path = REPO) -> None:
    subprocess.run([sys.executable, "-m", "prefect", *args], cwd=cwd, env=env, check=True, capture_output=True,
                   timeout=600)


def start_workers(count: int, folder: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    threads = str(max(1, (os.cpu_count() or 1) // count))
    workers = []
    for number in range(count):
        home = folder / f"worker-{count}-{number}"
        home.mkdir(parents=True)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1",
             "--name", f"bench-{count}-{number}"],
            cwd=home, env=env | {"OMP_NUM_THREADS": threads, "PREFECT_HOME": str(home / ".prefect"),
                                 "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    return workers


def stop(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=10, help="training steps per point (default 10)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="loraflow-bench-sweep-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    os.environ |= {"MLFLOW_TRACKING_URI": f"sqlite:///{scratch / 'mlflow.db'}",
                   "LORAFLOW_ARTIFACT_ROOT": (scratch / "artifacts").as_uri(), "PREFECT_HOME": str(scratch / "prefect")}
    apply_tool_defaults(scratch)
    from flows.prefect_server import free_port, start_server, stop_server

    port = free_port()
    server = start_server(port)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ) | {"LORAFLOW_REPOSITORY": str(REPO)}
    from mlflow.tracking import MlflowClient

    from conf.schema import SweepRunner, load_sweep
    from flows.sweep import run_sweep

    try:
        prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=env)
        prefect("deploy", "flows/sweep_point.py:sweep_point", "--name", POOL, "--pool", POOL, env=env)
        base = load_sweep(SWEEP)
        overrides = [*base.overrides, f"train.max_steps={args.max_steps}", "experiment=loraflow-bench-sweep",
                     "registry.model_name=loraflow-bench-sweep", f"output_dir={scratch / 'outputs'}"]
        walls, summaries = {}, {}
        for label, workers in (("serial", 0), ("one worker", 1), ("two workers", 2)):
            # A fresh seed each sitting: the same sweep twice would resume (nothing left to run) instead of training.
            sweep = base.model_copy(update={"overrides": overrides, "seed": workers,
                                            "runner": SweepRunner(pool=POOL, max_parallel=workers) if workers else None})
            started_workers = start_workers(workers, scratch, env) if workers else []
            try:
                began = time.perf_counter()
                summaries[label] = run_sweep(sweep)
                walls[label] = time.perf_counter() - began
            finally:
                stop(started_workers)
    finally:
        stop_server(server)

    client = MlflowClient()

    def point_seconds(label: str) -> float:
        """A point's time from being handed out to its end, the median over the sweep's points (the best point's
        run is ended again when it is registered, later)."""
        runs = [client.get_run(result.run_id).info for result in summaries[label].results]
        return statistics.median((run.end_time - run.start_time) / 1000 for run in runs)

    points = len(summaries["serial"].results)
    per_point = {label: point_seconds(label) for label in walls}
    point, on_pool = per_point["serial"], per_point["one worker"]
    fixed = walls["serial"] - points * point
    dispatch = on_pool - point
    cores = os.cpu_count()
    print(f"{points}-point sweep ({SWEEP.name}, {args.max_steps} steps a point), {cores} cores")
    for label, wall in walls.items():
        statuses = json.dumps(sorted(result.status for result in summaries[label].results))
        print(f"{label:<12} {wall:7.1f} s  a point {per_point[label]:5.1f} s  {statuses}")
    print(f"the parent's own work (data, registration): {fixed:.1f} s")
    print(f"dispatch overhead per point on the pool (a point on one worker vs in the sweep's process): {dispatch:.1f} s")
    print(f"speed-up, two workers vs serial: {walls['serial'] / walls['two workers']:.2f}x")
    print(f"On {cores} cores two workers share the same cores: what they gain is the time a point waits (process start, "
          "imports, pulling the code, loading the model) overlapping the other's compute, not compute.")
    for machines in (2, 4, 8):
        estimate = fixed + math.ceil(points / machines) * (point + dispatch)
        print(f"estimate, {machines} machines of this kind, a point each at a time: {estimate:.1f} s "
              f"({walls['serial'] / estimate:.2f}x serial)")


if __name__ == "__main__":
    main()
