"""Nightly retraining as a user schedules it: `loraflow serve` starts a Prefect server and serves the recipe with
a cron schedule; a triggered run trains and registers, the next one skips unchanged data, SIGTERM stops it all."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.prefect_server import free_port
from tests.conftest import STATE_DIR

pytestmark = pytest.mark.slow


async def deployment_when_served(name: str, seconds: float = 180):
    deadline = time.monotonic() + seconds
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(name)
            except Exception:  # not served yet (or the server not up yet)
                assert time.monotonic() < deadline, f"deployment {name} never appeared"
                await asyncio.sleep(1)


def test_serve_schedules_runs_registers_skips_unchanged_data_and_stops_on_sigterm(tiny_recipe):
    name = f"nightly-{tiny_recipe.parent.name[-8:]}"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"  # the served process looks for triggered runs every 2 s, not 10
    serving = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(tiny_recipe), "--cron", "0 2 * * *", "--name", name,
         "--prefect-port", str(port), "-o", f"experiment={name}", "-o", f"registry.model_name={name}"],
        cwd=STATE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
            deployment = asyncio.run(deployment_when_served(f"nightly/{name}"))
            assert [schedule.schedule.cron for schedule in deployment.schedules] == ["0 2 * * *"]
            assert deployment.parameters["recipe"] == str(tiny_recipe.resolve())
            first = run_deployment(f"nightly/{name}", timeout=600)
            assert first.state.is_completed(), first.state.message
            client = MlflowClient()
            [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
            assert run.info.status == "FINISHED"
            assert client.get_model_version_by_alias(name, "challenger").run_id == run.info.run_id
            second = run_deployment(f"nightly/{name}", timeout=600)
            assert second.state.is_completed(), second.state.message
            assert len(client.search_runs([run.info.experiment_id])) == 1  # unchanged data and recipe: skipped
        stopped_at = time.monotonic()
        serving.send_signal(signal.SIGTERM)
        assert serving.wait(timeout=30) == 0
        assert time.monotonic() - stopped_at < 20
    finally:
        if serving.poll() is None:
            serving.kill()
    output = serving.stdout.read()
    assert f"started a Prefect server on http://127.0.0.1:{port}" in output
    assert "unchanged since run" in output
