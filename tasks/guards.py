"""Guard suites (`registry.guards`): held-out conversations apart from the recipe's own, on which a new version must
not score worse than the base model, or the champion, by more than the guard allows. Tuned hard on one task, a
model can lose everyday abilities that the recipe's held-out rows never ask about; a guard asks.

Scored here for the base and the tuned model alike (held-out loss, as evaluation measures it); judged at
registration with MLflow's own model validation (`mlflow.validate_evaluation_results`, a `MetricThreshold` on the
candidate set at the reference's score plus the allowed regression).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import mlflow
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException
from pydantic import BaseModel

from tasks.base_model import load_model, load_tuned_model
from tasks.device import autocast, inference_device
from tasks.heldout import heldout_loss
from tasks.results import ModelSource

GUARD_TAG = "loraflow.guard."  # + the guard's key: its scores on a version, which a later candidate compares with
DECIDED_TAG = "loraflow.guard_decided"  # the guard that refused promotion


@dataclass(frozen=True)
class GuardSuite:
    """A guard's conversations, tokenized as training tokenized the recipe's (`samples`), and what identifies them."""

    label: str
    metric: str
    max_regression: float
    suite_hash: str
    samples: list[dict]


class GuardScore(BaseModel):
    """One guard's metric for the base model and the candidate, on the suite whose rows hash to `suite_hash`."""

    label: str
    metric: str
    max_regression: float
    suite_hash: str
    rows: int
    base: float
    tuned: float

    @property
    def key(self) -> str:
        """The label as MLflow metric and tag names allow it."""
        return re.sub(r"[^\w.-]", "_", self.label)


def score_guards(suites: list[GuardSuite], tuned: ModelSource, precision: str) -> list[GuardScore]:
    """Each suite's held-out loss under the base model and the tuned one, in the precision training ran in."""
    if not suites:
        return []
    scores = {}
    for name, model in (("base", load_model(tuned.model_dir)),
                        ("tuned", load_tuned_model(tuned.model_dir, tuned.weights_dir))):
        model.to(inference_device()).eval()
        with autocast(precision):
            scores[name] = [heldout_loss(model, suite.samples) for suite in suites]
        del model
    return [GuardScore(label=suite.label, metric=suite.metric, max_regression=suite.max_regression,
                       suite_hash=suite.suite_hash, rows=len(suite.samples), base=base, tuned=tuned)
            for suite, base, tuned in zip(suites, scores["base"], scores["tuned"])]


def _holds(score: GuardScore, reference: float) -> bool:
    """MLflow's validation of the candidate's metric against the reference's plus the allowed regression (every
    guard metric is a loss: lower is better)."""
    thresholds = {score.metric: MetricThreshold(threshold=reference + score.max_regression, greater_is_better=False)}
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
                return score.label, (f"guard {score.label}: {score.metric} {score.tuned:.4f} is more than "
                                     f"{score.max_regression} above the {against}'s {reference:.4f}")
    return None


def guard_tags(scores: list[GuardScore]) -> dict[str, str]:
    """What a version records of each guard, for the candidates after it to compare with."""
    return {GUARD_TAG + score.key: json.dumps({"metric": score.metric, "suite_hash": score.suite_hash,
                                               "base": score.base, "tuned": score.tuned,
                                               "max_regression": score.max_regression}) for score in scores}
