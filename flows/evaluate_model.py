"""The evaluation flow: one model (a hub id, a folder, or a logged/registered loraflow model) scored on a recipe's
held-out data, as its own MLflow run: `loraflow eval CONFIG --model ...`.

It reads the data exactly as `loraflow run` does (clean, then tokenize with the model's own tokenizer), so its
numbers compare with the `tuned_*` metrics of a fine-tuning run of the same recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow

from conf.schema import RunConfig, UserError
from flows.runs import CONFIG_HASH_TAG, experiment_id, log_config, run_context, run_tags
from flows.stages import evaluate_model_task, prepare_data
from tasks.clean import check_readable
from tasks.device import choose_precision
from tasks.evaluate import metric_names
from tasks.logged_model import fetch_model
from tasks.tracking import check_tracking_store, flow_run

EVALUATED_MODEL_TAG = "loraflow.evaluated_model"


@dataclass(frozen=True)
class EvalSummary:
    run_id: str
    metrics: dict[str, float]
    samples_path: Path


def preflight_evaluation(config: RunConfig) -> None:
    """The data sources are readable and the metric modules load, before any model is fetched."""
    if config.has_head:
        raise UserError(f"task {config.task}: loraflow eval scores language models; a task head is scored base vs "
                        "tuned by loraflow run, and its champion again on new held-out data")
    check_readable([*config.data.train, *config.data.eval], config.data.text_split)
    metric_names(config.evaluate, config.tokenize.mode == "chat", config.train.objective != "sft")
    check_tracking_store()


@flow(name="evaluate-model")
def evaluate_model(config: RunConfig, model: str) -> EvalSummary:
    """Score `model` on the recipe's held-out rows: loss, perplexity, generation metrics and its answers."""
    tags = {key: value for key, value in run_tags(config).items() if key not in (CONFIG_HASH_TAG, "base_model")}
    with flow_run(config.output_dir, experiment_id=experiment_id(config.experiment), run_name=f"eval {model}",
                  tags=tags | {EVALUATED_MODEL_TAG: model, "loraflow.kind": "evaluation"}) as run:
        ctx = run_context(config, run.info.run_id)
        log_config(ctx.run_id, config, ctx.work_dir)
        source = fetch_model(model, ctx.work_dir / "model", config.trust_remote_code)
        data = prepare_data(config, source.tokenizer_dir, ctx)
        evaluated = evaluate_model_task(data, source, config, ctx, precision=choose_precision(config.train.precision))
    return EvalSummary(ctx.run_id, evaluated.metrics, evaluated.markdown_path)
