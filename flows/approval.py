"""Manual approval (`registry.approval: manual`): a version that passed every rule waits as challenger while the
flow pauses, with Prefect's own pause and its input form, until a person approves or rejects it: in the Prefect UI,
or with `loraflow approve/reject NAME VERSION`, which answer the paused flow run through Prefect's API. The decision
(who, when, why) is recorded on the version; no decision before `registry.approval_timeout_hours` means not promoted.
"""

from __future__ import annotations

import getpass
import os
from uuid import UUID

from prefect import get_run_logger
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.utilities.urls import url_for

from conf.schema import RunConfig, UserError
from flows.notify import post_webhook, webhook_url
from flows.prefect_server import OWN_SERVER_ENV
from flows.promotion import shared_lock
from tasks.register import (
    Approval, RegisterResult, RegistryError, mark_waiting, pending_approval, settle_approval,
)

POLL_SECONDS = 2  # how often the paused flow asks Prefect's server whether it was answered


class ApprovalInput(RunInput):
    """The form the Prefect UI shows on the paused flow run."""

    approve: bool = False
    reason: str = ""
    decided_by: str = ""


def check_approval_server(config: RunConfig) -> None:
    """Before any work: a flow that waits for a person must report to a Prefect server the person can reach (an
    embedded one lives and dies with the flow's own process)."""
    url = get_current_settings().api.url
    if config.registry.approval == "manual" and (not url or url == os.environ.get(OWN_SERVER_ENV)):
        raise UserError("registry.approval: manual waits for a person through a Prefect server that outlives this "
                        "command; set PREFECT_API_URL (`loraflow prefect-ui` starts one), or use approval: auto")


def await_approval(registered: RegisterResult, config: RunConfig) -> RegisterResult:
    """Pause the flow until a person decides on the registered version (or time runs out), then record it."""
    name, version = registered.model_name, registered.version
    flow_run_id = str(flow_run.id)
    mark_waiting(name, version, flow_run_id)
    link = url_for("flow-run", obj_id=flow_run_id)  # its page in the Prefect UI, where the input form is
    text = (f"loraflow: {name} version {version} passed every rule and awaits approval: {link} "
            f"(or `loraflow approve {name} {version}` / `loraflow reject {name} {version} --reason ...`)")
    get_run_logger().warning(text)
    if (url := webhook_url(config)) is not None:
        post_webhook(url, text, {"text": text, "model": name, "version": version, "outcome": "awaiting_approval",
                                 "reason": registered.reason, "link": link})
    hours = config.registry.approval_timeout_hours
    try:
        answer = pause_flow_run(wait_for_input=ApprovalInput.with_initial_data(
            description=f"Approve {name} version {version}? {registered.reason}"),
            timeout=max(1, round(hours * 3600)), poll_interval=POLL_SECONDS, key=f"approve-{name}-{version}")
        approval = Approval(answer.approve, answer.decided_by or "the Prefect UI", answer.reason)
    except FlowPauseTimeout:
        approval = Approval(None)
    return settle_approval(name, version, approval, shared_lock())


def answer_approval(name: str, version: str, approve: bool, reason: str) -> str:
    """A person's decision on a version awaiting approval: handed to the flow run waiting for it, or recorded here
    when none waits (a version `loraflow sync` registered, or a flow run that ended while waiting: crashed, or
    cancelled). Says what happened, in one line."""
    waiting = pending_approval(name, version)
    by = getpass.getuser()
    if waiting is not None and _still_running(waiting, name, version):
        try:
            resume_flow_run(UUID(waiting), run_input={"approve": approve, "reason": reason, "decided_by": by})
            return f"{'approved' if approve else 'rejected'}; flow run {waiting} records it and moves the alias if so"
        except NotPausedError:
            raise RegistryError(f"{name} version {version}: its flow run {waiting} has not paused yet; try again in "
                                "a moment") from None
    result = settle_approval(name, version, Approval(approve, by, reason), shared_lock())
    return result.reason


def _still_running(flow_run_id: str, name: str, version: str) -> bool:
    """Whether the flow run that waits for the decision has not ended; RegistryError when Prefect cannot say."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception as error:  # the server is down or does not know the run: nobody can tell whether it waits
        raise RegistryError(f"{name} version {version}: cannot reach the Prefect server its flow run {flow_run_id} "
                            f"waits on ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                            ) from None
    return state is None or not state.is_final()
