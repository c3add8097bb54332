"""Manual approval: with `registry.approval: manual` the flow pauses (Prefect's pause, on the test process's Prefect
server) with a version that passed every rule as challenger, until `loraflow approve` moves the alias, `loraflow
reject` leaves it, or the timeout leaves it; the registry records who decided, when and why."""

import asyncio
import getpass
import threading
import time
import uuid
from dataclasses import replace
from uuid import UUID

import pytest
from mlflow.tracking import MlflowClient

from conf.schema import load_config
from flows.cli import main
from tasks.register import APPROVAL_RUN_TAG, APPROVAL_TAG, CHALLENGER, CHAMPION, PROMOTION_TAG

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


def test_the_flow_waits_and_loraflow_approve_makes_the_version_champion(tiny_recipe):
    name = f"approve-{uuid.uuid4().hex[:8]}"
    thread, seen = decide_when_waiting(name, "approve", "--reason", "read the samples")
    summary = run_waiting(tiny_recipe, name)
    thread.join(10)
    version = summary.registered.version
    assert seen == {"flow_run": seen["flow_run"], "version": version, "exit": 0} and paused(seen["flow_run"])
    assert summary.registered.promoted and summary.registered.reason.startswith(f"approved by {getpass.getuser()}")
    client = MlflowClient()
    assert client.get_registered_model(name).aliases == {CHAMPION: int(version), CHALLENGER: int(version)}
    tags = client.get_model_version(name, version).tags
    assert tags[APPROVAL_TAG] == "approved" and tags["loraflow.approval_by"] == getpass.getuser()
    assert tags["loraflow.approval_reason"] == "read the samples" and tags["loraflow.approval_at"]
    assert client.get_run(summary.run_id).data.tags["promotion"] == tags[PROMOTION_TAG]


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
