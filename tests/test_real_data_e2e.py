"""Data as users bring it, run end to end: a pretraining corpus of long articles one per line (the layout of `datasets`'
text loader), and the tool-calling recipe on the tiny random Llama (train, evaluate with the tool-call metric,
register)."""

import json
import random

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from tests.conftest import REPO, loraflow_run, tiny_base_model

pytestmark = pytest.mark.slow


def test_every_long_article_of_a_one_per_line_corpus_is_pretrained_on(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "an", "el", "is", "or", "um"]
    words = [a + b + c for a in syllables for b in syllables for c in syllables]
    articles = [" ".join(rng.choice(words) for _ in range(1_000)) + f" (article {n})." for n in range(30)]
    corpus = tmp_path / "articles.txt"
    corpus.write_text("\n".join(articles) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"name: corpus\nbase_model: {tiny_base_model()}\nexperiment: corpus-{tmp_path.name[-8:]}\n"
        f"output_dir: {tmp_path / 'outputs'}\n"
        f"data: {{train: [{corpus}], eval: [], eval_fraction: 0.1, max_chars: 5000}}\n"  # every article is longer
        "tokenize: {mode: pretrain, max_length: 256}\ntrain: {max_steps: 2, batch_size: 2}\n"
        "evaluate: {max_new_tokens: 8}\nregistry: {model_name: corpus, primary_metric: perplexity, direction: min}\n")
    run, _ = loraflow_run(str(recipe))
    metrics = run.data.metrics
    assert metrics["data_train_rows"] + metrics["data_eval_rows"] == 30 and metrics["data_rejected_rows"] == 0
    folder = MlflowClient().download_artifacts(run.info.run_id, "data", str(tmp_path / "data"))
    train = [json.loads(line)["text"] for line in open(f"{folder}/train.jsonl", encoding="utf-8")]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Every train article, whole, in the training blocks: its tokens plus one EOS each.
    assert metrics["tokenize_train_tokens"] == sum(len(tokenizer(text)["input_ids"]) + 1 for text in train)
    assert min(map(len, train)) > 5000


def test_the_tool_calling_recipe_trains_evaluates_and_registers():
    run, stdout = loraflow_run(str(REPO / "conf" / "tool_calls.yaml"), "-o", f"base_model={tiny_base_model()}",
                               "-o", "train.max_steps=3",
                               "-o", "evaluate.max_new_tokens=40", "-o", "experiment=tools-e2e")
    metrics = run.data.metrics
    for model in ("base", "tuned"):  # measured on held-out rows that all end on a call: finite shares
        assert 0.0 <= metrics[f"{model}_tool_call_accuracy"] <= metrics[f"{model}_tool_call_valid"] <= 1.0
    version = MlflowClient().get_model_version("loraflow-tools", run.data.tags["registered_model"].split("/")[1])
    assert version.run_id == run.info.run_id and version.tags["loraflow.primary_metric"] == "tool_call_accuracy"
    assert "registered:        loraflow-tools version" in stdout
