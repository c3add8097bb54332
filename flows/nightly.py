"""The nightly flow: what `loraflow serve` schedules. Each run reads the recipe and its data sources afresh, and
fine-tunes only when the recipe or the data changed since the last finished run of that recipe (or when forced).
A run of the recipe that a stop, kill or reboot cut off is resumed from its checkpoint when the data is unchanged.

New rows change the data hash, so a night's model version records the data it was trained on (its `data_hash`
tag) and the run it came from. A night that fails, is skipped, or ends without a new champion posts one message
to the recipe's webhook (`notify.webhook_url`, or LORAFLOW_WEBHOOK_URL) through Prefect's own webhook notification
block, from the flow's state hooks; a webhook that cannot be reached is logged and changes nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from prefect import flow, get_run_logger
from prefect.logging import get_logger

from conf.environment import apply_tool_defaults, shown_uri
from conf.schema import load_config
from flows.finetune import Interrupted, Offline, Resume, finetune
from flows.notify import post_webhook, webhook_url
from flows.runs import (
    ResumeRefused, check_resume_data, claimed_cut_off_run, current_data_hash, last_finished_run, preflight,
)


@dataclass(frozen=True)
class Night:
    """What a night did: `outcome` is promoted, not_promoted, skipped or stopped; `reason` says why in one line."""

    outcome: str
    reason: str
    recipe: str
    run_id: str | None = None
    experiment_id: str | None = None


def notify_night(flow, flow_run, state) -> None:
    """State hook: one Slack-compatible message for a night that failed, was skipped, or promoted nothing."""
    parameters = flow_run.parameters
    if state.is_failed():
        night = Night("failed", str(state.message or "the flow failed").splitlines()[0][:500],
                      str(parameters.get("recipe")))
    else:
        night = state.result(raise_on_failure=False)
        if not isinstance(night, Night) or night.outcome == "promoted":
            return
    try:
        url = webhook_url(load_config(parameters["recipe"], parameters.get("overrides") or [])
                          if parameters.get("recipe") else None)
    except Exception as error:  # a recipe that no longer loads: its failure is the news, not this
        url = webhook_url(None)
        get_logger("loraflow.nightly").warning(f"notification: the recipe's webhook is unknown ({error})")
    if not url:
        return
    text = f"loraflow nightly {night.recipe}: {night.outcome}: {night.reason}"
    post_webhook(url, text, {"text": text, "recipe": night.recipe, "outcome": night.outcome, "reason": night.reason,
                             "run_id": night.run_id, "link": run_link(night.run_id, night.experiment_id)})


def run_link(run_id: str | None, experiment_id: str | None) -> str | None:
    """The run's page in the MLflow UI for a tracking server; for a local store, the run id's URI."""
    if run_id is None:
        return None
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")) and experiment_id:
        return f"{shown_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"runs:/{run_id}"


@flow(name="nightly", on_completion=[notify_night], on_failure=[notify_night])
def nightly(recipe: str, overrides: list[str] | None = None, force: bool = False) -> Night:
    """Fine-tune `recipe` (with `overrides`) unless neither it nor its data changed since its last finished run."""
    apply_tool_defaults()  # a worker's flow run gets what `loraflow` commands set (loraflow serve has them already)
    logger = get_run_logger()
    config = load_config(recipe, overrides or [])
    preflight(config)
    data_hash = current_data_hash(config)
    last = last_finished_run(config)
    if not force and last is not None and last.data.tags.get("data_hash") == data_hash:
        reason = (f"the recipe and its data (hash {data_hash[:12]}) are unchanged since run {last.info.run_id}; "
                  "force=true runs anyway")
        logger.info(f"skipped: {reason}")
        return Night("skipped", reason, config.name, last.info.run_id, last.info.experiment_id)
    with claimed_cut_off_run(config) as cut_off:  # its lock held through training
        resume = None
        if cut_off is not None:
            try:
                check_resume_data(cut_off, data_hash, force=False)
                resume = Resume(cut_off)
                logger.info(f"resuming run {cut_off}, cut off before it finished, on the same data")
            except ResumeRefused:
                logger.info(f"run {cut_off} was cut off, but the data changed since; starting afresh")
        if resume is None:
            logger.info("data changed since the last finished run" if last is not None
                        else "no finished run of this recipe yet")
        summary = finetune(config, resume)
    if isinstance(summary, Interrupted):
        return Night("stopped", f"stopped at step {summary.step}; the next night resumes it", config.name,
                     summary.run_id)
    if isinstance(summary, Offline):
        raise RuntimeError(f"run {summary.run_id} trained, but the tracking server went away: `loraflow sync "
                           f"{summary.run_id}` sends what it kept in {summary.record} and registers the model")
    registered = summary.registered
    if not registered.decided:
        raise RuntimeError(f"run {summary.run_id}: {registered.model_name} version {registered.version} "
                           f"{registered.reason}")
    outcome = "promoted" if registered.promoted else "not_promoted"
    return Night(outcome, f"{registered.model_name} version {registered.version}: {registered.reason}", config.name,
                 summary.run_id, summary.experiment_id)
