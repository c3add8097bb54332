"""Manual approval: with `registry.approval: manual` the flow pauses (Prefect's pause, on the test process's Prefect
server; the nightly flow's fine-tuning subflow too) with a version that passed every rule as challenger, until
`loraflow approve` moves the alias, `loraflow reject` leaves it, or the timeout leaves it; the registry records who
decided, when and why."""

import asyncio
import getpass
import threading
import time
import uuid
from dataclasses import replace
from http.server import HTTPServer
from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient

from conf.schema import load_config
from flows.cli import main
from tasks.register import APPROVAL_RUN_TAG, APPROVAL_TAG, CHALLENGER, CHAMPION, PROMOTION_TAG
from tests.conftest import Webhook, tiny_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def scored_better(monkeypatch):
    """The tuned model scores better than its base: whether two steps on a random model learn anything is not what
    these tests are about, so the evaluate stage's tuned rougeL is raised past the base's."""
    import flows.finetune

    evaluate = flows.finetune.evaluate_task

    def better(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        return replace(result, metrics=result.metrics | {"tuned_rougeL": result.metrics["base_rougeL"] + 1.0})

    monkeypatch.setattr(flows.finetune, "evaluate_task", better)


def run_waiting(tiny_recipe, name, *overrides):
    from flows.finetune import finetune

    return finetune(load_config(tiny_recipe, [f"registry.model_name={name}", f"experiment={name}",
                                              "registry.approval=manual", *overrides]))


def decide_when_waiting(name, *command):
    """In the background, as a person would: once the flow waits on a version, `loraflow <command> NAME VERSION ...`
    (again while the flow has not paused yet). Returns the thread and what it saw: the flow run and the exit code."""
    seen = {}

    def decide():
        client = MlflowClient()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and seen.get("exit") != 0:
            waiting = [v for v in client.search_model_versions(f"name = '{name}'") if APPROVAL_RUN_TAG in v.tags]
            if waiting:
                seen["flow_run"] = waiting[0].tags[APPROVAL_RUN_TAG]
                seen["version"] = str(waiting[0].version)
                seen["exit"] = main([command[0], name, seen["version"], *command[1:]])
            time.sleep(0.5)

    thread = threading.Thread(target=decide, daemon=True)
    thread.start()
    return thread, seen


def paused(flow_run_id: str) -> bool:
    """Whether Prefect's server recorded the flow run as paused at some point."""
    from prefect.client.orchestration import get_client

    async def states():
        async with get_client() as client:
            return await client.read_flow_run_states(UUID(flow_run_id))

    return any(state.name == "Paused" for state in asyncio.run(states()))


def test_the_nightly_flow_waits_tells_the_webhook_and_loraflow_approve_makes_the_version_champion(tiny_recipe,
                                                                                                 monkeypatch):
    from flows.nightly import nightly

    server = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Webhook.received.clear()
    monkeypatch.setenv("LORAFLOW_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    name = f"approve-{uuid.uuid4().hex[:8]}"
    thread, seen = decide_when_waiting(name, "approve", "--reason", "read the samples")
    try:
        night = nightly(str(tiny_recipe), [f"registry.model_name={name}", f"experiment={name}",
                                           "registry.approval=manual"])
    finally:
        server.shutdown()
    thread.join(10)
    version = seen["version"]
    assert seen["exit"] == 0 and paused(seen["flow_run"])
    assert night.outcome == "promoted" and night.reason.startswith(f"{name} version {version}: approved by ")
    [message] = Webhook.received  # the wait, with the flow run's page in the Prefect UI; a promoted night says nothing
    assert message["outcome"] == "awaiting_approval" and message["link"].endswith(f"/runs/flow-run/{seen['flow_run']}")
    assert f"loraflow approve {name} {version}" in message["text"]
    client = MlflowClient()
    assert client.get_registered_model(name).aliases == {CHAMPION: int(version), CHALLENGER: int(version)}
    tags = client.get_model_version(name, version).tags
    assert tags[APPROVAL_TAG] == "approved" and tags["loraflow.approval_by"] == getpass.getuser()
    assert tags["loraflow.approval_reason"] == "read the samples" and tags["loraflow.approval_at"]
    assert tags[PROMOTION_TAG] == f"approved by {getpass.getuser()}: read the samples"
    assert client.get_model_version(name, version).description.startswith(
        f"**{name} version {version}**: champion: approved by {getpass.getuser()}: read the samples. Load it as ")
    assert client.get_run(night.run_id).data.tags["promotion"] == tags[PROMOTION_TAG]


def test_loraflow_reject_leaves_the_champion_and_records_why(tiny_recipe, capsys):
    name = f"reject-{uuid.uuid4().hex[:8]}"
    assert main(["reject", name, "1"]) != 0  # a reason is required
    thread, seen = decide_when_waiting(name, "reject", "--reason", "answers too short")
    summary = run_waiting(tiny_recipe, name)
    thread.join(10)
    assert seen["exit"] == 0 and paused(seen["flow_run"]) and not summary.registered.promoted
    client = MlflowClient()
    assert CHAMPION not in client.get_registered_model(name).aliases
    tags = client.get_model_version(name, summary.registered.version).tags
    assert tags[APPROVAL_TAG] == "rejected" and tags["loraflow.approval_reason"] == "answers too short"
    assert tags[PROMOTION_TAG] == f"rejected by {getpass.getuser()}: answers too short"
    capsys.readouterr()
    assert main(["approve", name, summary.registered.version]) != 0  # decided: no second decision
    assert "is not awaiting approval (its approval: rejected" in capsys.readouterr().err


def test_an_approval_nobody_gives_in_time_leaves_the_champion(tiny_recipe):
    name = f"timeout-{uuid.uuid4().hex[:8]}"
    summary = run_waiting(tiny_recipe, name, "registry.approval_timeout_hours=0.0003")  # about a second
    assert not summary.registered.promoted and "nobody approved it in time" in summary.registered.reason
    client = MlflowClient()
    assert CHAMPION not in client.get_registered_model(name).aliases
    assert client.get_model_version(name, summary.registered.version).tags[APPROVAL_TAG] == "timed out"


def test_manual_approval_without_a_server_that_outlives_the_command_stops_before_any_work(tiny_recipe, monkeypatch,
                                                                                             capsys):
    import os

    from flows.prefect_server import OWN_SERVER_ENV

    monkeypatch.setenv(OWN_SERVER_ENV, os.environ["PREFECT_API_URL"])  # as if `loraflow run` had started it
    assert main(["run", str(tiny_recipe), "-o", "registry.approval=manual"]) == 2
    assert capsys.readouterr().err.startswith("loraflow: error: registry.approval: manual waits for a person through "
                                              "a Prefect server that outlives this command")


def test_a_version_whose_waiting_flow_ended_is_decided_by_loraflow_approve_itself(tiny_adapter, capsys):
    from mlflow.tracking import MlflowClient as Client
    from prefect import flow
    from prefect.runtime import flow_run

    from conf.schema import RegistryConfig
    from tasks.register import RegisterRequest, mark_waiting, register

    name = f"ended-{uuid.uuid4().hex[:8]}"
    client = Client()
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    registered = register(RegisterRequest(
        run_id=run_id, weights_dir=tiny_adapter, base_model=tiny_base_model(), tags={},
        metrics={"tuned_rougeL": 1.0, "base_rougeL": 0.0},
        registry=RegistryConfig(model_name=name, primary_metric="rougeL", approval="manual")))
    assert registered.awaiting_approval and not registered.promoted

    @flow
    def ended() -> str:  # a flow run that waited and is over (crashed, cancelled, or finished otherwise)
        return str(flow_run.id)

    mark_waiting(name, registered.version, ended())
    assert main(["approve", name, registered.version, "--reason", "the night crashed; reviewed by hand"]) == 0
    assert client.get_registered_model(name).aliases[CHAMPION] == int(registered.version)
    assert "approved by" in capsys.readouterr().out
