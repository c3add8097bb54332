"""The pretraining recipe as a user runs it (2 steps, 5% held out): pydoc topics in blocks, held out by document,
perplexity."""

import json

import pytest
from datasets import load_from_disk
from mlflow.tracking import MlflowClient

from tasks.base_model import cache_root
from tests.conftest import REPO, loraflow_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run():
    run, _ = loraflow_run(str(REPO / "conf" / "pretrain_pydoc.yaml"), "-o", "train.max_steps=2",
                          "-o", "evaluate.max_new_tokens=8", "-o", "data.eval_fraction=0.05")
    return run


def documents(run, split, into):
    folder = MlflowClient().download_artifacts(run.info.run_id, "data", str(into))
    with open(f"{folder}/{split}.jsonl", encoding="utf-8") as rows:
        return [json.loads(line)["text"] for line in rows]


def test_blocks_are_full_documents_joined_with_eos_and_trained_on_every_token(run, tokenizer, tmp_path):
    blocks = load_from_disk(str(cache_root() / "tokenized" / run.data.tags["tokenize.cache_key"] / "train"))
    assert run.data.params["tokenize.mode"] == "pretrain"
    assert len(blocks) == run.data.metrics["tokenize_train_rows"] > 300
    assert all(len(ids) == 256 for ids in blocks["input_ids"][:-1]) and blocks["labels"] == blocks["input_ids"]
    stream = [t for block in blocks["input_ids"] for t in block]
    first_document = documents(run, "train", tmp_path)[0]
    first = tokenizer(first_document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream[: len(first)] == first


def test_held_out_documents_are_not_trained_and_perplexity_decides_the_registry(run, tmp_path):
    train, held_out = set(documents(run, "train", tmp_path)), set(documents(run, "eval", tmp_path))
    assert held_out and not train & held_out
    metrics = run.data.metrics
    assert 1 < metrics["tuned_perplexity"] < 100 and "tuned_identity_share" not in metrics
    (version,) = MlflowClient().search_model_versions(f"run_id='{run.info.run_id}'")
    assert version.name == "loraflow-pydoc" and version.tags["loraflow.primary_metric"] == "perplexity"
