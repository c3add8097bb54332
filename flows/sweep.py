"""The sweep flow: one recipe trained at many points (a grid, or a random search with a budget) over any train,
evaluate or registry keys, as one parent MLflow run with a nested child run per point.

The data is cleaned and tokenized once, in the parent, and every point trains on it (so a sweep refuses keys that
change the data). Points are Prefect tasks run one at a time: training sets process-wide state (seeds, torch
threads) that points sharing a process would trample. A point that fails is recorded as a FAILED child and the
sweep goes on. Each child carries its own point's config hash, so resume, nightly skip and rerun find it. The parent
logs a results table and the best point; the best child alone goes through the normal promotion rule.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from conf.schema import RunConfig, SearchRange, SweepConfig, load_config
from flows.finetune import evaluate_stage, score_champion_head_to_head
from flows.runs import CONFIG_HASH_TAG, experiment_id, log_config, preflight, run_tags, score_basis_tags
from tasks.base_model import cache_root, resolve_base_model
from tasks.clean import CleanResult, clean_task
from tasks.labels import Head
from tasks.register import RegisterResult, register_task
from tasks.tokenize import TokenizedData, tokenize_task
from tasks.tracking import log_metrics, log_table, set_tags
from tasks.train import train_task

RESULTS_TABLE = "sweep/results.json"


@dataclass(frozen=True)
class PointResult:
    point: dict[str, Any]
    run_id: str
    status: str  # FINISHED or FAILED
    metrics: dict[str, float]
    weights_dir: Path | None
    error: str
    precision: str = ""  # what training ran in; the champion's head-to-head scoring runs in it too


@dataclass(frozen=True)
class SweepSummary:
    run_id: str
    results: list[PointResult]
    best: PointResult | None
    registered: RegisterResult | None


def sweep_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every combination of the listed values (grid), or `budget` distinct points drawn with the sweep's seed."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        return [dict(zip(keys, values)) for values in itertools.product(*sweep.parameters.values())]
    rng = random.Random(sweep.seed)

    def draw(values: list | SearchRange) -> Any:
        if isinstance(values, list):
            return rng.choice(values)
        if values.log:
            value = math.exp(rng.uniform(math.log(values.low), math.log(values.high)))
        else:
            value = rng.uniform(values.low, values.high)
        whole = float(values.low).is_integer() and float(values.high).is_integer()
        return round(value) if whole else float(f"{value:.3g}")

    points: list[dict[str, Any]] = []
    for _ in range(100 * sweep.budget):  # small discrete spaces run out of distinct points; stop at what exists
        point = {key: draw(sweep.parameters[key]) for key in keys}
        if point not in points:
            points.append(point)
        if len(points) == sweep.budget:
            break
    return points


def point_configs(sweep: SweepConfig) -> tuple[list[dict[str, Any]], list[RunConfig]]:
    """The points and the recipe each one runs, all validated before any work (a bad value fails the sweep at once)."""
    points = sweep_points(sweep)
    configs = [
        load_config(sweep.recipe, [*sweep.overrides, *(f"{key}={json.dumps(value)}" for key, value in point.items())])
        for point in points
    ]
    return points, configs


def _point_name(point: dict[str, Any]) -> str:
    return " ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in point.items())


@task(name="sweep-point", cache_policy=NO_CACHE)
def run_point(
    config: RunConfig, point: dict[str, Any], parent_run_id: str, cleaned: CleanResult, tokens: TokenizedData,
    model_dir: str,
) -> PointResult:
    """Train and evaluate one point as a child run of the sweep (tagged with its own config's hash); any failure is
    recorded and returned, not raised."""
    client = MlflowClient()
    child = client.create_run(
        client.get_run(parent_run_id).info.experiment_id, run_name=_point_name(point),
        tags=run_tags(config) | {MLFLOW_PARENT_RUN_ID: parent_run_id, "loraflow.sweep_point": json.dumps(point),
                                 "data_hash": cleaned.data_hash},
    )
    run_id = child.info.run_id
    work_dir = config.output_dir / run_id
    try:
        log_config(run_id, config, work_dir)
        trained = train_task(tokens.train_dir, tokens.tokenizer_dir, model_dir, config.train, config.seed,
                             work_dir / "train", run_id, trust_remote_code=config.trust_remote_code,
                             head=Head(config.task, tokens.labels) if config.has_head else None)
        evaluated = evaluate_stage(config, cleaned, tokens, trained, model_dir, work_dir / "eval", run_id)
    except Exception as error:  # one point's failure (a bad value, out of memory) must not end the sweep
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        set_tags(run_id, {"loraflow.error": reason})
        client.set_terminated(run_id, "FAILED")
        return PointResult(point, run_id, "FAILED", {}, None, reason)
    client.set_terminated(run_id, "FINISHED")
    return PointResult(point, run_id, "FINISHED", evaluated.metrics, trained.weights_dir, "", trained.precision)


def best_point(results: list[PointResult], metric: str, direction: str) -> PointResult | None:
    finished = [result for result in results if result.status == "FINISHED"]
    if not finished:
        return None
    sign = 1 if direction == "max" else -1
    return max(finished, key=lambda result: sign * result.metrics[f"tuned_{metric}"])


def results_table(results: list[PointResult], metric: str) -> list[dict[str, Any]]:
    return [
        {**result.point, "run_id": result.run_id, "status": result.status,
         f"tuned_{metric}": result.metrics.get(f"tuned_{metric}"), "tuned_eval_loss": result.metrics.get("tuned_eval_loss"),
         "error": result.error}
        for result in results
    ]


@flow(name="sweep")
def sweep(sweep_config: SweepConfig, points: list[dict[str, Any]], configs: list[RunConfig]) -> SweepSummary:
    """Run every point (one child run each) on data prepared once; register the best point's model."""
    base = configs[0]
    model_dir = resolve_base_model(base.base_model)
    # The parent is no run of any one point's recipe: without a config hash, nothing takes it for one.
    tags = {key: value for key, value in run_tags(base).items() if key != CONFIG_HASH_TAG}
    registry = base.registry
    with mlflow.start_run(experiment_id=experiment_id(base.experiment), run_name=f"sweep {base.name}",
                          tags=tags | {"loraflow.kind": "sweep"}) as parent:
        parent_run_id = parent.info.run_id
        work_dir = base.output_dir / parent_run_id
        mlflow.log_params({"sweep.recipe": str(sweep_config.recipe), "sweep.method": sweep_config.method,
                           "sweep.points": len(points), "sweep.seed": sweep_config.seed,
                           "sweep.parameters": json.dumps(sweep_config.model_dump(mode="json")["parameters"])})
        cleaned = clean_task(base.data, base.identity.model_dump(), work_dir / "clean", parent_run_id, base.task)
        tokens = tokenize_task(cleaned.train_path, cleaned.eval_path, model_dir, base.tokenize,
                               cache_root() / "tokenized", parent_run_id, base.trust_remote_code, base.task,
                               cleaned.labels)
        results = [run_point(config, point, parent_run_id, cleaned, tokens, model_dir)
                   for config, point in zip(configs, points)]
        log_table(parent_run_id, results_table(results, registry.primary_metric), RESULTS_TABLE)
        log_metrics(parent_run_id, {"sweep_points_finished": sum(r.status == "FINISHED" for r in results),
                                    "sweep_points_failed": sum(r.status == "FAILED" for r in results)})
        best = best_point(results, registry.primary_metric, registry.direction)
        if best is None:
            raise RuntimeError(f"every point of the sweep failed; the first: {results[0].error}")
        log_metrics(parent_run_id, {f"best_tuned_{registry.primary_metric}": best.metrics[f"tuned_{registry.primary_metric}"]})
        set_tags(parent_run_id, {"loraflow.best_run_id": best.run_id, "loraflow.best_point": json.dumps(best.point)})
        best_config = configs[points.index(best.point)]
        basis = score_basis_tags(best_config, cleaned.eval_hash)
        champion_score = score_champion_head_to_head(best_config, basis, cleaned, base.output_dir / best.run_id,
                                                     best.run_id, best.precision)
        registered = register_task(
            best.run_id, best.weights_dir, base.base_model, best.metrics,
            run_tags(best_config) | basis | {"data_hash": cleaned.data_hash, "loraflow.sweep_run_id": parent_run_id},
            best_config.registry, champion_score,
        )
    return SweepSummary(parent_run_id, results, best, registered)


def run_sweep(sweep_config: SweepConfig, wait_for_prefect: Callable[[], float] = lambda: 0.0) -> SweepSummary:
    """Check everything cheap first, then run the sweep flow."""
    points, configs = point_configs(sweep_config)
    for config in configs:
        preflight(config)
    wait_for_prefect()
    return sweep(sweep_config, points, configs)
