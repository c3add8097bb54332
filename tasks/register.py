"""Stage 5, register: the adapter as an MLflow model version, and the `champion` alias only when it earns it.

The adapter is logged as a pyfunc model (tasks/chat_model.py) holding the PEFT adapter folder (or, after full
training, the whole model folder) and the base model reference, so
`mlflow.pyfunc.load_model("models:/<name>@champion")` loads the tuned model and generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import RegistryConfig
from tasks.base_model import is_adapter
from tasks.tracking import attached_run, set_tags

CHAT_MODEL_CODE = Path(__file__).with_name("chat_model.py")
CHAMPION = "champion"
PRIMARY_VALUE_TAG = "loraflow.primary_value"


@dataclass(frozen=True)
class RegisterResult:
    model_name: str
    version: str
    promoted: bool
    reason: str


@dataclass(frozen=True)
class Promotion:
    promote: bool
    reason: str


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


def _champion_value(client: MlflowClient, name: str) -> float | None:
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    value = version.tags.get(PRIMARY_VALUE_TAG)
    return float(value) if value is not None else None


def register(
    run_id: str, weights_dir: Path, base_model: str, metrics: dict[str, float], tags: dict[str, str],
    config: RegistryConfig, trust_remote_code: bool = False,
) -> RegisterResult:
    """Log the tuned weights as a model of `run_id`, register it, and move `champion` if the promotion rule holds."""
    client = MlflowClient()
    with attached_run(run_id):
        info = mlflow.pyfunc.log_model(
            name="adapter" if is_adapter(weights_dir) else "model",
            python_model=CHAT_MODEL_CODE,
            artifacts={"weights": str(weights_dir)},
            model_config={"base_model": base_model, "max_new_tokens": 128, "trust_remote_code": trust_remote_code},
            pip_requirements=_requirements(),
        )
    candidate = metrics[f"tuned_{config.primary_metric}"]
    version_tags = tags | {
        "loraflow.primary_metric": config.primary_metric,
        PRIMARY_VALUE_TAG: str(candidate),
        "loraflow.run_id": run_id,
    }
    version = mlflow.register_model(info.model_uri, config.model_name, tags=version_tags)
    decision = decide_promotion(
        candidate, metrics[f"base_{config.primary_metric}"], _champion_value(client, config.model_name),
        config.direction, config.min_improvement,
    )
    client.set_model_version_tag(config.model_name, version.version, "loraflow.promotion", decision.reason)
    if decision.promote:
        client.set_registered_model_alias(config.model_name, CHAMPION, version.version)
    return RegisterResult(config.model_name, version.version, decision.promote, decision.reason)


def _requirements() -> list[str]:
    return [f"{package}=={version(package)}" for package in ("torch", "transformers", "peft", "mlflow")]


@task(name="register", cache_policy=NO_CACHE)
def register_task(
    run_id: str, weights_dir: Path, base_model: str, metrics: dict[str, float], tags: dict[str, str],
    config: RegistryConfig, trust_remote_code: bool = False,
) -> RegisterResult:
    """register(), recording the outcome on the run as well as on the model version."""
    result = register(run_id, weights_dir, base_model, metrics, tags, config, trust_remote_code)
    set_tags(run_id, {"registered_model": f"{result.model_name}/{result.version}",
                      "promotion": result.reason})
    return result
