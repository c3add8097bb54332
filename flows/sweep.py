"""The sweep flow: one recipe trained at many points over any train, evaluate or registry keys, as one parent MLflow
run with a child run per point. Points come from a grid, a random draw, or an Optuna TPE study (which may prune a
point from its held-out losses); they run one at a time here, several at once in processes of their own, or as
flow runs on a Prefect work pool (flows/placement.py).

The parent cleans and tokenizes the data once; a point run elsewhere prepares it again and must find the same
content hash. A point that fails, crashes or is pruned is recorded as such and the sweep goes on. The parent logs a
results table (and a study's trials and parameter importances) and sends the best finished point through the
normal promotion rule. Run again, a sweep whose points did not all finish resumes in the same parent run: finished
and pruned points are kept, the others run again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow

from conf.schema import ConfigError, RunConfig, SearchRange, SweepConfig, load_config
from flows import search
from flows.approval import await_approval
from flows.placement import InProcess, Pool, Processes
from flows.runs import (
    CONFIG_HASH_TAG, card_facts, current_data_hash, experiment_id, preflight, run_context, run_tags, score_basis_tags,
)
from flows.stages import guard_task, prepare_data, register_task, score_champion_head_to_head, weights_artifact
from flows.sweep_point import POINT_TAG, PointJob, PointResult, point_name, recorded_result
from tasks.base_model import resolve_base_model
from tasks.parity import ANSWERS_FILE
from tasks.register import RegisterRequest, RegisterResult
from tasks.results import ModelSource, PreparedData
from tasks.tracking import flow_run, log_metrics, log_params, log_table, set_tags
from tasks.train import weights_folder

RESULTS_TABLE = "sweep/results.json"
TRIALS_TABLE = "sweep/trials.json"
SWEEP_KEY_TAG = "loraflow.sweep_key"
KEPT = ("FINISHED", "PRUNED")  # what a resumed sweep does not run again


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
        return round(value) if values.whole else float(f"{value:.3g}")

    points: list[dict[str, Any]] = []
    for _ in range(100 * (sweep.budget or 1)):  # small discrete spaces run out of distinct points; stop at what exists
        point = {key: draw(sweep.parameters[key]) for key in keys}
        if point not in points:
            points.append(point)
        if len(points) == sweep.budget:
            break
    return points


def point_config(sweep: SweepConfig, point: dict[str, Any]) -> RunConfig:
    """The recipe one point runs: the sweep's recipe, its overrides, then the point's values."""
    return load_config(sweep.recipe, [*sweep.overrides, *(f"{key}={json.dumps(value)}" for key, value in point.items())])


def sweep_key(sweep: SweepConfig, data_hash: str) -> str:
    """What makes a re-run the same sweep: the same sweep file, on the same data."""
    text = json.dumps(sweep.model_dump(mode="json"), sort_keys=True) + data_hash
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _point_key(point: dict[str, Any]) -> str:
    return json.dumps(point, sort_keys=True)


def recorded_points(parent_run_id: str) -> list[PointResult]:
    """The children a sweep's parent has, as results (the newest child per point)."""
    client = MlflowClient()
    children = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}'", order_by=["attributes.start_time ASC"])
    newest = {_point_key(json.loads(child.data.tags[POINT_TAG])): recorded_result(child)
              for child in children if POINT_TAG in child.data.tags}
    return list(newest.values())


