"""Run bookkeeping beside the flows: what identifies a run (config hash, tags), which runs exist (cut-off, last
finished, recorded), the run's lock, the checks before a flow starts, and sending what an offline run kept.

A run's lock is a file lock in its work folder, held by the process that trains it. A run left RUNNING by a process
that was killed has a free lock: that is how a cut-off run is told apart from one still training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from conf.environment import shown_uri
from conf.schema import RunConfig, UserError, flatten
from flows.approval import check_approval_server
from flows.stages import register_task
from tasks.base_model import check_base_model, resolve_base_model
from tasks.clean import check_readable, clean
from tasks.context import RunContext
from tasks.device import (
    check_compile, check_deepspeed, check_reference_pass, check_sample_prompts, choose_attention, choose_precision,
)
from tasks.evaluate import check_primary_metric, metric_version
from tasks.guards import check_guards
from tasks.locks import file_lock, holds
from tasks.model_card import CardFacts
from tasks.results import PreparedData
from tasks.evaluate_heads import check_head_metric, head_metric_version
from tasks.register import EVAL_DATA_TAG, METRIC_VERSION_TAG, PRIMARY_METRIC_TAG, RegisterRequest, RegisterResult
from tasks.tokenize import load_tokenizer
from tasks.tracking import UNLOGGED_FILE, check_tracking_store, log_artifact, log_params, read_record, replay
from tasks.train import checkpoints_folder, resumable_checkpoint

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "mlflow", "prefect")
CONFIG_HASH_TAG = "loraflow.config_hash"
RERUN_OF_TAG = "loraflow.rerun_of"
RESUME_FORCED_TAG = "loraflow.resume_forced"


class ResumeRefused(UserError):
    """A --resume that would train a run another process holds, or continue a run on data it was not trained on."""


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_context(config: RunConfig, run_id: str) -> RunContext:
    """What the stages of the run `run_id` share: its work folder under the recipe's output_dir, seed and trust."""
    return RunContext(work_dir=config.output_dir / run_id, run_id=run_id, seed=config.seed,
                      trust_remote_code=config.trust_remote_code)


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def run_tags(config: RunConfig) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "base_model": config.base_model,
        "recipe": config.name,
        CONFIG_HASH_TAG: config_hash(config),
        "trust_remote_code": str(config.trust_remote_code).lower(),
    } | {f"version.{package}": version(package) for package in TRACKED_PACKAGES}


def card_facts(config: RunConfig, data: PreparedData) -> CardFacts:
    """What the registered version's model card tells of this run's training and data (tasks/model_card.py)."""
    train, lora, cleaned = config.train, config.train.lora, data.cleaned
    report = json.loads(cleaned.report_path.read_text(encoding="utf-8")) if cleaned.report_path.is_file() else {}
    adapter = ("every weight (full training)" if train.method == "full" else
               f"LoRA r={lora.r}, alpha {lora.alpha}, on {lora.target_modules}" + (", DoRA" if lora.use_dora else ""))
    if train.init_adapter is not None:
        adapter += f", starting from the adapter {train.init_adapter}"
    return CardFacts(recipe=config.name, config_hash=config_hash(config), method=train.method, objective=train.objective,
                     adapter=adapter, steps=train.max_steps, max_length=config.tokenize.max_length,
                     train_tokens=data.tokens.train_tokens, sources=report.get("sources", {}),
                     train_rows=cleaned.train_rows, eval_rows=cleaned.eval_rows, rejected_rows=cleaned.rejected_rows,
                     data_hash=cleaned.data_hash, eval_hash=cleaned.eval_hash)


def run_lock(work_dir: Path) -> contextlib.AbstractContextManager[bool]:
    """Hold the run's lock file while inside; yields False when another live process holds it (taking it again in
    this process is not a second trainer)."""
    return file_lock(work_dir / "run.lock", wait=False, process_wide=True)


def holds_run_lock(work_dir: Path) -> bool:
    return holds(work_dir / "run.lock")


