"""A sweep's search as an Optuna study: TPE proposes the points, a pruner stops hopeless ones, and the study lives in
Optuna's RDB storage beside the tracking store, so points on other machines report to it directly.

The storage URL is never a parameter of a point (a flow run's parameters are kept and shown by Prefect, and a URL
may hold a password): every process resolves it from its own environment, as it does the tracking store.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy
from optuna.trial import TrialState
from pydantic import BaseModel

from conf.environment import shown_uri
from conf.schema import SearchRange, SweepConfig, UserError

STORAGE_ENV = "LORAFLOW_OPTUNA_STORAGE"
SCHEMA = "optuna"  # Optuna's tables (and its own alembic_version) beside MLflow's, in a schema of their own


class StudyStorageMissing(UserError):
    """No database for the study: the tracking store is a server whose database this machine does not know."""


class TrialRef(BaseModel):
    """What a point needs to report to its trial: the study, the trial, and the pruner the parent runs."""

    study_name: str
    trial_id: int
    pruner: str
    pruner_startup: int
    every_steps: int
    max_steps: int
    maximize: bool


def study_storage() -> str:
    """LORAFLOW_OPTUNA_STORAGE, or the tracking database: MLflow's own store (MLFLOW_BACKEND_STORE_URI on a team's
    machines, MLFLOW_TRACKING_URI otherwise) when it is one. SQLite: optuna.db beside mlflow.db (one file cannot
    hold both: each keeps an alembic_version table). PostgreSQL: the same database, in schema `optuna`."""
    if explicit := os.environ.get(STORAGE_ENV):
        return explicit
    for store in (os.environ.get("MLFLOW_BACKEND_STORE_URI", ""), os.environ.get("MLFLOW_TRACKING_URI", "")):
        if store.startswith("sqlite:///"):
            return f"sqlite:///{os.path.join(os.path.dirname(store.removeprefix('sqlite:///')), 'optuna.db')}"
        if store.startswith("postgresql"):
            url = sqlalchemy.make_url(store).set(drivername="postgresql+psycopg")
            with sqlalchemy.create_engine(url).begin() as connection:
                connection.execute(sqlalchemy.text(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
            return url.update_query_dict({"options": f"-csearch_path={SCHEMA}"}).render_as_string(hide_password=False)
    tracking = shown_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
    raise StudyStorageMissing(f"method tpe: no database for the Optuna study; the tracking store {tracking} is a server: "
                              f"set {STORAGE_ENV} (or MLFLOW_BACKEND_STORE_URI) to a database every worker reaches")


def _storage() -> optuna.storages.RDBStorage:
    # A pool that checks each connection before use: a long sweep outlives idle connections the server dropped.
    return optuna.storages.RDBStorage(study_storage(), engine_kwargs={"pool_pre_ping": True})


def make_pruner(kind: str, startup: int, every_steps: int, max_steps: int) -> optuna.pruners.BasePruner:
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every_steps, max_resource=max_steps)
    return optuna.pruners.NopPruner()


def open_study(sweep: SweepConfig, name: str, maximize: bool, every_steps: int, max_steps: int) -> optuna.Study:
    """The sweep's study, created or (a re-run resuming) loaded; `first_points` are queued once, on creation."""
    # TPE models the points finished so far after a start-up of random ones; Optuna's default start-up (10) would
    # leave a small budget all random, so at most half of it is.
    sampler = optuna.samplers.TPESampler(seed=sweep.seed, n_startup_trials=min(10, max(1, (sweep.budget or 2) // 2)))
    storage = _storage()
    existed = name in {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
        pruner=make_pruner(sweep.pruner, sweep.pruner_startup, every_steps, max_steps),
        direction="maximize" if maximize else "minimize",
    )
    if not existed:
        for point in sweep.first_points:
            study.enqueue_trial({key: _choice(sweep.parameters[key], value) for key, value in point.items()})
    return study


def _by_position(values: list[Any] | SearchRange) -> bool:
    """Optuna's choices are plain values: a list of lists or mappings (target modules) is chosen among by position."""
    return isinstance(values, list) and any(isinstance(value, (list, dict)) for value in values)


def _choice(values: list[Any] | SearchRange, value: Any) -> Any:
    """A point's value as the study records it (its position, for a list chosen among by position)."""
    return values.index(value) if _by_position(values) and value in values else value


def trials_kept(study: optuna.Study) -> int:
    """How many of the study's trials ended (completed or pruned). One that did not (its point crashed, failed, or
    its sweep was stopped) is marked failed and its point queued once more: a re-run resumes exactly those."""
    trials = study.get_trials(deepcopy=False)
    kept = [trial for trial in trials if trial.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    queued = [trial.params for trial in trials if trial.state == TrialState.WAITING]
    for trial in trials:
        if trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
        if trial.state in (TrialState.RUNNING, TrialState.FAIL) and trial.params not in queued:
            if not any(done.params == trial.params for done in kept):
                study.enqueue_trial(trial.params)
                queued.append(trial.params)
    return len(kept)


def suggest(trial: optuna.Trial, parameters: dict[str, list[Any] | SearchRange]) -> dict[str, Any]:
    """The trial's point: a list is a choice among its values, a range a float (whole numbers if both ends are)."""
    point: dict[str, Any] = {}
    for key, values in parameters.items():
        if _by_position(values):
            point[key] = values[trial.suggest_categorical(key, list(range(len(values))))]
        elif isinstance(values, list):
            point[key] = trial.suggest_categorical(key, values)
        elif values.whole:
            point[key] = trial.suggest_int(key, int(values.low), int(values.high), log=values.log)
        else:
            point[key] = trial.suggest_float(key, values.low, values.high, log=values.log)
    return point


def trial_pruner(ref: TrialRef) -> Callable[[int, float], bool]:
    """The point's side of pruning: each held-out loss reported to its trial in the shared storage, and the pruner's
    answer. A maximising study (rougeL) ranks intermediate values the same way, so the loss goes in negated."""
    study = optuna.load_study(study_name=ref.study_name, storage=_storage(),
                              pruner=make_pruner(ref.pruner, ref.pruner_startup, ref.every_steps, ref.max_steps))
    trial = optuna.Trial(study, ref.trial_id)

    def prune(step: int, loss: float) -> bool:
        trial.report(-loss if ref.maximize else loss, step)
        return trial.should_prune()

    return prune


def tell(study: optuna.Study, trial_number: int, status: str, value: float | None) -> None:
    """A finished point's outcome to its trial: its value, pruned, or failed (a crash, an error)."""
    if status == "FINISHED" and value is not None and math.isfinite(value):
        study.tell(trial_number, value, skip_if_finished=True)
    else:
        study.tell(trial_number, state=TrialState.PRUNED if status == "PRUNED" else TrialState.FAIL,
                   skip_if_finished=True)


def study_summary(study: optuna.Study) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each trial (number, state, value, parameters) and Optuna's importance of each parameter (empty until two
    trials completed with different values)."""
    trials = [{"trial": trial.number, "state": trial.state.name, "value": trial.value, **trial.params}
              for trial in study.get_trials(deepcopy=False)]
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    try:
        with warnings.catch_warnings():  # a small study's "importances will be equal" is what the numbers say
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study) if len(completed) > 1 else {}
    except (RuntimeError, ValueError):  # every completed trial had the same value, or one parameter value
        importances = {}
    return trials, {key: float(value) for key, value in importances.items()}
