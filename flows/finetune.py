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

from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger

from conf.schema import RunConfig, UserError, load_config
from flows.approval import await_approval
from flows.chain import names_recipe, starting_adapter
from flows.runs import (
    RERUN_OF_TAG, RESUME_FORCED_TAG, Origin, card_facts, experiment_id, holds_run_lock, log_config, run_context,
    run_lock, run_tags, score_basis_tags,
)
from flows.stages import (
    evaluate_task, guard_task, prepare_data, register_task, score_champion_head_to_head, train_task,
)
from tasks.base_model import resolve_base_model
from tasks.generation import sample_prompts
from tasks.register import RegisterRequest, RegisterResult
from tasks.tracking import end_run, flow_run, keep_unlogged, offline_record, set_tags
from tasks.train import TrainingStopped, stop_on_sigterm


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    experiment_id: str
    metrics: dict[str, float]
    registered: RegisterResult | None  # None: a first stage, which is not registered
    samples_path: Path
    weights_dir: Path
    choices: dict[str, str] = field(default_factory=dict)  # what each automatic training setting became, and why


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
def finetune(config: RunConfig, resume: Resume | None = None, origin: Origin | None = None, register: bool = True
             ) -> RunSummary | Interrupted | Offline:
    """Fine-tune, evaluate and register one recipe (or continue the cut-off run `resume`, or repeat the run `origin`
    as a new run tagged with it, warning where its data or code differ from what that run recorded). A recipe named
    as `train.init_adapter` is trained first, as a run of its own that is not registered (`register` False)."""
    if resume is not None and not holds_run_lock(config.output_dir / resume.run_id):
        raise UserError(f"run {resume.run_id}: resume it through claimed_cut_off_run, which holds its lock")
    first_stage = None
    if resume is None and names_recipe(config.train.init_adapter):
        first = finetune(load_config(config.train.init_adapter), register=False)
        if not isinstance(first, RunSummary):
            raise UserError(f"train.init_adapter: the first stage, {config.train.init_adapter}, did not finish "
                            f"(run {first.run_id}); resume or repeat it, then start from its adapter (its run id)")
        first_stage = (first.run_id, first.weights_dir)
    model_dir = resolve_base_model(config.base_model)
    tags = run_tags(config) | ({RERUN_OF_TAG: origin.run_id} if origin is not None else {})
    if origin is not None and origin.git_commit != tags["git_commit"]:
        get_run_logger().warning(f"re-running {origin.run_id} with code {tags['git_commit'][:12]}; it ran "
                                 f"{origin.git_commit[:12]}")
    with flow_run(config.output_dir, run_id=resume.run_id if resume else None,
                  experiment_id=experiment_id(config.experiment), run_name=config.name, tags=tags,
                  log_system_metrics=True) as run:
        ctx = run_context(config, run.info.run_id)
        with run_lock(ctx.work_dir):
            if resume is None:
                log_config(ctx.run_id, config, ctx.work_dir)
            elif resume.forced:
                set_tags(ctx.run_id, {RESUME_FORCED_TAG: resume.forced})
            config = starting_adapter(config, ctx, first_stage=first_stage, resumed=resume is not None)

            data = prepare_data(config, model_dir, ctx)
            if origin is not None and origin.data_hash != data.cleaned.data_hash:
                get_run_logger().warning(f"re-running {origin.run_id} on different data: its data hash was "
                                         f"{origin.data_hash[:12]}, now {data.cleaned.data_hash[:12]}")
                set_tags(ctx.run_id, {"loraflow.rerun_data_changed": "true"})

            try:
                with stop_on_sigterm():
                    samples = None if config.has_head else sample_prompts(config.evaluate, data.cleaned.eval_path,
                                                                          config.tokenize.tool_format)
                    trained = train_task(data, model_dir, config, ctx, resume=resume is not None, samples=samples)
            except TrainingStopped as stopped:
                end_run(ctx.run_id, "KILLED")
                return Interrupted(ctx.run_id, stopped.step, stopped.checkpoint)

            evaluated = evaluate_task(data, trained, config, ctx)
            guards = guard_task(config, data.tokens, trained.model, trained.precision, ctx) if config.registry.guards else []

            basis = score_basis_tags(config, data.cleaned.eval_hash)
            request = RegisterRequest(run_id=ctx.run_id, weights_dir=trained.weights_dir, base_model=config.base_model,
                                      metrics=evaluated.metrics, tags=tags | basis | {"data_hash": data.cleaned.data_hash},
                                      registry=config.registry, card=card_facts(config, data), guards=guards,
                                      evaluated_answers=evaluated.answers_path)
            if (record := offline_record(ctx.run_id)) is not None:
                keep_unlogged(ctx.run_id, {"op": "register"} | request.model_dump(mode="json"))
                return Offline(ctx.run_id, evaluated.metrics, trained.weights_dir, record)
            registered = None
            if register:
                champion = score_champion_head_to_head(config, basis, data.cleaned, ctx, precision=trained.precision)
                registered = register_task(request.model_copy(update={"champion_score": champion}))
                if registered.awaiting_approval:
                    registered = await_approval(registered, config)
                    set_tags(ctx.run_id, {"promotion": registered.reason})
    return RunSummary(ctx.run_id, run.info.experiment_id, evaluated.metrics, registered, evaluated.markdown_path,
                      trained.weights_dir, trained.choices)

