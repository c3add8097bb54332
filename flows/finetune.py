"""The fine-tuning flow: clean -> tokenize -> train -> evaluate -> register, in one MLflow run.

The flow owns the run: it opens it, records the whole resolved config, tags and lineage, hands the run id to
every stage explicitly, and closes it FINISHED, FAILED, or KILLED when training was stopped by SIGTERM. A
failed stage never reaches register. A run cut off before it finished can be resumed: the same MLflow run and
work folder, training from its newest checkpoint. A run whose tracking server went away finishes training and
evaluation offline, keeping what it could not log (registration included) for `sync_run`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from prefect import flow, get_run_logger

from conf.schema import RegistryConfig, RunConfig, UserError, flatten
from tasks.base_model import cache_root, check_base_model, resolve_base_model
from tasks.clean import check_readable, clean_task
from tasks.evaluate import check_primary_metric, evaluate_task, sample_prompts
from tasks.register import RegisterResult, register_task
from tasks.tracking import (
    UNLOGGED_FILE, check_tracking_store, end_run, flow_run, keep_unlogged, log_artifact, log_params, offline_record,
    read_record, replay, set_tags,
)
from tasks.tokenize import load_tokenizer, tokenize_task
from tasks.train import (
    TrainingStopped, check_deepspeed, check_sample_prompts, checkpoints_folder, choose_attention, choose_precision,
    resumable_checkpoint, stop_on_sigterm, train_task,
)

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "mlflow", "prefect")
CONFIG_HASH_TAG = "loraflow.config_hash"
RERUN_OF_TAG = "loraflow.rerun_of"


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    registered: RegisterResult
    samples_path: Path


@dataclass(frozen=True)
class Offline:
    """The tracking server went away during the run: training and evaluation finished, the weights are on disk, and
    what could not be logged (registration included) is in `record`; `loraflow sync RUN_ID` sends it."""

    run_id: str
    metrics: dict[str, float]
    weights_dir: Path
    record: Path


@dataclass(frozen=True)
class Interrupted:
    """Training was stopped (SIGTERM) after saving `checkpoint`; `loraflow run --resume` continues the run."""

    run_id: str
    step: int
    checkpoint: Path


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


@contextlib.contextmanager
def run_lock(work_dir: Path) -> Iterator[bool]:
    """Hold the run's lock file while its flow is alive; yields False when another live process holds it.

    A run left RUNNING by a process that was killed has a free lock: that is how a cut-off run is told apart
    from one still training.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / "run.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def cut_off_run(config: RunConfig) -> str | None:
    """The newest run of exactly this config that did not finish, is not alive, and left a checkpoint."""
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        [experiment.experiment_id], f"tags.`{CONFIG_HASH_TAG}` = '{config_hash(config)}'",
        order_by=["attributes.start_time DESC"], output_format="list",
    )
    for run in runs:
        if run.info.status == "FINISHED":
            continue
        work_dir = config.output_dir / run.info.run_id
        if not work_dir.exists() or (work_dir / UNLOGGED_FILE).exists():  # an offline run waits for sync, not resume
            continue
        # The lock first: resumable_checkpoint removes half-written checkpoints, which a live run may be writing.
        with run_lock(work_dir) as free:
            if free and resumable_checkpoint(checkpoints_folder(work_dir / "train")) is not None:
                return run.info.run_id
    return None


def last_finished_run(config: RunConfig):
    """The newest FINISHED run of exactly this resolved recipe, or None."""
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        f"tags.`{CONFIG_HASH_TAG}` = '{config_hash(config)}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
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
    check_readable([*config.data.train, *config.data.eval])
    choose_precision(config.train.precision)
    choose_attention(config.train.attn)
    check_deepspeed(config.train)
    check_sample_prompts(config.train, config.evaluate.every_steps)
    check_primary_metric(config.evaluate, config.tokenize.mode == "chat", config.registry.primary_metric)
    if config.tokenize.mode == "chat":
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


