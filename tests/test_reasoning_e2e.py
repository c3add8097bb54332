"""The reasoning recipe as a user runs it (1 step, short answers, 6 of its held-out problems, on the tiny random Llama),
in the test process: what holds whatever a step learns. The reasoning reaches the trained tokens, travels with the
registered tokenizer, and evaluation scores answers apart from it."""

import json

import pytest
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from tasks.builtin_data import arithmetic_reasoning_heldout_rows
from tasks.reasoning import DEFAULT_FORMAT, Reasoning
from tests.conftest import REPO, loraflow_run, tiny_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    heldout = tmp_path_factory.mktemp("reasoning") / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(row) + "\n" for row in arithmetic_reasoning_heldout_rows()[:6]))
    return loraflow_run(str(REPO / "conf" / "reasoning_sft.yaml"), "-o", f"base_model={tiny_base_model()}",
                        "-o", "train.max_steps=1", "-o", "train.batch_size=2",
                        "-o", "evaluate.max_new_tokens=8", "-o", f"data.eval=[{heldout}]")


def test_every_row_carries_reasoning_and_every_sample_trains_it(run, tmp_path):
    run, _ = run
    client = MlflowClient()
    report = json.loads(open(client.download_artifacts(run.info.run_id, "data/report.json", str(tmp_path))).read())
    metrics = run.data.metrics
    assert report["reasoning_rows"] == metrics["data_train_rows"] + metrics["data_eval_rows"]
    # One reasoning turn per row, each rendered into the sample (SmolLM2's template knows none: the default format).
    assert metrics["tokenize_reasoning_rendered"] == metrics["tokenize_train_samples"] + metrics["tokenize_eval_samples"]


def test_the_registered_tokenizer_splits_as_training_rendered_and_scores_are_of_answers(run, tmp_path):
    run, stdout = run
    client = MlflowClient()
    (version,) = client.search_model_versions(f"run_id='{run.info.run_id}'")
    adapter = client.download_artifacts(run.info.run_id, "adapter_peft", str(tmp_path))
    assert Reasoning.of(AutoTokenizer.from_pretrained(adapter)) == Reasoning("train", DEFAULT_FORMAT, None)
    metrics = run.data.metrics
    for model in ("base", "tuned"):
        assert 0 <= metrics[f"{model}_reasoning_share"] <= 1 and 0 <= metrics[f"{model}_exact_match"] <= 1
    table_file = client.download_artifacts(run.info.run_id, "eval/samples_table.json", str(tmp_path))
    table = json.loads(open(table_file).read())
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    assert all(row["reference"].isdigit() for row in rows)  # the reference is the answer, its reasoning apart
    assert version.tags["loraflow.primary_metric"] == "exact_match" and "exact match:" in stdout
