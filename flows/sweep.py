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

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from conf.schema import RunConfig, SearchRange, SweepConfig, load_config
from flows.runs import CONFIG_HASH_TAG, experiment_id, log_config, preflight, run_context, run_tags, score_basis_tags
from flows.stages import evaluate_task, prepare_data, register_task, score_champion_head_to_head, train_task
from tasks.base_model import resolve_base_model
from tasks.register import RegisterRequest, RegisterResult
from tasks.results import PreparedData
from tasks.tracking import UNLOGGED_FILE, flow_run, log_metrics, log_params, log_table, recording_unlogged, set_tags

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
def run_point(config: RunConfig, point: dict[str, Any], parent_run_id: str, data: PreparedData,
              model_dir: str) -> PointResult:
    """Train and evaluate one point as a child run of the sweep (tagged with its own config's hash); any failure is
    recorded and returned, not raised. Should the tracking server go away, the child keeps what it cannot log as
    the parent does."""
    client = MlflowClient()
    child = client.create_run(
        client.get_run(parent_run_id).info.experiment_id, run_name=_point_name(point),
        tags=run_tags(config) | {MLFLOW_PARENT_RUN_ID: parent_run_id, "loraflow.sweep_point": json.dumps(point),
                                 "data_hash": data.cleaned.data_hash},
    )
    ctx = run_context(config, child.info.run_id)
    with recording_unlogged(ctx.run_id, ctx.work_dir / UNLOGGED_FILE):
        try:
            log_config(ctx.run_id, config, ctx.work_dir)
            trained = train_task(data, model_dir, config, ctx)
            evaluated = evaluate_task(data, trained, config, ctx)
        except Exception as error:  # one point's failure (a bad value, out of memory) must not end the sweep
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
            set_tags(ctx.run_id, {"loraflow.error": reason})
            client.set_terminated(ctx.run_id, "FAILED")
            return PointResult(point, ctx.run_id, "FAILED", {}, None, reason)
    client.set_terminated(ctx.run_id, "FINISHED")
    return PointResult(point, ctx.run_id, "FINISHED", evaluated.metrics, trained.weights_dir, "", trained.precision)


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
    with flow_run(base.output_dir, experiment_id=experiment_id(base.experiment), run_name=f"sweep {base.name}",
                  tags=tags | {"loraflow.kind": "sweep"}) as parent:
        ctx = run_context(base, parent.info.run_id)
        log_params(ctx.run_id, {"sweep.recipe": str(sweep_config.recipe), "sweep.method": sweep_config.method,
                                "sweep.points": str(len(points)), "sweep.seed": str(sweep_config.seed),
                                "sweep.parameters": json.dumps(sweep_config.model_dump(mode="json")["parameters"])})
        data = prepare_data(base, model_dir, ctx)
        results = [run_point(config, point, ctx.run_id, data, model_dir) for config, point in zip(configs, points)]
        log_table(ctx.run_id, results_table(results, registry.primary_metric), RESULTS_TABLE)
        log_metrics(ctx.run_id, {"sweep_points_finished": sum(r.status == "FINISHED" for r in results),
                                 "sweep_points_failed": sum(r.status == "FAILED" for r in results)})
        best = best_point(results, registry.primary_metric, registry.direction)
        if best is None:
            raise RuntimeError(f"every point of the sweep failed; the first: {results[0].error}")
        log_metrics(ctx.run_id, {f"best_tuned_{registry.primary_metric}": best.metrics[f"tuned_{registry.primary_metric}"]})
        set_tags(ctx.run_id, {"loraflow.best_run_id": best.run_id, "loraflow.best_point": json.dumps(best.point)})
        best_config = configs[points.index(best.point)]
        basis = score_basis_tags(best_config, data.cleaned.eval_hash)
        champion_score = score_champion_head_to_head(best_config, basis, data.cleaned,
                                                     run_context(best_config, best.run_id), precision=best.precision)
        registered = register_task(RegisterRequest(
            run_id=best.run_id, weights_dir=best.weights_dir, base_model=base.base_model, metrics=best.metrics,
            tags=run_tags(best_config) | basis | {"data_hash": data.cleaned.data_hash,
                                                  "loraflow.sweep_run_id": ctx.run_id},
            registry=best_config.registry, champion_score=champion_score,
        ))
    return SweepSummary(ctx.run_id, results, best, registered)


def run_sweep(sweep_config: SweepConfig, wait_for_prefect: Callable[[], float] = lambda: 0.0) -> SweepSummary:
    """Check everything cheap first, then run the sweep flow."""
    points, configs = point_configs(sweep_config)
    for config in configs:
        preflight(config)
    wait_for_prefect()
    return sweep(sweep_config, points, configs)
