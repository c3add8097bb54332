"""Stage 5, register: the adapter as an MLflow model version, and the `champion` alias only when it earns it.

The adapter is logged as a pyfunc model (tasks/chat_model.py; tasks/head_model.py for a task head) holding the PEFT adapter folder (or, after full
training, the whole model folder) and the base model reference, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` loads the tuned model and generates.

Every version carries its primary metric, the base model's value of it, the promotion rule it was registered
under and what its score was measured on (held-out data hash, metric code version, base model), so the rule can be
applied again later (`loraflow promote`). The newest version takes the `challenger` alias; `champion` moves only to
a version that beats the base model and the current champion, compared on the same held-out data: a champion
scored on other data is scored again by the flow (a head-to-head) or not compared at all. The registered model
keeps the champions in order in a tag, which is how `loraflow rollback` finds the previous one.
"""

from __future__ import annotations

import getpass
import json
import math
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ConfigDict

from conf.schema import RegistryConfig, UserError
from tasks.base_model import base_identity, is_adapter
from tasks.guards import DECIDED_TAG, GuardScore, champion_reference, guard_refusal, guard_tags
from tasks.labels import Head
from tasks.model_card import CardFacts, model_card, redecided, version_description, write_card
from tasks.parity import ANSWERS_FILE, EvaluatedAnswers, check_parity
from tasks.promotion_lock import SharedLock, promotion_lock
from tasks.tracking import attached_run

CHAT_MODEL_CODE = Path(__file__).with_name("chat_model.py")
HEAD_MODEL_CODE = Path(__file__).with_name("head_model.py")  # task heads: labels and entities, not chat
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # conf/ and tasks/ travel with each version
SERVING_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "mlflow", "pydantic",
                    "pyyaml", "gguf", "numpy")
CHAMPION, CHALLENGER = "champion", "challenger"
PRIMARY_METRIC_TAG = "loraflow.primary_metric"
PRIMARY_VALUE_TAG = "loraflow.primary_value"
BASE_VALUE_TAG = "loraflow.base_value"
RULE_TAG = "loraflow.promotion_rule"
PROMOTION_TAG = "loraflow.promotion"
HISTORY_TAG = "loraflow.champion_history"  # on the registered model: the versions that held champion, in order
EVAL_DATA_TAG = "loraflow.eval_data_hash"  # the held-out rows the version's score was measured on
METRIC_VERSION_TAG = "loraflow.metric_version"  # the metric modules' code that measured it
COMPARED_TAG = "loraflow.compared_with"  # which comparison with the champion decided the promotion
LOCK_TAG = "loraflow.promotion_lock"  # the lock the decision was taken under (tasks/promotion_lock.py)
PARITY_TAG = "loraflow.parity"  # the served and merged model's answers against the evaluated ones (tasks/parity.py)
APPROVAL_TAG = "loraflow.approval"  # registry.approval manual: pending, approved, rejected or timed out
APPROVAL_RUN_TAG = "loraflow.approval_flow_run"  # the Prefect flow run waiting for the decision
AWAITING = "awaiting approval"


class RegistryError(UserError):
    """A registry request that cannot be done as asked; one line for the user."""


class RegistryUnavailable(RegistryError):
    """The registry could not be read (server error, timeout): the champion is unknown, not absent."""


@dataclass(frozen=True)
class RegisterResult:
    """`decided` is False when the registry could not be read to judge the promotion: the version stays challenger."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    decided: bool = True
    awaiting_approval: bool = False  # registry.approval manual: the rules hold, a person decides (settle_approval)
    parity: str = ""  # the served and merged model's answers against the evaluated ones, in words


@dataclass(frozen=True)
class Promotion:
    promote: bool
    reason: str
    compared_with: str = "base model only (no champion)"


@dataclass(frozen=True)
class ChampionScore:
    """The champion's score measured again in the candidate's run, on the candidate's held-out data."""

    version: str
    value: float


