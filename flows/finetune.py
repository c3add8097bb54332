"""The fine-tuning flow: clean -> tokenize -> train -> evaluate -> register, in one MLflow run; the same stages train
a task head (classification, NER) when the recipe's `task` names one.

The flow owns the run: it opens it, records the whole resolved config, tags and lineage, hands the run id to
every stage explicitly, and closes it FINISHED, FAILED, or KILLED when training was stopped by SIGTERM. A
failed stage never reaches register. A run cut off before it finished can be resumed: the same MLflow run and
work folder, training from its newest checkpoint. A run whose tracking server went away finishes training and
evaluation offline, keeping what it could not log (registration included) for `loraflow sync`. Locks, hashes,
tags and the other run bookkeeping live beside it in flows/runs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger

from conf.schema import RunConfig, UserError
from flows.runs import (
    RERUN_OF_TAG, RESUME_FORCED_TAG, Origin, experiment_id, holds_run_lock, log_config, register_from_record, run_lock,
    run_tags, score_basis_tags,
)
from tasks.base_model import cache_root, resolve_base_model
from tasks.clean import CleanResult, clean_task
from tasks.evaluate import evaluate_model_task, evaluate_task
from tasks.evaluate_heads import HeadEvalResult, evaluate_head_task
from tasks.generation import sample_prompts
from tasks.labels import Head
from tasks.logged_model import fetch_model
from tasks.register import RegisterResult, RegistryUnavailable, champion_to_rescore
from tasks.tokenize import TokenizedData, tokenize_task
from tasks.tracking import end_run, flow_run, keep_unlogged, offline_record, set_tags
from tasks.train import TrainingStopped, TrainResult, stop_on_sigterm, train_task


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


@dataclass(frozen=True)
class Resume:
    """The cut-off run to continue, whose lock the caller holds (flows.runs.claimed_cut_off_run); `forced` says why a
    resume on changed data went ahead (--force), recorded on the run."""

    run_id: str
    forced: str | None = None


@flow(name="finetune", validate_parameters=False)  # given a validated RunConfig; nothing to coerce
def finetune(config: RunConfig, resume: Resume | None = None, origin: Origin | None = None
             ) -> RunSummary | Interrupted | Offline:
    """Fine-tune, evaluate and register one recipe (or continue the cut-off run `resume`, or repeat the run `origin`
    as a new run tagged with it, warning where its data or code differ from what that run recorded)."""
    if resume is not None and not holds_run_lock(config.output_dir / resume.run_id):
        raise UserError(f"run {resume.run_id}: resume it through claimed_cut_off_run, which holds its lock")
    model_dir = resolve_base_model(config.base_model)
    tags = run_tags(config) | ({RERUN_OF_TAG: origin.run_id} if origin is not None else {})
    if origin is not None and origin.git_commit != tags["git_commit"]:
        get_run_logger().warning(f"re-running {origin.run_id} with code {tags['git_commit'][:12]}; it ran "
                                 f"{origin.git_commit[:12]}")
    trust = config.trust_remote_code
    with flow_run(config.output_dir, run_id=resume.run_id if resume else None,
                  experiment_id=experiment_id(config.experiment), run_name=config.name, tags=tags,
                  log_system_metrics=True) as run:
        run_id = run.info.run_id
        work_dir = config.output_dir / run_id
        with run_lock(work_dir):
            if resume is None:
                log_config(run_id, config, work_dir)
            elif resume.forced:
                set_tags(run_id, {RESUME_FORCED_TAG: resume.forced})

            cleaned = clean_task(config.data, config.identity.model_dump(), work_dir / "clean", run_id, config.task)
            if origin is not None and origin.data_hash != cleaned.data_hash:
                get_run_logger().warning(f"re-running {origin.run_id} on different data: its data hash was "
                                         f"{origin.data_hash[:12]}, now {cleaned.data_hash[:12]}")
                set_tags(run_id, {"loraflow.rerun_data_changed": "true"})

            tokens = tokenize_task(
                cleaned.train_path, cleaned.eval_path, model_dir, config.tokenize, cache_root() / "tokenized", run_id,
                trust, config.task, cleaned.labels,
            )

            try:
                with stop_on_sigterm():
                    trained = train_task(
                        tokens.train_dir, tokens.tokenizer_dir, model_dir, config.train, config.seed,
                        work_dir / "train", run_id, resume=resume is not None, trust_remote_code=trust,
                        samples=None if config.has_head else sample_prompts(config.evaluate, cleaned.eval_path,
                                                                            config.tokenize.tool_format),
                        head=Head(config.task, tokens.labels) if config.has_head else None,
                    )
            except TrainingStopped as stopped:
                end_run(run_id, "KILLED")
                return Interrupted(run_id, stopped.step, stopped.checkpoint)

            evaluated = evaluate_stage(config, cleaned, tokens, trained, model_dir, work_dir / "eval", run_id)

            basis = score_basis_tags(config, cleaned.eval_hash)
            register_args = {
                "weights_dir": str(trained.weights_dir), "base_model": config.base_model, "metrics": evaluated.metrics,
                "tags": tags | basis | {"data_hash": cleaned.data_hash},
                "registry": config.registry.model_dump(mode="json"),
            }
            if (record := offline_record(run_id)) is not None:
                keep_unlogged(run_id, {"op": "register"} | register_args)
                return Offline(run_id, evaluated.metrics, trained.weights_dir, record)
            register_args["champion_score"] = score_champion_head_to_head(
                config, basis, cleaned, work_dir, run_id, trained.precision)
            registered = register_from_record(run_id, register_args)
    return RunSummary(run_id, run.info.experiment_id, evaluated.metrics, registered, evaluated.markdown_path)


def evaluate_stage(config: RunConfig, cleaned: CleanResult, tokens: TokenizedData, trained: TrainResult, model_dir: str,
                   out_dir: Path, run_id: str, label: str = ""):
    """Stage 4, base vs tuned: a task head's labels, or the language model's loss and answers."""
    if config.has_head:
        return evaluate_head_task(tokens.eval_dir, model_dir, trained.weights_dir, config.evaluate, out_dir, run_id,
                                  config.seed, trained.precision, config.trust_remote_code, label)
    return evaluate_task(cleaned.eval_path, tokens.eval_dir, model_dir, trained.weights_dir, config.identity.name,
                         config.evaluate, out_dir, run_id, trained.precision, config.trust_remote_code,
                         config.tokenize.tool_format)


def score_champion_head_to_head(config: RunConfig, basis: dict[str, str], cleaned: CleanResult, work_dir: Path,
                                run_id: str, precision: str) -> dict | None:
    """The champion scored again on this run's held-out rows when its own score was measured on other rows or by
    other metric code ({version, value}, logged as champion_<metric>); None when its stored score compares as is.

    A registry that cannot be read here is left to the register stage, which reads it again and keeps the version
    undecided if it still cannot: an unreadable champion is never taken for no champion.
    """
    try:
        champion = champion_to_rescore(config.registry.model_name, basis)
    except RegistryUnavailable:
        return None
    if champion is None:
        return None
    get_run_logger().info(f"the champion (version {champion.version}) was scored on other held-out data or metric "
                          "code: scoring it again on this run's held-out data")
    folder = work_dir / "champion"
    source = fetch_model(f"models:/{config.registry.model_name}/{champion.version}", folder / "model",
                         config.trust_remote_code)
    if config.has_head:  # the champion's head, scored as the tuned model is (its base head drawn with this seed)
        champion_head = Head.of(source.weights_dir)
        if champion_head is None or champion_head.task != config.task or set(cleaned.labels) - set(champion_head.labels):
            get_run_logger().warning(f"the champion (version {champion.version}) cannot label this data (another task "
                                     "or fewer labels); it is not scored again, and this version is not compared")
            return None
        tokens = tokenize_task(cleaned.train_path, cleaned.eval_path, source.model_dir, config.tokenize,
                               cache_root() / "tokenized", run_id, config.trust_remote_code, config.task,
                               champion_head.labels)
        scored: HeadEvalResult = evaluate_head_task(
            tokens.eval_dir, source.model_dir, source.weights_dir, config.evaluate, folder / "eval", run_id,
            config.seed, precision, config.trust_remote_code, label="champion")
        return {"version": str(champion.version), "value": scored.metrics[f"tuned_{config.registry.primary_metric}"]}
    tokens = tokenize_task(cleaned.train_path, cleaned.eval_path, source.tokenizer_dir, config.tokenize,
                           cache_root() / "tokenized", run_id, config.trust_remote_code)
    scored = evaluate_model_task(
        cleaned.eval_path, tokens.eval_dir, tokens.tokenizer_dir, source.model_dir, source.weights_dir,
        config.identity.name, config.evaluate, folder / "eval", run_id, precision, config.trust_remote_code,
        label="champion", tool_format=config.tokenize.tool_format,
    )
    return {"version": str(champion.version), "value": scored.metrics[config.registry.primary_metric]}