@flow(name="finetune", validate_parameters=False)  # given a validated RunConfig; nothing to coerce
def finetune(config: RunConfig, resume_run_id: str | None = None, origin: Origin | None = None
             ) -> RunSummary | Interrupted | Offline:
    """Fine-tune, evaluate and register one recipe (or continue the cut-off run `resume_run_id`, or repeat the run
    `origin` as a new run tagged with it, warning where its data or code differ from what that run recorded)."""
    model_dir = resolve_base_model(config.base_model)
    tags = run_tags(config) | ({RERUN_OF_TAG: origin.run_id} if origin is not None else {})
    if origin is not None and origin.git_commit != tags["git_commit"]:
        get_run_logger().warning(f"re-running {origin.run_id} with code {tags['git_commit'][:12]}; it ran "
                                 f"{origin.git_commit[:12]}")
    trust = config.trust_remote_code
    with flow_run(config.output_dir, run_id=resume_run_id, experiment_id=experiment_id(config.experiment),
                  run_name=config.name, tags=tags, log_system_metrics=True) as run:
        run_id = run.info.run_id
        work_dir = config.output_dir / run_id
        with run_lock(work_dir):
            if resume_run_id is None:
                log_config(run_id, config, work_dir)
            cleaned = clean_task(config.data, config.identity.model_dump(), work_dir / "clean", run_id)
            if origin is not None and origin.data_hash != cleaned.data_hash:
                get_run_logger().warning(f"re-running {origin.run_id} on different data: its data hash was "
                                         f"{origin.data_hash[:12]}, now {cleaned.data_hash[:12]}")
                set_tags(run_id, {"loraflow.rerun_data_changed": "true"})
            tokens = tokenize_task(
                cleaned.train_path, cleaned.eval_path, model_dir, config.tokenize, cache_root() / "tokenized", run_id,
                trust,
            )
            try:
                with stop_on_sigterm():
                    trained = train_task(
                        tokens.train_dir, tokens.tokenizer_dir, model_dir, config.train, config.seed,
                        work_dir / "train", run_id, resume=resume_run_id is not None, trust_remote_code=trust,
                        samples=sample_prompts(config.evaluate, cleaned.eval_path),
                    )
            except TrainingStopped as stopped:
                end_run(run_id, "KILLED")
                return Interrupted(run_id, stopped.step, stopped.checkpoint)
            evaluated = evaluate_task(
                cleaned.eval_path, tokens.eval_dir, model_dir, trained.weights_dir, config.identity.name,
                config.evaluate, work_dir / "eval", run_id, trained.precision, trust,
            )
            register_args = {
                "weights_dir": str(trained.weights_dir), "base_model": config.base_model, "metrics": evaluated.metrics,
                "tags": tags | {"data_hash": cleaned.data_hash}, "registry": config.registry.model_dump(mode="json"),
                "trust_remote_code": trust,
            }
            if (record := offline_record(run_id)) is not None:
                keep_unlogged(run_id, {"op": "register"} | register_args)
                return Offline(run_id, evaluated.metrics, trained.weights_dir, record)
            registered = _register(run_id, register_args)
    return RunSummary(run_id, run.info.experiment_id, evaluated.metrics, registered, evaluated.markdown_path)


def _register(run_id: str, args: dict, register: Callable[..., RegisterResult] = register_task) -> RegisterResult:
    """The register stage, given its arguments in the JSON form an offline run keeps in its record."""
    return register(run_id, Path(args["weights_dir"]), args["base_model"], args["metrics"], args["tags"],
                    RegistryConfig.model_validate(args["registry"]), args["trust_remote_code"])


@dataclass(frozen=True)
class Synced:
    run_id: str
    applied: dict[str, int]
    registered: RegisterResult | None


def sync_run(run_id: str, output_dir: Path) -> Synced:
    """Send what an offline run kept (output_dir/<run id>/unlogged.jsonl) to the tracking server, in order, and
    register its model as the run would have."""
    record = output_dir / run_id / UNLOGGED_FILE
    if not record.exists():
        raise UserError(f"{record}: no unlogged record, so run {run_id} has nothing to sync")
    check_tracking_store()
    lost = read_record(record)[0]
    if lost["op"] == "lost" and lost["uri"] != mlflow.get_tracking_uri():
        raise UserError(f"{record}: run {run_id} lost {lost['uri']}, but MLFLOW_TRACKING_URI is "
                        f"{mlflow.get_tracking_uri()}; sync to the server the run was made on")
    registered: list[RegisterResult] = []

    def register_entry(client: MlflowClient, run_id: str, entry: dict) -> None:
        registered.append(_register(run_id, entry, register_task.fn))  # a plain call: no Prefect flow runs here

    try:
        applied = replay(run_id, record, {"register": register_entry})
    except MlflowException as error:
        raise UserError(f"{record}: sync stopped, its unsent entries kept ({str(error).splitlines()[0]})") from None
    record.rename(record.with_name("synced.jsonl"))
    return Synced(run_id, applied, registered[0] if registered else None)
