"""The stages as Prefect tasks, each with its MLflow bookkeeping: the edge where tasks/ meets the engines.

A stage in tasks/ is a plain function of upstream results, its config section and a RunContext; here it becomes a
Prefect task that logs what the stage made to the run named in the context. The flows compose these, and
`prepare_data` is the one way any of them (and the preview, and the champion's head-to-head) reads a recipe's data.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from conf.schema import DataConfig, RunConfig, TokenizeConfig, UserError
from flows.promotion import shared_lock
from tasks.clean import clean
from tasks.context import RunContext
from tasks.evaluate import evaluate_model, evaluate_tuned
from tasks.evaluate_heads import evaluate_head
from tasks.generation import SamplePrompts
from tasks.guards import GuardScore, GuardSuite, lm_eval_task, score_guards
from tasks.labels import Head
from tasks.logged_model import fetch_model
from tasks.register import (
    ChampionScore, RegisterRequest, RegisterResult, RegistryUnavailable, champion_to_rescore, register,
)
from tasks.results import CleanResult, EvalResult, ModelSource, PreparedData, TokenizedData, TrainResult
from tasks.tokenize import encode_conversations, tokenize
from tasks.tracking import (
    log_artifact, log_inputs, log_loss_plot, log_metrics, log_table, sample_logger, set_tags, step_logger,
    unlogged_record_path,
)
from tasks.train import HeldOutReport, checkpoints_folder, resumable_checkpoint, train, train_in_workers


def _progress(line: str) -> None:
    """One line per stage on the console (Prefect's own lines per task run show with --verbose)."""
    print(f"loraflow: {line}", file=sys.stderr, flush=True)


@task(name="clean", cache_policy=NO_CACHE)
def clean_task(config: RunConfig, ctx: RunContext) -> CleanResult:
    """clean(), with its report, rejects and data lineage logged to the run (and the report's warnings, such as
    classes with few examples, to the flow's log); a plain call (`.fn`) without a run logs nothing."""
    result = clean(config.data, ctx, values=config.identity.model_dump(), task=config.data_kind)
    if ctx.run_id is None:
        return result
    _progress(f"clean: {result.train_rows} train rows, {result.eval_rows} held out, {result.rejected_rows} rejected "
              f"({result.rejects_path})")
    for warning in json.loads(result.report_path.read_text(encoding="utf-8")).get("warnings", []):
        get_run_logger().warning(f"data: {warning}")
    for path in (result.report_path, result.rejects_path, result.train_path, result.eval_path):
        log_artifact(ctx.run_id, path, "data")
    log_metrics(ctx.run_id, {"data_train_rows": result.train_rows, "data_eval_rows": result.eval_rows,
                             "data_rejected_rows": result.rejected_rows})
    set_tags(ctx.run_id, {"data_hash": result.data_hash})
    log_inputs(ctx.run_id, {"train": result.train_path, "eval": result.eval_path}, result.data_hash[:16])
    return result


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize_task(cleaned: CleanResult, model_dir: str, config: TokenizeConfig, ctx: RunContext, *,
                  labels: tuple[str, ...] | None = None) -> TokenizedData:
    """tokenize(), with sample and token counts and the cache key logged to the run (a plain call without a run logs
    nothing)."""
    result = tokenize(cleaned, model_dir, config, ctx, labels=labels)
    if ctx.run_id is None:
        return result
    _progress(f"tokenize: {result.train_samples} samples, {result.train_tokens} tokens in {result.train_rows} rows"
              + (" (cached)" if result.cache_hit else ""))
    log_metrics(
        ctx.run_id,
        {"tokenize_train_samples": result.train_samples, "tokenize_train_rows": result.train_rows,
         "tokenize_eval_samples": result.eval_samples, "tokenize_train_tokens": result.train_tokens,
         "tokenize_truncated": result.truncated, "tokenize_cache_hit": int(result.cache_hit)}
        | {f"tokenize_rejected_{reason}": count for reason, count in result.rejected.items()}
        | {f"tokenize_reasoning_{what}": count for what, count in result.reasoning.items()},
    )
    set_tags(ctx.run_id, {"tokenize.cache_key": result.cache_key})
    return result


def prepare_data(config: RunConfig, model_dir: str, ctx: RunContext, *, cleaned: CleanResult | None = None,
                 labels: tuple[str, ...] | None = None) -> PreparedData:
    """The recipe's data cleaned (unless `cleaned` is given: the same rows for a second tokenizer) and tokenized with
    `model_dir`'s tokenizer (a trained head's `labels`, when scoring one). Logged to ctx.run_id when there is one;
    without (the preview) the plain stages run, with neither Prefect nor MLflow."""
    logged = ctx.run_id is not None
    if cleaned is None:
        cleaned = (clean_task if logged else clean_task.fn)(config, ctx)
    tokens = (tokenize_task if logged else tokenize_task.fn)(cleaned, model_dir, config.tokenize, ctx, labels=labels)
    return PreparedData(cleaned, tokens)


def weights_artifact(method: str) -> str:
    """The run's artifact folder the trained weights are logged under."""
    return "model_full" if method == "full" else "adapter_peft"


@task(name="train", cache_policy=NO_CACHE)
def train_task(data: PreparedData, model_dir: str, config: RunConfig, ctx: RunContext, *, resume: bool = False,
               samples: SamplePrompts | None = None, prune: Callable[[int, float], bool] | None = None) -> TrainResult:
    """train() (in torchrun workers for DeepSpeed, several processes or nodes), each step logged to the run, and the
    weights.

    With `resume`, training continues from the newest complete checkpoint of this run, if there is one. Answers to
    `samples` during training go to the run's table eval/during_training.json. With `evaluate.loss_every_steps`, the
    held-out loss is logged as eval_loss at those steps, and `prune(step, loss)` answering True stops training there
    (TrainingPruned).
    """
    resume_from = resumable_checkpoint(checkpoints_folder(ctx.work_dir / "train")) if resume else None
    if config.train.in_workers:
        result = train_in_workers(data.tokens, model_dir, config.train, ctx, resume_from=resume_from, samples=samples,
                                  unlogged_record=unlogged_record_path(ctx.run_id))
    else:
        log_step = step_logger(ctx.run_id)

        def on_heldout_loss(step: int, loss: float) -> bool:
            log_step(step, {"eval_loss": loss})
            return prune is not None and prune(step, loss)

        every = config.evaluate.loss_every_steps
        result = train(data.tokens, model_dir, config.train, ctx, resume_from=resume_from, samples=samples,
                       on_step=log_step, on_samples=sample_logger(ctx.run_id),
                       heldout=HeldOutReport(every, on_heldout_loss) if every else None)
    _progress(f"train: {result.steps} steps in {result.train_seconds:.0f} s ({result.tokens_per_second:.0f} tokens/s, "
              f"{result.precision}, {result.attn} attention)")
    set_tags(ctx.run_id, {"train.precision_used": result.precision, "train.attn_used": result.attn}
             | {f"train.{setting}_used": choice for setting, choice in result.choices.items()})
    log_metrics(ctx.run_id, {"train_seconds": result.train_seconds, "train_tokens_per_s": result.tokens_per_second})
    log_artifact(ctx.run_id, result.weights_dir, weights_artifact(config.train.method))
    log_loss_plot(ctx.run_id)
    return result


def _log_evaluation(ctx: RunContext, result: EvalResult, label: str) -> None:
    """Metrics (prefixed `<label>_` when labelled), the Markdown report, the confusion matrix of a head and the
    answers table, under eval/<label>: a second model scored in the same run (the champion) keeps its own."""
    rows = [json.loads(line) for line in result.samples_path.read_text(encoding="utf-8").splitlines()]
    _progress(f"evaluate{f' ({label})' if label else ''}: {len(rows)} held-out samples scored ({result.markdown_path})")
    log_metrics(ctx.run_id, {f"{label}_{name}" if label else name: value for name, value in result.metrics.items()})
    folder = f"eval/{label}" if label else "eval"
    log_artifact(ctx.run_id, result.markdown_path, folder)
    for path in (result.confusion_path, result.answers_path):
        if path is not None:
            log_artifact(ctx.run_id, path, folder)
    table = "predictions_table.json" if result.confusion_path is not None else "samples_table.json"
    log_table(ctx.run_id, rows, f"{folder}/{table}")


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(data: PreparedData, trained: TrainResult, config: RunConfig, ctx: RunContext) -> EvalResult:
    """Stage 4, base vs tuned: a task head's labels, or the language model's loss and answers, logged to the run."""
    if config.has_head:
        result = evaluate_head(data, trained.model, config.evaluate, ctx, precision=trained.precision)
    else:
        result = evaluate_tuned(data, trained, config.evaluate, ctx, identity_name=config.identity.name,
                                tool_format=config.tokenize.tool_format, beta=config.train.preference.beta)
    _log_evaluation(ctx, result, "")
    return result


@task(name="guards", cache_policy=NO_CACHE)
def guard_task(config: RunConfig, tokens: TokenizedData, tuned: ModelSource, precision: str, ctx: RunContext
               ) -> list[GuardScore]:
    """registry.guards: each suite read by the clean stage as the recipe's data is, tokenized with the run's
    tokenizer, and scored for the base and the tuned model; the scores logged to the run."""
    suites = []
    for number, guard in enumerate(config.registry.guards):
        if guard.lm_eval_task is not None:
            task, suite_hash, greater_is_better = lm_eval_task(guard)
            suites.append(GuardSuite(guard.label, guard.metric, guard.max_regression, suite_hash, [], task,
                                     greater_is_better))
            continue
        cleaned = clean(DataConfig(train=[guard.data], eval=[], eval_fraction=0.0), ctx.under(f"guards/{number}"),
                        values=config.identity.model_dump())
        rejected: dict[str, int] = {}
        samples = encode_conversations(cleaned.train_path, tokens.tokenizer_dir, config.tokenize, rejected,
                                       ctx.trust_remote_code)
        if not samples:
            raise UserError(f"registry.guards: {guard.data} holds no conversation to score (rejected: {rejected})")
        suites.append(GuardSuite(guard.label, guard.metric, guard.max_regression, cleaned.data_hash, samples))
    scores = score_guards(suites, tuned, precision)
    for score in scores:
        _progress(f"guard {score.label}: {score.metric} base {score.base:.4f} -> tuned {score.tuned:.4f} "
                  f"(at most {score.max_regression} worse allowed)")
        log_metrics(ctx.run_id, {f"guard_{score.key}_base_{score.metric}": score.base,
                                 f"guard_{score.key}_tuned_{score.metric}": score.tuned})
    return scores


@task(name="evaluate-model", cache_policy=NO_CACHE)
def evaluate_model_task(data: PreparedData, model: ModelSource, config: RunConfig, ctx: RunContext, *,
                        precision: str = "fp32", label: str = "") -> EvalResult:
    """One model scored on the held-out data, logged to the run (labelled, for a second model scored in the same
    run: the champion in a head-to-head). A task head is scored base vs tuned, as the candidate was."""
    if config.has_head:
        result = evaluate_head(data, model, config.evaluate, ctx, precision=precision)
    else:
        result = evaluate_model(data, model, config.evaluate, ctx, precision=precision,
                                identity_name=config.identity.name, tool_format=config.tokenize.tool_format,
                                beta=config.train.preference.beta)
    _log_evaluation(ctx, result, label)
    return result


@task(name="register", cache_policy=NO_CACHE)
def register_task(request: RegisterRequest) -> RegisterResult:
    """register(), recording the outcome on the run as well as on the model version."""
    result = register(request, shared_lock())
    set_tags(request.run_id, {"registered_model": f"{result.model_name}/{result.version}", "promotion": result.reason})
    return result


def score_champion_head_to_head(config: RunConfig, basis: dict[str, str], cleaned: CleanResult, ctx: RunContext, *,
                                precision: str) -> ChampionScore | None:
    """The champion scored again on this run's held-out rows (under ctx.work_dir/champion) when its own score was
    measured on other rows or by other metric code, logged as champion_<metric>; None when its stored score compares
    as is.

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
    ctx = ctx.under("champion")
    source = fetch_model(f"models:/{config.registry.model_name}/{champion.version}", ctx.work_dir / "model",
                         config.trust_remote_code)
    labels, metric = None, config.registry.primary_metric
    if config.has_head:  # the champion's head, scored as the tuned model is (its base head drawn with this seed)
        champion_head = Head.of(source.weights_dir)
        if champion_head is None or champion_head.task != config.task or set(cleaned.labels) - set(champion_head.labels):
            get_run_logger().warning(f"the champion (version {champion.version}) cannot label this data (another task "
                                     "or fewer labels); it is not scored again, and this version is not compared")
            return None
        labels, metric = champion_head.labels, f"tuned_{metric}"
    data = prepare_data(config, source.tokenizer_dir if labels is None else source.model_dir, ctx, cleaned=cleaned,
                        labels=labels)
    scored = evaluate_model_task(data, source, config, ctx, precision=precision, label="champion")
    return ChampionScore(str(champion.version), scored.metrics[metric])