def sweep_to_resume(base: RunConfig, key: str) -> str | None:
    """The newest parent run of this same sweep on the same data, if some of its points did not finish."""
    runs = mlflow.search_runs([experiment_id(base.experiment)], f"tags.`{SWEEP_KEY_TAG}` = '{key}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs or runs[0].info.status == "RUNNING":  # a sweep still running is another process's
        return None
    parent = runs[0].info.run_id
    recorded = recorded_points(parent)
    unfinished = not recorded or any(result.status not in KEPT for result in recorded)
    return parent if unfinished or runs[0].info.status != "FINISHED" else None


def best_point(results: list[PointResult], metric: str, direction: str) -> PointResult | None:
    finished = [result for result in results if result.status == "FINISHED" and f"tuned_{metric}" in result.metrics]
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


def _placement(sweep: SweepConfig, data: PreparedData, model_dir: str, work_dir: Path) -> InProcess | Processes | Pool:
    if sweep.runner is not None:
        return Pool(sweep.runner.pool, sweep.runner.max_parallel, sweep.runner.crashed_after_s)
    if sweep.max_concurrency > 1:
        return Processes(sweep.max_concurrency, work_dir / "points")
    return InProcess(data, model_dir)


def _child_run(parent_run_id: str, config: RunConfig, point: dict[str, Any], data_hash: str) -> str:
    """The point's child run, made here (so a point whose worker never starts or dies still has one)."""
    client = MlflowClient()
    child = client.create_run(
        client.get_run(parent_run_id).info.experiment_id, run_name=point_name(point),
        tags=run_tags(config) | {MLFLOW_PARENT_RUN_ID: parent_run_id, POINT_TAG: json.dumps(point),
                                 "data_hash": data_hash},
    )
    return child.info.run_id


class _Points:
    """The points still to run, as jobs: a list (grid, random) or proposals asked of the study one at a time, told
    back as points end."""

    def __init__(self, sweep: SweepConfig, base: RunConfig, parent_run_id: str, data_hash: str,
                 recorded: list[PointResult]):
        self.sweep, self.base, self.parent_run_id, self.data_hash = sweep, base, parent_run_id, data_hash
        self.study, self.trials = None, {}
        kept = {_point_key(result.point) for result in recorded if result.status in KEPT}
        if sweep.method != "tpe":
            self.todo = [point for point in sweep_points(sweep) if _point_key(point) not in kept]
            return
        registry = base.registry
        self.maximize = registry.direction == "max"
        self.every = base.evaluate.loss_every_steps or base.train.max_steps
        self.study = search.open_study(sweep, f"loraflow-sweep-{parent_run_id}", self.maximize, self.every,
                                       base.train.max_steps)
        self.todo_count = sweep.budget - search.trials_kept(self.study)

    def jobs(self) -> Iterator[PointJob]:
        if self.study is None:
            for point in self.todo:
                yield self._job(point, None)
            return
        for _ in range(self.todo_count):
            trial = self.study.ask()
            point = search.suggest(trial, self.sweep.parameters)
            # Optuna names a trial to reopen elsewhere (optuna.Trial(study, trial_id)) by its id, kept only privately.
            ref = search.TrialRef(study_name=self.study.study_name, trial_id=trial._trial_id, pruner=self.sweep.pruner,
                                  pruner_startup=self.sweep.pruner_startup, every_steps=self.every,
                                  max_steps=self.base.train.max_steps, maximize=self.maximize)
            job = self._job(point, ref)
            self.trials[job.run_id] = trial.number
            yield job

    def _job(self, point: dict[str, Any], trial: search.TrialRef | None) -> PointJob:
        config = point_config(self.sweep, point)
        return PointJob(config=config, point=point, run_id=_child_run(self.parent_run_id, config, point, self.data_hash),
                        data_hash=self.data_hash, trial=trial)

    def ended(self, result: PointResult) -> None:
        if self.study is not None and result.run_id in self.trials:
            value = result.metrics.get(f"tuned_{self.base.registry.primary_metric}")
            search.tell(self.study, self.trials.pop(result.run_id), result.status, value)


def _run_points(points: _Points, placement: InProcess | Processes | Pool) -> list[PointResult]:
    """Keep the placement's slots full until every point has ended. TPE asks for its next point only when a slot is
    free, so it learns from every point that ended before."""
    results: list[PointResult] = []
    jobs, running, exhausted = points.jobs(), 0, False
    while True:
        while not exhausted and running < placement.capacity:
            job = next(jobs, None)
            if job is None:
                exhausted = True
                break
            placement.start(job)
            running += 1
        if running == 0:
            return results
        for result in placement.wait():
            running -= 1
            points.ended(result)
            results.append(result)


def _log_study(run_id: str, study) -> None:
    """The study on the parent: each trial's state, the best parameters, and Optuna's importance of each parameter."""
    trials, importances = search.study_summary(study)
    log_table(run_id, trials, TRIALS_TABLE)
    log_metrics(run_id, {f"importance.{key}": value for key, value in importances.items()})
    if any(trial["state"] == "COMPLETE" for trial in trials):
        set_tags(run_id, {"loraflow.study_best_params": json.dumps(study.best_params)})


@flow(name="sweep")
def sweep(sweep_config: SweepConfig, data_hash: str) -> SweepSummary:
    """Run every point (one child run each) on data prepared once; register the best point's model."""
    base = point_config(sweep_config, {})
    model_dir = resolve_base_model(base.base_model)
    key = sweep_key(sweep_config, data_hash)
    resumed = sweep_to_resume(base, key)
    # The parent is no run of any one point's recipe: without a config hash, nothing takes it for one.
    tags = {key: value for key, value in run_tags(base).items() if key != CONFIG_HASH_TAG}
    registry = base.registry
    start = {"run_id": resumed} if resumed else {"run_name": f"sweep {base.name}"}
    with flow_run(base.output_dir, experiment_id=experiment_id(base.experiment), **start,
                  tags=tags | {"loraflow.kind": "sweep", SWEEP_KEY_TAG: key}) as parent:
        ctx = run_context(base, parent.info.run_id)
        log_params(ctx.run_id, {"sweep.recipe": str(sweep_config.recipe), "sweep.method": sweep_config.method,
                                "sweep.seed": str(sweep_config.seed),
                                "sweep.parameters": json.dumps(sweep_config.model_dump(mode="json")["parameters"])})
        data = prepare_data(base, model_dir, ctx)
        recorded = recorded_points(ctx.run_id) if resumed else []
        points = _Points(sweep_config, base, ctx.run_id, data.cleaned.data_hash, recorded)
        new = _run_points(points, _placement(sweep_config, data, model_dir, ctx.work_dir))
        results = [result for result in recorded if result.status in KEPT] + new
        if points.study is not None:
            _log_study(ctx.run_id, points.study)
        log_table(ctx.run_id, results_table(new, registry.primary_metric), RESULTS_TABLE)
        log_metrics(ctx.run_id, {f"sweep_points_{status.lower()}": sum(r.status == status for r in results)
                                 for status in ("FINISHED", "FAILED", "PRUNED", "CRASHED")})
        best = best_point(results, registry.primary_metric, registry.direction)
        if best is None:
            first = next((result.error for result in results if result.error), "no point ran")
            raise RuntimeError(f"no point of the sweep finished; the first error: {first}")
        log_metrics(ctx.run_id, {f"best_tuned_{registry.primary_metric}": best.metrics[f"tuned_{registry.primary_metric}"]})
        set_tags(ctx.run_id, {"loraflow.best_run_id": best.run_id, "loraflow.best_point": json.dumps(best.point)})
        registered = _register_best(best, point_config(sweep_config, best.point), data, ctx.run_id)
    return SweepSummary(ctx.run_id, results, best, registered)


def _register_best(best: PointResult, config: RunConfig, data: PreparedData, sweep_run_id: str) -> RegisterResult:
    """The best point through the promotion rule, from its weights here or, trained on another machine, from its run's
    logged adapter."""
    weights_dir = best.weights_dir
    if weights_dir is None or not weights_dir.exists():
        local = weights_folder(run_context(config, best.run_id).work_dir / "train", config.train.method)
        weights_dir = local if local.exists() else Path(mlflow.artifacts.download_artifacts(
            run_id=best.run_id, artifact_path=weights_artifact(config.train.method),
            dst_path=str(local.parent / "fetched")))
    basis = score_basis_tags(config, data.cleaned.eval_hash)
    ctx = run_context(config, best.run_id)
    champion_score = score_champion_head_to_head(config, basis, data.cleaned, ctx, precision=best.precision)
    tuned = ModelSource(resolve_base_model(config.base_model), weights_dir)
    guards = guard_task(config, data.tokens, tuned, best.precision, ctx) if config.registry.guards else []
    registered = register_task(RegisterRequest(
        run_id=best.run_id, weights_dir=weights_dir, base_model=config.base_model, metrics=best.metrics,
        tags=run_tags(config) | basis | {"data_hash": data.cleaned.data_hash, "loraflow.sweep_run_id": sweep_run_id},
        registry=config.registry, champion_score=champion_score, card=card_facts(config, data), guards=guards,
        evaluated_answers=_evaluated_answers(best.run_id, ctx.work_dir / "eval"),
    ))
    return await_approval(registered, config) if registered.awaiting_approval else registered


def _evaluated_answers(run_id: str, local: Path) -> Path | None:
    """The point's evaluated chat answers (train/serve parity): here, or from its run on another machine; None for a
    recipe without chat answers."""
    if (local / ANSWERS_FILE).exists():
        return local / ANSWERS_FILE
    if not any(item.path == f"eval/{ANSWERS_FILE}" for item in MlflowClient().list_artifacts(run_id, "eval")):
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"eval/{ANSWERS_FILE}",
                                                    dst_path=str(local.parent / "fetched")))


def run_sweep(sweep_config: SweepConfig, wait_for_prefect: Callable[[], float] = lambda: 0.0) -> SweepSummary:
    """Check everything cheap first (every point's recipe, where they can be listed), then run the sweep flow."""
    base = point_config(sweep_config, {})
    for point in [{}] if sweep_config.method == "tpe" else sweep_points(sweep_config):
        preflight(point_config(sweep_config, point))
    if sweep_config.method == "tpe":
        search.study_storage()
    if sweep_config.pruner != "none" and base.evaluate.loss_every_steps is None:
        raise ConfigError(f"{sweep_config.recipe}: evaluate.loss_every_steps: unset, so points report no held-out "
                          f"loss for pruner {sweep_config.pruner} to judge them by")
    data_hash = current_data_hash(base)
    wait_for_prefect()
    return sweep(sweep_config, data_hash)
