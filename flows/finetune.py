"""The fine-tuning flow: clean -> tokenize -> train -> evaluate -> register, in one MLflow run.

The flow owns the run: it opens it, records the whole resolved config, tags and lineage, hands the run id to
every stage explicitly, and closes it FINISHED or FAILED. A failed stage never reaches register.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
import yaml
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
from prefect import flow

from conf.schema import RunConfig, flatten
from tasks.base_model import cache_root, check_base_model, resolve_base_model
from tasks.clean import check_readable, clean_task
from tasks.evaluate import evaluate_task
from tasks.register import RegisterResult, register_task
from tasks.tokenize import load_tokenizer, tokenize_task
from tasks.train import choose_attention, choose_precision, train_task

TRACKED_PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "mlflow", "prefect")


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    registered: RegisterResult
    samples_path: Path


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_tags(config: RunConfig) -> dict[str, str]:
    return {
        "git_commit": git_commit(),
        "base_model": config.base_model,
        "recipe": config.name,
    } | {f"version.{package}": version(package) for package in TRACKED_PACKAGES}


def experiment_id(name: str) -> str:
    """The experiment's id, creating it with artifacts under mlruns/ when the store is the local default."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    return mlflow.create_experiment(name, artifact_location=os.environ.get("LORAFLOW_ARTIFACT_ROOT"))


def log_config(config: RunConfig, work_dir: Path) -> None:
    """Every resolved key as a param; a value past MLflow's length limit points to config.yaml, which has it whole."""
    params = {
        key: value if len(value) <= MAX_PARAM_VAL_LENGTH else f"<{len(value)} chars: see config.yaml>"
        for key, value in flatten(config).items()
    }
    mlflow.log_params(params)
    config_path = work_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    mlflow.log_artifact(str(config_path))


def preflight(config: RunConfig) -> None:
    """Everything a user can get wrong that is cheap to check, checked before the flow starts any work.

    A UserError raised inside the flow would still stop it, but Prefect logs it with a traceback; here it
    is one line.
    """
    check_base_model(config.base_model)
    check_readable([*config.data.train, *config.data.eval])
    choose_precision(config.train.precision)
    choose_attention(config.train.attn)
    if config.tokenize.mode == "chat":
        load_tokenizer(resolve_base_model(config.base_model), config.tokenize.chat_template)


@flow(name="finetune")
def finetune(config: RunConfig) -> RunSummary:
    """Fine-tune, evaluate and register one recipe; returns where everything landed."""
    model_dir = resolve_base_model(config.base_model)
    tags = run_tags(config)
    with mlflow.start_run(experiment_id=experiment_id(config.experiment), run_name=config.name,
                          tags=tags, log_system_metrics=True) as run:
        run_id = run.info.run_id
        work_dir = config.output_dir / run_id
        work_dir.mkdir(parents=True, exist_ok=True)
        log_config(config, work_dir)
        cleaned = clean_task(config.data, config.identity.model_dump(), work_dir / "clean", run_id)
        tokens = tokenize_task(
            cleaned.train_path, cleaned.eval_path, model_dir, config.tokenize, cache_root() / "tokenized", run_id
        )
        trained = train_task(
            tokens.train_dir, tokens.tokenizer_dir, model_dir, config.train, config.seed, work_dir / "train", run_id
        )
        evaluated = evaluate_task(
            cleaned.eval_path, tokens.eval_dir, model_dir, trained.adapter_dir, config.identity.name,
            config.evaluate, work_dir / "eval", run_id,
        )
        registered = register_task(
            run_id, trained.adapter_dir, config.base_model, evaluated.metrics,
            tags | {"data_hash": cleaned.data_hash}, config.registry,
        )
    return RunSummary(run_id, run.info.experiment_id, evaluated.metrics, registered, evaluated.markdown_path)
