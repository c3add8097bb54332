"""Both task-head recipes as a user runs them (`loraflow run`, fewer steps, on the tiny random Llama): the
classification head on VADER's lexicon and the NER head on WNUT 2016's tweets are trained, scored base vs tuned,
registered, and served by `loraflow predict` and the pyfunc; the adapter, head included, reloads in a fresh process
through PEFT's own AutoPeftModel classes with the same logits. What a few steps learn is not asserted (it differs
between CPUs)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, STATE_DIR, loraflow_run, tiny_base_model

pytestmark = pytest.mark.slow

RECIPES = {"sequence_classification": ("sentiment_vader.yaml", "loraflow-sentiment"),
           "token_classification": ("ner_wnut16.yaml", "loraflow-ner")}
WNUT_TYPES = {"person", "geo-loc", "company", "facility", "product", "other", "musicartist", "sportsteam", "tvshow",
              "movie"}


def cli(*args, **options):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=STATE_DIR,
                          env=dict(os.environ), timeout=900, **options)


@pytest.fixture(scope="module", params=list(RECIPES))
def run(request):
    recipe, _ = RECIPES[request.param]
    mlflow_run, stdout = loraflow_run(str(REPO / "conf" / recipe), "-o", f"base_model={tiny_base_model()}",
                                      "-o", "train.max_steps=6",
                                      "-o", "train.checkpoint_every=6",
                                      "-o", "data.eval_fraction=0.03")  # a few hundred held-out rows, not the 10%
    return request.param, mlflow_run, stdout


def test_the_head_run_is_scored_base_vs_tuned_and_registered(run, tmp_path):
    task, mlflow_run, stdout = run
    metrics = mlflow_run.data.metrics
    overall = ("accuracy", "precision", "recall", "f1")
    assert all(0 <= metrics[f"{model}_{name}"] <= 1 for model in ("base", "tuned") for name in overall)
    assert metrics["tuned_eval_loss"] > 0 and "tuned_perplexity" not in metrics and "tuned_rougeL" not in metrics
    per_class = {name for name in metrics if name.startswith("tuned_f1_")}
    if task == "sequence_classification":
        assert per_class == {"tuned_f1_positive", "tuned_f1_negative"}
    else:
        assert {"tuned_f1_person", "tuned_f1_geo-loc"} <= per_class <= {f"tuned_f1_{kind}" for kind in WNUT_TYPES}
    client = MlflowClient()
    files = {item.path for item in client.list_artifacts(mlflow_run.info.run_id, "eval")}
    assert {"eval/confusion_matrix.png", "eval/predictions.md", "eval/predictions_table.json"} <= files
    table_file = client.download_artifacts(mlflow_run.info.run_id, "eval/predictions_table.json", str(tmp_path))
    table = json.loads(open(table_file).read())
    assert set(table["columns"]) == {"text", "gold", "base", "tuned"} and table["data"]
    (version,) = client.search_model_versions(f"run_id='{mlflow_run.info.run_id}'")
    assert version.name == RECIPES[task][1] and version.tags["loraflow.primary_metric"] == "f1"
    assert f"{RECIPES[task][1]} version {version.version}" in stdout and "loraflow predict" in stdout


def test_predict_and_the_pyfunc_label_text_and_chat_refuses(run):
    import mlflow

    task, mlflow_run, _ = run
    (version,) = MlflowClient().search_model_versions(f"run_id='{mlflow_run.info.run_id}'")
    uri = f"models:/{version.name}/{version.version}"
    texts = ["Anna Schmidt flew to New York with the Red Cross.", "what a lovely, happy day"]
    predictions = mlflow.pyfunc.load_model(uri).predict(texts)
    assert len(predictions) == 2
    if task == "sequence_classification":
        assert all(p["label"] in ("positive", "negative") and p["score"] == max(p["scores"].values()) for p in predictions)
        assert all(sum(p["scores"].values()) == pytest.approx(1, abs=1e-3) for p in predictions)
    else:
        spans = [span for text, found in zip(texts, predictions) for span in found]
        assert all(text[span["start"] : span["end"]] == span["text"] and span["entity"] in WNUT_TYPES
                   for text, found in zip(texts, predictions) for span in found)
        assert all(0 <= span["score"] <= 1 for span in spans)
    shown = cli("predict", uri, "--text", texts[0], "--json")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout.strip().splitlines()[-1]) == {"text": texts[0], "prediction": predictions[0]}
    if task == "token_classification":
        return  # chat and deploy refuse any head model alike: checked on the classification head's run only
    refused = cli("chat", uri, "-p", "hello")
    assert refused.returncode == 2 and "not a chat model" in refused.stderr and "loraflow predict" in refused.stderr
    refused = cli("deploy", version.name, "--alias", "challenger", "--port", "0")  # the newest version is challenger
    assert refused.returncode == 2 and "serves chat models" in refused.stderr and "mlflow models serve" in refused.stderr


RELOAD = """
import json, sys, torch
from peft import {auto}
head = json.load(open(sys.argv[1] + "/head.json"))
model = {auto}.from_pretrained(sys.argv[1], num_labels=len(head["labels"]), pad_token_id=head["pad_token_id"])
ids = torch.tensor(json.loads(sys.argv[2]))
print(json.dumps(model.eval()(input_ids=ids).logits.tolist()))
"""


def test_the_trained_head_is_saved_and_peft_reloads_it_with_the_same_logits(run, tmp_path):
    from tasks.base_model import load_head_model, load_tuned_head
    from tasks.labels import Head

    task, mlflow_run, _ = run
    weights = MlflowClient().download_artifacts(mlflow_run.info.run_id, "adapter_peft", str(tmp_path))
    config = json.load(open(f"{weights}/adapter_config.json"))
    assert {"score", "classifier"} <= set(config["modules_to_save"]) and config["task_type"] in ("SEQ_CLS", "TOKEN_CLS")
    head = Head.of(weights)
    assert head.task == task and len(head.labels) >= 2
    ids = [[504, 1176, 314, 253, 1345, 30]]
    with torch.no_grad():
        ours = load_tuned_head(tiny_base_model(), weights, head).eval()(
            input_ids=torch.tensor(ids)).logits
        fresh = load_head_model(tiny_base_model(), head).eval()(input_ids=torch.tensor(ids)).logits
    auto = "AutoPeftModelForSequenceClassification" if task == "sequence_classification" else \
        "AutoPeftModelForTokenClassification"
    reloaded = subprocess.run([sys.executable, "-c", RELOAD.format(auto=auto), weights, json.dumps(ids)],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300,
                              env={key: value for key, value in os.environ.items() if key != "PYTHONPATH"})
    assert reloaded.returncode == 0, reloaded.stderr[-2000:]
    theirs = torch.tensor(json.loads(reloaded.stdout.strip().splitlines()[-1]))
    assert torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours, fresh, atol=1e-3)  # the saved head is the trained one, not a new draw