class RegisterRequest(BaseModel):
    """What registering a run's weights needs, whole: validated when made, and again when an offline run's record
    is replayed by `loraflow sync`. `champion_score` is the champion measured in this run on this run's held-out
    data (the head-to-head), when its own score was measured on other rows."""

    model_config = ConfigDict(ser_json_inf_nan="constants")  # a NaN metric survives the offline record

    run_id: str
    weights_dir: Path
    base_model: str
    metrics: dict[str, float]
    tags: dict[str, str]
    registry: RegistryConfig
    champion_score: ChampionScore | None = None
    card: CardFacts | None = None  # what the model card tells of the run's training and data
    guards: list[GuardScore] = []  # registry.guards, scored for the base and this candidate
    evaluated_answers: Path | None = None  # the evaluate stage's answers the registered model must give (chat)


def decide_promotion(
    candidate: float, base: float, champion: float | None, direction: str, min_improvement: float
) -> Promotion:
    """A candidate must beat the base model and the current champion by more than `min_improvement`; equal is not better."""

    def beats(value: float, reference: float) -> bool:
        gain = value - reference if direction == "max" else reference - value
        return gain > min_improvement

    if not beats(candidate, base):
        return Promotion(False, f"does not beat the base model ({candidate:.4f} vs base {base:.4f})")
    if champion is not None and not beats(candidate, champion):
        return Promotion(False, f"does not beat the current champion ({candidate:.4f} vs champion {champion:.4f})")
    against = "base" if champion is None else f"base {base:.4f} and champion {champion:.4f}"
    return Promotion(True, f"beats {against} with {candidate:.4f}")


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`; None only when MLflow says there is none. Any other failure to read it raises
    RegistryUnavailable: an unreadable champion must never be taken for no champion."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and (
                "alias" in str(error).lower() or "not found" in str(error).lower()):
            return None
        raise RegistryUnavailable(f"{name}: cannot read its {alias!r} alias ({str(error).splitlines()[0]})") from None


def _champion(client: MlflowClient, name: str) -> ModelVersion | None:
    return _alias(client, name, CHAMPION)


def score_basis(tags: dict[str, str]) -> tuple[str, str, str] | None:
    """What a score was measured on: (metric, held-out data hash, metric code version); None for a version
    registered without them (its score cannot be matched with another's)."""
    basis = tuple(tags.get(tag) for tag in (PRIMARY_METRIC_TAG, EVAL_DATA_TAG, METRIC_VERSION_TAG))
    return basis if all(basis) else None


def champion_to_rescore(name: str, candidate_tags: dict[str, str]) -> ModelVersion | None:
    """The current champion, when its score was measured on another basis than the candidate's tags say (held-out
    data, metric or metric code) and so must be measured again on the candidate's held-out data before the two
    compare."""
    champion = _champion(MlflowClient(), name)
    if champion is None or score_basis(champion.tags) == score_basis(candidate_tags):
        return None
    return champion


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name}: no version {version}") from None


def _judge(client: MlflowClient, name: str, candidate: ModelVersion, rescored: ChampionScore | None = None
           ) -> Promotion:
    """The promotion rule the candidate was registered under, against its base model and the current champion: the
    champion's stored score when it was measured on the same basis, else its score measured again in the
    candidate's run (`rescored`); with neither, the two are not compared and the candidate is not promoted."""
    tags = candidate.tags
    if not {PRIMARY_METRIC_TAG, PRIMARY_VALUE_TAG, BASE_VALUE_TAG, RULE_TAG} <= set(tags):
        return Promotion(False, f"version {candidate.version} was not registered by loraflow (no metric tags)")
    rule = json.loads(tags[RULE_TAG])
    champion = _champion(client, name)
    if champion is not None and str(champion.version) == str(candidate.version):
        return Promotion(False, f"version {candidate.version} is already the champion")
    champion_value, compared_with = None, "base model only (no champion)"
    if champion is not None:
        if rescored is not None and rescored.version == str(champion.version):
            champion_value = rescored.value
            compared_with = f"head to head: champion version {champion.version} scored again on this held-out data"
        elif score_basis(tags) is not None and score_basis(champion.tags) == score_basis(tags):
            champion_value = float(champion.tags[PRIMARY_VALUE_TAG])
            compared_with = f"champion version {champion.version}'s stored score (same held-out data and metric)"
        else:
            return Promotion(False, f"the champion (version {champion.version}) was scored on other held-out data or "
                                    "metric code and was not scored again on this version's; not compared",
                             "not compared")
    decision = decide_promotion(float(tags[PRIMARY_VALUE_TAG]), float(tags[BASE_VALUE_TAG]), champion_value,
                                rule["direction"], rule["min_improvement"])
    if decision.promote and (refusal := parity_refusal(tags)) is not None:
        return Promotion(False, refusal, compared_with)
    return Promotion(decision.promote, decision.reason, compared_with)


def _champion_history(client: MlflowClient, name: str) -> list[str]:
    return json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))


def _make_champion(client: MlflowClient, name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    history = _champion_history(client, name) + [version]
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


def _mark_challenger(client: MlflowClient, name: str, version: str) -> None:
    """`challenger` marks the newest version; called under the lock (MLflow's SQL store fails on two alias writes
    at once: a unique-constraint error), so a version registered earlier but locked later does not take it."""
    current = _alias(client, name, CHALLENGER)
    if current is None or int(version) > int(current.version):
        client.set_registered_model_alias(name, CHALLENGER, version)


def register(request: RegisterRequest, across_machines: SharedLock | None = None) -> RegisterResult:
    """Log the tuned weights as a model of the request's run, register it as the challenger, and make it champion if
    the promotion rule holds (deciding under the champion lock, shared between machines by `across_machines` on a
    tracking server). A candidate without a finite primary metric is not registered at all.

    Registering a run that already has a version of this model (a sync run again after a crash) judges that version
    instead of making a second. When the registry cannot be read to judge, the version stays challenger, undecided.
    """
    run_id, weights_dir, base_model, metrics = request.run_id, request.weights_dir, request.base_model, request.metrics
    tags, config = request.tags, request.registry
    candidate = metrics.get(f"tuned_{config.primary_metric}", math.nan)
    base = metrics.get(f"base_{config.primary_metric}", math.nan)
    if not (math.isfinite(candidate) and math.isfinite(base)):
        raise RegistryError(f"registry.primary_metric {config.primary_metric}: tuned {candidate}, base {base}; "
                            "a model without a finite score is not registered")
    client = MlflowClient()
    name = config.model_name
    existing = _version_of_run(client, name, run_id)
    card = None
    evaluated = EvaluatedAnswers.read(request.evaluated_answers) if request.evaluated_answers is not None else None
    if existing is None:
        head = Head.of(weights_dir)
        serving = {"task": head.task, "max_length": 512} if head is not None else {"max_new_tokens": 128}
        serving |= {"tool_format": evaluated.tool_format} if evaluated is not None else {}
        artifact = "adapter" if is_adapter(weights_dir) else "model"
        card = model_card(base_model=base_model, run_id=run_id, model_name=name, artifact=artifact, metrics=metrics,
                          primary_metric=config.primary_metric, facts=request.card,
                          champion=_champion_for_card(client, name, config.primary_metric, request.champion_score),
                          guards=request.guards)
        write_card(card, weights_dir)
        with attached_run(run_id), tempfile.TemporaryDirectory(prefix="loraflow-register-") as scratch:
            artifacts = {"weights": str(weights_dir)}
            if evaluated is not None and config.parity_prompts:
                answers = evaluated.first(config.parity_prompts).write(Path(scratch) / ANSWERS_FILE)
                artifacts["evaluated_answers"] = str(answers)  # what `loraflow deploy` checks before it switches
            info = mlflow.pyfunc.log_model(
                name=artifact,
                python_model=HEAD_MODEL_CODE if head is not None else CHAT_MODEL_CODE,
                artifacts=artifacts,
                model_config={"base_model": base_model} | serving | base_identity(base_model),
                code_paths=[str(PACKAGE_ROOT / "conf"), str(PACKAGE_ROOT / "tasks")],
                pip_requirements=_requirements(),
            )
        version_tags = tags | {
            PRIMARY_METRIC_TAG: config.primary_metric,
            PRIMARY_VALUE_TAG: repr(candidate),
            BASE_VALUE_TAG: repr(base),
            RULE_TAG: json.dumps({"direction": config.direction, "min_improvement": config.min_improvement}),
            "loraflow.run_id": run_id,
        } | guard_tags(request.guards)
        existing = _new_version(client, name, info, version_tags)
    number = str(existing.version)
    if PARITY_TAG not in existing.tags:
        _record_parity(client, name, number, run_id, evaluated, config.parity_prompts)
    earlier = existing.tags.get(PROMOTION_TAG, "undecided")
    if not earlier.startswith("undecided"):  # judged when first registered: that decision stands
        return RegisterResult(name, number, _holds_champion(client, name, number), earlier)
    rescored = request.champion_score
    with promotion_lock(name, across_machines) as lock:
        client.set_model_version_tag(name, number, LOCK_TAG, lock)
        try:
            _mark_challenger(client, name, number)
            decision = _judge(client, name, _version(client, name, number), rescored)
            if decision.promote and request.guards:
                decision = _guarded(client, name, number, run_id, request.guards, decision)
        except RegistryUnavailable as error:
            client.set_model_version_tag(name, number, PROMOTION_TAG, f"undecided: {error}")
            if card is not None:
                client.update_model_version(name, number, version_description(card, name, number, f"undecided: {error}"))
            return RegisterResult(name, number, False, f"undecided, kept as challenger: {error}", decided=False)
        awaiting = decision.promote and config.approval == "manual"
        reason = f"{AWAITING} ({decision.reason})" if awaiting else decision.reason
        if card is not None:
            outcome = reason if awaiting else ("champion: " if decision.promote else "not promoted: ") + reason
            client.update_model_version(name, number, version_description(card, name, number, outcome))
        client.set_model_version_tag(name, number, PROMOTION_TAG, reason)
        client.set_model_version_tag(name, number, COMPARED_TAG, decision.compared_with)
        if awaiting:
            client.set_model_version_tag(name, number, APPROVAL_TAG, "pending")
        elif decision.promote:
            _make_champion(client, name, number)
    return RegisterResult(name, number, decision.promote and not awaiting, reason, awaiting_approval=awaiting,
                          parity=parity_line(_version(client, name, number).tags))


@dataclass(frozen=True)
class Approval:
    """A person's decision on a version awaiting approval; `approve` None: nobody decided in time."""

    approve: bool | None
    by: str = ""
    reason: str = ""


APPROVAL_CHAMPION_TAG = "loraflow.approval_champion"  # the champion when the rules were judged ("none")


def pending_approval(name: str, version: str) -> str | None:
    """The Prefect flow run waiting for a person's decision on `version` (None when no flow waits for it: an offline
    run's version registered by `loraflow sync`); RegistryError when the version is not awaiting approval."""
    tags = _version(MlflowClient(), name, version).tags
    if tags.get(APPROVAL_TAG) != "pending":
        state = tags.get(APPROVAL_TAG)
        raise RegistryError(f"{name} version {version} is not awaiting approval"
                            + (f" (its approval: {state}, {tags.get('loraflow.approval_reason', '')})" if state else ""))
    return tags.get(APPROVAL_RUN_TAG)


def mark_waiting(name: str, version: str, flow_run_id: str) -> None:
    """Record which flow run waits for the decision on `version`, and the champion its rules were judged against."""
    client = MlflowClient()
    champion = _champion(client, name)
    client.set_model_version_tag(name, version, APPROVAL_CHAMPION_TAG,
                                 str(champion.version) if champion is not None else "none")
    client.set_model_version_tag(name, version, APPROVAL_RUN_TAG, flow_run_id)


def settle_approval(name: str, version: str, approval: Approval, across_machines: SharedLock | None = None
                    ) -> RegisterResult:
    """Record a person's decision (who, when, why) on a version awaiting approval. Approved, it becomes champion,
    unless another version became champion while it waited and the rule it was registered under no longer holds
    against that one. Rejected or not decided in time, the aliases stay where they are."""
    client = MlflowClient()
    with promotion_lock(name, across_machines):
        candidate = _version(client, name, version)
        if candidate.tags.get(APPROVAL_TAG) != "pending":
            raise RegistryError(f"{name} version {version} is not awaiting approval")
        promote = False
        if approval.approve is None:
            status, reason = "timed out", "not promoted: nobody approved it in time"
        elif not approval.approve:
            status, reason = "rejected", f"rejected by {approval.by}: {approval.reason or 'no reason given'}"
        else:
            status, reason = "approved", f"approved by {approval.by}: {approval.reason or 'no reason given'}"
            champion = _champion(client, name)
            now = str(champion.version) if champion is not None else "none"
            promote = True
            if now != candidate.tags.get(APPROVAL_CHAMPION_TAG, now):
                decision = _judge(client, name, candidate)  # a new champion since: the rule is judged again
                promote = decision.promote
                reason += f"; {'' if promote else 'not promoted: '}{decision.reason} (champion changed while waiting)"
        for key, value in {APPROVAL_TAG: status, "loraflow.approval_by": approval.by,
                           "loraflow.approval_reason": approval.reason,
                           "loraflow.approval_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), PROMOTION_TAG: reason}.items():
            client.set_model_version_tag(name, version, key, value)
        if candidate.description:
            outcome = ("champion: " if promote else "not promoted: ") + reason
            client.update_model_version(name, version, redecided(candidate.description, name, version, outcome))
        if promote:
            _make_champion(client, name, version)
    return RegisterResult(name, version, promote, reason, parity=parity_line(candidate.tags))


def _record_parity(client: MlflowClient, name: str, version: str, run_id: str, evaluated: EvaluatedAnswers | None,
                   prompts: int) -> None:
    """Train/serve parity of a new version (tasks/parity.py), measured once: `parity/pyfunc` and `parity/merged` on
    the run, and on the version a tag that `_judge` reads. A model that fails to load or export answers nothing."""
    if evaluated is None or not prompts or not evaluated.answers:
        why = "registry.parity_prompts is 0" if not prompts else "no chat answers were evaluated"
        client.set_model_version_tag(name, version, PARITY_TAG, json.dumps({"checked": False, "why": why}))
        return
    evaluated = evaluated.first(prompts)
    try:
        parity = check_parity(f"models:/{name}/{version}", evaluated)
        shares = {kind: result.share for kind, result in parity.items()}
        why = "; ".join(result.describe(kind) for kind, result in parity.items())
    except Exception as error:  # a version that does not load or export serves nothing the evaluation saw
        shares = {"pyfunc": 0.0, "merged": 0.0}
        why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    for kind, share in shares.items():
        client.log_metric(run_id, f"parity/{kind}", share)
    client.set_model_version_tag(name, version, PARITY_TAG, json.dumps(
        {"checked": True, "prompts": len(evaluated.answers), **shares, "why": why[:4000]}))


def parity_line(tags: dict[str, str]) -> str:
    """A version's train/serve parity in words ("" for a version registered before the check existed)."""
    parity = json.loads(tags.get(PARITY_TAG, "{}"))
    if not parity:
        return ""
    if not parity["checked"]:
        return f"not checked: {parity['why']}"
    return f"pyfunc {parity['pyfunc']:.2f}, merged {parity['merged']:.2f} on {parity['prompts']} prompts"


def parity_refusal(tags: dict[str, str]) -> str | None:
    """Why a version's served or merged answers keep it from promotion, from its parity tag; None when they do not
    (or parity was not checked: a task head, or a version registered before the check existed)."""
    parity = json.loads(tags.get(PARITY_TAG, "{}"))
    if not parity.get("checked") or min(parity["pyfunc"], parity["merged"]) >= 1.0:
        return None
    return f"served answers differ from the evaluated ones: {parity['why']}"


def _guarded(client: MlflowClient, name: str, version: str, run_id: str, scores: list[GuardScore],
             decision: Promotion) -> Promotion:
    """The promotion `decision` once every guard has had its say: refused by the first guard the candidate fails
    against the base or the champion (tagged on the version). The champion's scores are logged to the run."""
    champion = _champion(client, name)
    champion_tags = dict(champion.tags) if champion is not None else None
    for score in scores:
        if champion_tags is not None and (value := champion_reference(score, champion_tags)) is not None:
            client.log_metric(run_id, f"guard_{score.key}_champion_{score.metric}", value)
    refusal = guard_refusal(scores, champion_tags)
    if refusal is None:
        return Promotion(True, decision.reason + f"; guards hold ({', '.join(s.label for s in scores)})",
                         decision.compared_with)
    label, why = refusal
    client.set_model_version_tag(name, version, DECIDED_TAG, label)
    return Promotion(False, why, decision.compared_with)


def _champion_for_card(client: MlflowClient, name: str, primary_metric: str, rescored: ChampionScore | None
                       ) -> tuple[str, float] | None:
    """The champion's score of the primary metric, for the card: measured in this run (the head-to-head), else the
    one it was registered with when that is the same metric; None without a champion or a registry to ask."""
    if rescored is not None:
        return rescored.version, rescored.value
    try:
        champion = _champion(client, name)
    except RegistryUnavailable:
        return None
    if champion is None or champion.tags.get(PRIMARY_METRIC_TAG) != primary_metric:
        return None
    return str(champion.version), float(champion.tags[PRIMARY_VALUE_TAG])


def _new_version(client: MlflowClient, name: str, logged: mlflow.models.model.ModelInfo,
                 tags: dict[str, str]) -> ModelVersion:
    """A version of `name` (made if new) from the logged model: `mlflow.register_model` through the client, which
    prints nothing (the fluent API prints two lines to the console)."""
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return client.create_model_version(name, logged.model_uri, tags=tags, model_id=logged.model_id)


def _holds_champion(client: MlflowClient, name: str, version: str) -> bool:
    champion = _champion(client, name)
    return champion is not None and str(champion.version) == version


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The version of `name` registered from `run_id`, if one was."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def promote(name: str, version: str, *, force: bool = False, reason: str = "",
            across_machines: SharedLock | None = None) -> Promotion:
    """Move `champion` to `version` by hand if the rule it was registered under holds; `force` moves it anyway,
    recording who did and why on the version."""
    client = MlflowClient()
    with promotion_lock(name, across_machines):
        candidate = _version(client, name, version)
        decision = _judge(client, name, candidate)
        champion = _champion(client, name)
        if champion is not None and str(champion.version) == str(candidate.version):
            return decision
        if not decision.promote:
            if not force:
                raise RegistryError(f"{name} version {version} not promoted: {decision.reason} "
                                    "(--force --reason '...' promotes it anyway)")
            for key, value in {"loraflow.forced_by": getpass.getuser(), "loraflow.forced_reason": reason,
                               "loraflow.forced_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
                client.set_model_version_tag(name, version, key, value)
            decision = Promotion(True, f"forced by {getpass.getuser()}: {reason} (rule: {decision.reason})")
        client.set_model_version_tag(name, version, PROMOTION_TAG, decision.reason)
        _make_champion(client, name, str(candidate.version))
    return decision


def rollback(name: str, across_machines: SharedLock | None = None) -> tuple[str, str]:
    """Move `champion` back to the version that held it before the current one; returns (from, to)."""
    client = MlflowClient()
    with promotion_lock(name, across_machines):
        current = _champion(client, name)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        history = _champion_history(client, name)
        while history and history[-1] == str(current.version):
            history.pop()
        existing = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
        while history and history[-1] not in existing:  # a deleted version cannot come back
            history.pop()
        if not history:
            raise RegistryError(f"{name}: version {current.version} is the first champion; there is none to roll back to")
        previous = history[-1]
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(name, str(current.version), "loraflow.rolled_back",
                                     f"by {getpass.getuser()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    return str(current.version), previous


@dataclass(frozen=True)
class VersionRow:
    version: str
    created: str
    run_id: str
    metric: str
    value: float | None
    aliases: list[str]
    promotion: str


def list_versions(name: str) -> list[VersionRow]:
    """The registered model's versions, newest first, with their primary metric, aliases and promotion outcome."""
    client = MlflowClient()
    try:
        aliases = client.get_registered_model(name).aliases  # search results leave versions' aliases out
    except MlflowException:
        raise RegistryError(f"no registered model named {name!r}") from None
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version), reverse=True)
    return [
        VersionRow(
            version=str(v.version),
            created=time.strftime("%Y-%m-%d %H:%M", time.localtime(v.creation_timestamp / 1000)),
            run_id=v.run_id or "",
            metric=v.tags.get(PRIMARY_METRIC_TAG, ""),
            value=float(v.tags[PRIMARY_VALUE_TAG]) if PRIMARY_VALUE_TAG in v.tags else None,
            aliases=sorted(alias for alias, number in aliases.items() if str(number) == str(v.version)),
            promotion=v.tags.get(PROMOTION_TAG, ""),
        )
        for v in versions
    ]


def _requirements() -> list[str]:
    """Every package the served model imports, pinned to what trained it (loraflow's own code travels as code_paths)."""
    return [f"{package}=={package_version(package)}" for package in SERVING_PACKAGES]

