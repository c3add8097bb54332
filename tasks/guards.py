"""Guard suites (`registry.guards`): held-out conversations apart from the recipe's own, on which a new version must
not score worse than the base model, or the champion, by more than the guard allows. Tuned hard on one task, a
model can lose everyday abilities that the recipe's held-out rows never ask about; a guard asks.

A suite is chat rows scored by held-out loss (as evaluation measures it), or a task of lm-evaluation-harness on
local files scored by its own metric (its log-likelihood multiple choice, for one). Scored here for the base and the
tuned model alike; judged at registration with MLflow's own model validation (`mlflow.validate_evaluation_results`,
a `MetricThreshold` on the candidate set at the reference's score, worsened by the allowed regression).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

import mlflow
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException
from peft import PeftModel
from pydantic import BaseModel
from transformers import AutoTokenizer

from conf.schema import GuardConfig, UserError
from tasks.base_model import load_model, load_tuned_model
from tasks.device import autocast, inference_device
from tasks.heldout import heldout_loss
from tasks.results import ModelSource

GUARD_TAG = "loraflow.guard."  # + the guard's key: its scores on a version, which a later candidate compares with
DECIDED_TAG = "loraflow.guard_decided"  # the guard that refused promotion


@dataclass(frozen=True)
class GuardSuite:
    """A guard's conversations, tokenized as training tokenized the recipe's (`samples`), or its lm-evaluation-
    harness task (`task`: the task's config, its data files resolved), and what identifies them."""

    label: str
    metric: str
    max_regression: float
    suite_hash: str
    samples: list[dict]
    task: dict | None = None
    greater_is_better: bool = False


def lm_eval_task(guard: GuardConfig) -> tuple[dict, str, bool]:
    """(the task's config with its data files found from the task file's folder, a hash of the task and its data,
    whether more of the guard's metric is better); UserError in one line for what cannot run."""
    path = guard.lm_eval_task
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"registry.guards: no lm-eval task file {path}") from None
    except yaml.YAMLError as error:
        raise UserError(f"registry.guards: {path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or "task" not in config:
        raise UserError(f"registry.guards: {path} is not an lm-eval task (no `task` key)")
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    files = {split: str((path.parent / name).resolve()) for split, name in
             (files.items() if isinstance(files, dict) else [("test", files)])}
    if missing := [name for name in files.values() if not Path(name).is_file()]:
        raise UserError(f"registry.guards: {path}: no such data file {missing[0]}")
    metrics = {entry["metric"]: entry.get("higher_is_better", True) for entry in config.get("metric_list", [])}
    if guard.metric not in metrics:
        raise UserError(f"registry.guards: {path} measures {sorted(metrics)}, not {guard.metric!r}")
    config["dataset_kwargs"] = config.get("dataset_kwargs", {}) | {"data_files": files}
    digest = hashlib.sha256(path.read_bytes())
    for name in sorted(files.values()):
        digest.update(Path(name).read_bytes())
    return config, digest.hexdigest(), bool(metrics[guard.metric])


def check_guards(guards: list[GuardConfig]) -> None:
    """Before any work: each lm-eval task loads, names the guard's metric, and lm-eval is installed."""
    for guard in guards:
        if guard.lm_eval_task is None:
            continue
        lm_eval_task(guard)
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise UserError("registry.guards: an lm-eval: guard needs lm-evaluation-harness: pip install -e "
                            "'.[guards]'") from None


def lm_eval_score(task: dict, metric: str, model, tokenizer) -> float:
    """The task's `metric` for `model` (a transformers model, not PEFT-wrapped), run by lm-evaluation-harness."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device=str(model.device))
    results = lm_eval.simple_evaluate(model=harness, tasks=[task], task_manager=TaskManager(), log_samples=False,
                                      bootstrap_iters=0, verbosity="ERROR")
    return float(results["results"][task["task"]][f"{metric},none"])


class GuardScore(BaseModel):
    """One guard's metric for the base model and the candidate, on the suite whose rows hash to `suite_hash`."""

    label: str
    metric: str
    max_regression: float
    suite_hash: str
    rows: int
    base: float
    tuned: float
    greater_is_better: bool = False

    @property
    def key(self) -> str:
        """The label as MLflow metric and tag names allow it."""
        return re.sub(r"[^\w.-]", "_", self.label)


def score_guards(suites: list[GuardSuite], tuned: ModelSource, precision: str) -> list[GuardScore]:
    """Each suite's metric under the base model and the tuned one, in the precision training ran in (an lm-eval
    task sees the adapter merged into its base: the harness takes a plain transformers model)."""
    if not suites:
        return []
    tokenizer = AutoTokenizer.from_pretrained(tuned.weights_dir or tuned.model_dir)
    scores = {}
    for name, model in (("base", load_model(tuned.model_dir)),
                        ("tuned", load_tuned_model(tuned.model_dir, tuned.weights_dir))):
        model.to(inference_device()).eval()
        with autocast(precision):
            losses = {suite.label: heldout_loss(model, suite.samples) for suite in suites if suite.task is None}
            if isinstance(model, PeftModel) and any(suite.task is not None for suite in suites):
                model = model.merge_and_unload()
            scores[name] = [losses[suite.label] if suite.task is None else
                            lm_eval_score(suite.task, suite.metric, model, tokenizer) for suite in suites]
        del model
    return [GuardScore(label=suite.label, metric=suite.metric, max_regression=suite.max_regression,
                       suite_hash=suite.suite_hash, rows=len(suite.samples), base=base, tuned=tuned,
                       greater_is_better=suite.greater_is_better)
            for suite, base, tuned in zip(suites, scores["base"], scores["tuned"])]


def _holds(score: GuardScore, reference: float) -> bool:
    """MLflow's validation of the candidate's metric against the reference's, worsened by the allowed regression."""
    worst = reference - score.max_regression if score.greater_is_better else reference + score.max_regression
    thresholds = {score.metric: MetricThreshold(threshold=worst, greater_is_better=score.greater_is_better)}
    try:
        mlflow.validate_evaluation_results(thresholds, EvaluationResult(metrics={score.metric: score.tuned},
                                                                        artifacts={}))
    except ModelValidationFailedException:
        return False
    return True


def champion_reference(score: GuardScore, champion_tags: dict[str, str]) -> float | None:
    """The champion's own score on the same suite (rows and metric alike), from its version's tags; None when it was
    never scored on it."""
    recorded = champion_tags.get(GUARD_TAG + score.key)
    if recorded is None:
        return None
    recorded = json.loads(recorded)
    same = recorded.get("suite_hash") == score.suite_hash and recorded.get("metric") == score.metric
    return float(recorded["tuned"]) if same else None


def guard_refusal(scores: list[GuardScore], champion_tags: dict[str, str] | None) -> tuple[str, str] | None:
    """(the guard's label, why) for the first guard the candidate fails against the base or the champion; None when
    every guard holds."""
    for score in scores:
        references = [("base", score.base)]
        if champion_tags is not None and (champion := champion_reference(score, champion_tags)) is not None:
            references.append(("champion", champion))
        for against, reference in references:
            if not _holds(score, reference):
                side = "below" if score.greater_is_better else "above"
                return score.label, (f"guard {score.label}: {score.metric} {score.tuned:.4f} is more than "
                                     f"{score.max_regression} {side} the {against}'s {reference:.4f}")
    return None


def guard_tags(scores: list[GuardScore]) -> dict[str, str]:
    """What a version records of each guard, for the candidates after it to compare with."""
    return {GUARD_TAG + score.key: json.dumps({"metric": score.metric, "suite_hash": score.suite_hash,
                                               "base": score.base, "tuned": score.tuned,
                                               "max_regression": score.max_regression}) for score in scores}
