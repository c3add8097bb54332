"""Export a logged or registered model as one merged Hugging Face folder: loads with
`AutoModelForCausalLM.from_pretrained`, no PEFT and no MLflow needed, and generates what base + adapter does.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from peft import PeftModel
from transformers import AutoTokenizer

from conf.schema import UserError
from tasks.base_model import load_tuned_model, resolve_base_model


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
    """The tuned weights folder of a loraflow model and its model config (base model, trust_remote_code)."""
    uri = model_uri(source)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except (MlflowException, OSError) as error:
        raise UserError(f"{source}: cannot load model ({str(error).splitlines()[0]})") from None
    flavor = mlflow.models.Model.load(str(local)).flavors.get("python_function", {})
    if "weights" not in flavor.get("artifacts", {}):
        raise UserError(f"{source}: not a loraflow model (no tuned weights in it)")
    return local / flavor["artifacts"]["weights"]["path"], flavor.get("config", {})


def export_merged(source: str, out_dir: Path) -> Path:
    """Write the tuned model (adapter merged into its base) with its tokenizer to `out_dir`, all or nothing."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir}: already exists and is not empty; name a new folder")
    with tempfile.TemporaryDirectory(prefix="loraflow-export-") as scratch:
        weights_dir, config = download_tuned(source, Path(scratch) / "model")
        trust = bool(config.get("trust_remote_code", False))
        model = load_tuned_model(resolve_base_model(config["base_model"]), weights_dir, trust)
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        staging = Path(scratch) / "merged"
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(weights_dir, trust_remote_code=trust).save_pretrained(staging)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staging), out_dir)
    return out_dir