def _runs_of(config: RunConfig, extra_filter: str = "", max_results: int = 1000) -> list:
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        return []
    return mlflow.search_runs(
        [experiment.experiment_id], f"tags.`{CONFIG_HASH_TAG}` = '{config_hash(config)}'{extra_filter}",
        order_by=["attributes.start_time DESC"], max_results=max_results, output_format="list",
    )


@contextlib.contextmanager
def claimed_cut_off_run(config: RunConfig) -> Iterator[str | None]:
    """The newest run of exactly this config that did not finish and left a checkpoint, its lock held until the
    block ends (so through its training); None when there is none.

    Raises ResumeRefused when the newest unfinished run of this config is alive in another process: a second
    trainer of one run would delete checkpoints it is writing.
    """
    for run in _runs_of(config):
        if run.info.status == "FINISHED":
            continue
        work_dir = config.output_dir / run.info.run_id
        if not work_dir.exists() or (work_dir / UNLOGGED_FILE).exists():  # an offline run waits for sync, not resume
            continue
        with run_lock(work_dir) as free:
            if not free:
                raise ResumeRefused(f"run {run.info.run_id} of this recipe is running in another process (it holds "
                                    f"{work_dir / 'run.lock'}); --resume continues only a run that was cut off")
            # Under the lock: resumable_checkpoint removes half-written checkpoints, which a live run may be writing.
            if resumable_checkpoint(checkpoints_folder(work_dir / "train")) is not None:
                yield run.info.run_id
                return
    yield None


def current_data_hash(config: RunConfig) -> str:
    """The hash the clean stage would record for the recipe's data as it is now (cleaned into a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="loraflow-data-hash-") as scratch:
        return clean(config.data, RunContext(Path(scratch)), values=config.identity.model_dump(),
                     task=config.data_kind).data_hash


def check_resume_data(run_id: str, data_hash: str, force: bool) -> str | None:
    """A resume continues training on the data its checkpoint was trained on; returns the note a --force resume on
    changed data records, None when the data is the same."""
    recorded = mlflow.get_run(run_id).data.tags.get("data_hash")
    if recorded is None or recorded == data_hash:
        return None
    note = f"data hash {recorded[:12]} at the checkpoint, {data_hash[:12]} now"
    if not force:
        raise ResumeRefused(f"run {run_id}: the data changed since its checkpoint ({note}); start a new run, or "
                            "--resume --force to continue on the new data (recorded on the run)")
    return note


def score_basis_tags(config: RunConfig, eval_hash: str) -> dict[str, str]:
    """What a run's primary score is measured on, as the version tags that record it: the metric, the held-out rows
    and the metric code."""
    measured_by = (head_metric_version(config.evaluate, config.task) if config.has_head
                   else metric_version(config.evaluate, config.tokenize.mode == "chat"))
    return {PRIMARY_METRIC_TAG: config.registry.primary_metric, EVAL_DATA_TAG: eval_hash,
            METRIC_VERSION_TAG: measured_by}


def last_finished_run(config: RunConfig):
    """The newest FINISHED run of exactly this resolved recipe, or None."""
    runs = _runs_of(config, " and attributes.status = 'FINISHED'", max_results=1)
    return runs[0] if runs else None


def experiment_id(name: str) -> str:
    """The experiment's id, creating it with artifacts under mlruns/ when the store is the local default."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return mlflow.create_experiment(name, artifact_location=os.environ.get("LORAFLOW_ARTIFACT_ROOT"))


def log_config(run_id: str, config: RunConfig, work_dir: Path) -> None:
    """Every resolved key as a param; a value past MLflow's length limit points to config.yaml, which has it whole."""
    log_params(run_id, {
        key: value if len(value) <= MAX_PARAM_VAL_LENGTH else f"<{len(value)} chars: see config.yaml>"
        for key, value in flatten(config).items()
    })
    work_dir.mkdir(parents=True, exist_ok=True)
    config_path = work_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    log_artifact(run_id, config_path)


