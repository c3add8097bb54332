"""The nightly flow: what `loraflow serve` schedules. Each run reads the recipe and its data sources afresh, and
fine-tunes only when the recipe or the data changed since the last finished run of that recipe (or when forced).

New rows change the data hash, so a night's model version records the data it was trained on (its `data_hash`
tag) and the run it came from.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect import flow, get_run_logger

from conf.schema import load_config
from flows.finetune import Interrupted, Offline, finetune, last_finished_run, preflight
from tasks.clean import clean


@flow(name="nightly")
def nightly(recipe: str, overrides: list[str] | None = None, force: bool = False) -> str:
    """Fine-tune `recipe` (with `overrides`) unless neither it nor its data changed since its last finished run."""
    logger = get_run_logger()
    config = load_config(recipe, overrides or [])
    preflight(config)
    with tempfile.TemporaryDirectory(prefix="loraflow-nightly-") as scratch:
        data_hash = clean(config.data, config.identity.model_dump(), Path(scratch)).data_hash
    last = last_finished_run(config)
    if not force and last is not None and last.data.tags.get("data_hash") == data_hash:
        message = (f"skipped: the recipe and its data (hash {data_hash[:12]}) are unchanged since run "
                   f"{last.info.run_id}; force=true runs anyway")
        logger.info(message)
        return message
    logger.info("data changed since the last finished run" if last is not None else "no finished run of this recipe yet")
    summary = finetune(config)
    if isinstance(summary, Interrupted):
        return f"run {summary.run_id} stopped at step {summary.step}; the next night starts it afresh"
    if isinstance(summary, Offline):
        raise RuntimeError(f"run {summary.run_id} trained, but the tracking server went away: `loraflow sync "
                           f"{summary.run_id}` sends what it kept in {summary.record} and registers the model")
    return f"run {summary.run_id}: {summary.registered.model_name} version {summary.registered.version}"