def preflight(config: RunConfig) -> None:
    """Everything a user can get wrong that is cheap to check, checked before the flow starts any work.

    A UserError raised inside the flow would still stop it, but Prefect logs it with a traceback; here it
    is one line.
    """
    check_base_model(config.base_model)
    check_readable([*config.data.train, *config.data.eval,
                    *(guard.data for guard in config.registry.guards if guard.lm_eval_task is None)],
                   config.data.text_split)
    check_guards(config.registry.guards)
    choose_precision(config.train.precision)
    choose_attention(config.train.attn, config.train.compile is True)
    check_deepspeed(config.train)
    check_sample_prompts(config.train, config.evaluate.every_steps)
    check_reference_pass(config.train)
    check_compile(config.train.compile)
    check_approval_server(config)
    if config.has_head:
        check_head_metric(config.evaluate, config.task, config.registry.primary_metric)
    else:
        check_primary_metric(config.evaluate, config.tokenize.mode == "chat", config.registry.primary_metric,
                             preference=config.train.objective != "sft")
    if config.tokenize.mode == "chat" and not config.has_head:
        load_tokenizer(resolve_base_model(config.base_model), config.tokenize.chat_template, config.trust_remote_code)
    check_tracking_store()  # last: opening a new SQLite store prints MLflow's own notices, which a user error should not


@dataclass(frozen=True)
class Origin:
    """The run a re-run repeats: its id, and the data hash and code commit it recorded."""

    run_id: str
    data_hash: str
    git_commit: str


def recorded_run(run_id: str) -> tuple[RunConfig, Origin]:
    """The resolved recipe a run logged (its config.yaml artifact) and what it recorded of its data and code."""
    try:
        run = mlflow.get_run(run_id)
        with tempfile.TemporaryDirectory() as scratch:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config.yaml", dst_path=scratch)
            logged = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (MlflowException, OSError) as error:
        raise UserError(f"run {run_id}: cannot read its logged recipe ({str(error).splitlines()[0]})") from None
    tags = run.data.tags
    return RunConfig.model_validate(logged), Origin(run_id, tags.get("data_hash", ""), tags.get("git_commit", ""))


@dataclass(frozen=True)
class Synced:
    run_id: str
    applied: dict[str, int]
    registered: RegisterResult | None
    torn: int  # lines of the record a crash left half written, skipped


def sync_run(run_id: str, output_dir: Path) -> Synced:
    """Send what an offline run kept (output_dir/<run id>/unlogged.jsonl) to the tracking server, in order, and
    register its model as the run would have. Safe to run again after a crash part way: registering finds the
    version an earlier sync made instead of making a second."""
    record = output_dir / run_id / UNLOGGED_FILE
    if not record.exists():
        raise UserError(f"{record}: no unlogged record, so run {run_id} has nothing to sync")
    entries, torn = read_record(record)
    if not entries:
        raise UserError(f"{record}: the record holds no entries ({torn} unreadable lines); run {run_id} has nothing "
                        "to sync")
    check_tracking_store()
    lost, current = entries[0], shown_uri(mlflow.get_tracking_uri())
    if lost["op"] == "lost" and lost["uri"] != current:
        raise UserError(f"{record}: run {run_id} lost {lost['uri']}, but MLFLOW_TRACKING_URI is {current}; sync to "
                        "the server the run was made on")
    registered: list[RegisterResult] = []

    def register_entry(client: MlflowClient, run_id: str, entry: dict) -> None:
        # A plain call (no Prefect flow runs); a record kept before requests carried their run id gets it here.
        registered.append(register_task.fn(RegisterRequest.model_validate({"run_id": run_id} | entry)))

    try:
        applied = replay(run_id, record, {"register": register_entry})
    except MlflowException as error:
        raise UserError(f"{record}: sync stopped, its unsent entries kept ({str(error).splitlines()[0]})") from None
    record.rename(record.with_name("synced.jsonl"))
    return Synced(run_id, applied, registered[0] if registered else None, torn)


def unsynced_runs(output_dir: Path) -> list[Path]:
    """Work folders of runs whose unlogged record has not been sent: deleting them loses what the server never got."""
    return sorted(path.parent for path in output_dir.glob(f"*/{UNLOGGED_FILE}"))
