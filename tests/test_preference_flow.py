"""SFT then DPO in one `loraflow run`, on the tiny random Llama: only what holds by construction is asserted (the
chain in MLflow, DPO starting at the SFT model, the version registered and used as any other)."""

import json
import math

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from transformers import AutoModelForCausalLM

from conf.schema import UserError
from flows.cli import main
from tasks.logged_model import fetch_adapter
from tests.conftest import loraflow_run, tiny_base_model, write_tiny_recipe

MODEL_NAME = "chained-dpo"


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    sft_recipe = write_tiny_recipe(folder)
    pairs = [{"prompt": f"Question {n}?", "chosen": f"Answer {n}.", "rejected": "I do not know."} for n in range(6)]
    for split, part in (("train", pairs[:4]), ("eval", pairs[4:])):
        (folder / f"{split}_pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    recipe = folder / "dpo.yaml"
    recipe.write_text(f"name: chained_dpo\nbase_model: {tiny_base_model()}\noutput_dir: {folder / 'outputs'}\n"
                      f"data: {{train: [{folder / 'train_pairs.jsonl'}], eval: [{folder / 'eval_pairs.jsonl'}]}}\n"
                      "tokenize: {max_length: 64}\n"
                      f"train: {{objective: dpo, init_adapter: {sft_recipe}, max_steps: 2, batch_size: 2, "
                      "warmup_steps: 0}\n"
                      f"evaluate: {{max_new_tokens: 8}}\nregistry: {{model_name: {MODEL_NAME}, "
                      "primary_metric: preference_accuracy}\n")
    run, printed = loraflow_run(str(recipe))
    return run, printed, recipe


def test_the_sft_stage_is_a_run_nested_under_the_dpo_run_and_not_registered(chained):
    run, *_ = chained
    client = MlflowClient()
    first = client.get_run(run.data.tags["loraflow.first_stage"])
    assert first.data.tags[MLFLOW_PARENT_RUN_ID] == run.info.run_id
    assert first.data.params["train.objective"] == "sft" and run.data.params["train.objective"] == "dpo"
    assert "registered_model" not in first.data.tags and first.info.status == "FINISHED"
    assert run.data.tags["loraflow.init_adapter"].startswith(first.data.params["output_dir"])


def test_dpo_starts_at_the_sft_model(chained):
    """The SFT adapter is both where DPO starts and its reference: the first step's loss is ln 2, its rewards 0."""
    run, *_ = chained
    history = {key: MlflowClient().get_metric_history(run.info.run_id, key)
               for key in ("train_loss", "train_rewards_margins")}
    first = {key: min(points, key=lambda point: point.step).value for key, points in history.items()}
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-5) and first["train_rewards_margins"] == 0


def test_preference_metrics_base_and_tuned_and_a_registered_version(chained):
    run, printed, _ = chained
    metrics = run.data.metrics
    for model in ("base", "tuned"):
        assert 0 <= metrics[f"{model}_preference_accuracy"] <= 1 and 0 <= metrics[f"{model}_reward_accuracy"] <= 1
    assert metrics["base_reward_margin"] == 0 and metrics["base_reward_accuracy"] == 0  # the base is its reference
    assert run.data.tags["registered_model"] == f"{MODEL_NAME}/1" and "preference accuracy:" in printed


def test_deploy_serves_the_dpo_version_unchanged(chained):
    from tasks.deploy import AliasFollower, ServerLimits, deploy
    from tests.test_deploy import chat, post

    # challenger: the newest version holds it whether or not its few steps beat the base
    served = deploy(AliasFollower(MODEL_NAME, "challenger"), "127.0.0.1", 0, poll_seconds=5,
                    limits=ServerLimits(max_tokens_limit=16))
    try:
        status, completion, version = post(f"{served.url}/v1/chat/completions", chat("Question 4?"))
        assert status == 200 and version == "1" and completion["model"] == f"{MODEL_NAME}/1"
    finally:
        served.stop()


def test_chat_and_export_use_the_dpo_version_unchanged(chained, tmp_path, capsys):
    assert main(["chat", f"models:/{MODEL_NAME}/1", "-p", "Question 4?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["export", f"models:/{MODEL_NAME}/1", "--merged", str(tmp_path / "merged")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.num_hidden_layers == 2


def test_a_registered_version_is_an_adapter_to_start_from_on_its_own_base_only(chained, tmp_path):
    folder = fetch_adapter(f"models:/{MODEL_NAME}/1", tmp_path / "a", tiny_base_model())
    assert (folder / "adapter_config.json").exists()
    with pytest.raises(UserError, match="trained on"):
        fetch_adapter(f"models:/{MODEL_NAME}/1", tmp_path / "b", "HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(UserError, match="not a LoRA adapter"):
        fetch_adapter(str(tmp_path), tmp_path / "c", tiny_base_model())


def test_the_version_scored_on_its_own_gets_the_preference_scores_its_run_logged(chained):
    """`loraflow eval` and the champion's head-to-head score one model, the rewards against its base: the same
    numbers the training run logged as tuned_*."""
    from conf.schema import load_config
    from flows.evaluate_model import evaluate_model

    run, _, recipe = chained
    scored = evaluate_model(load_config(recipe), f"models:/{MODEL_NAME}/1").metrics
    for name in ("preference_accuracy", "reward_margin", "reward_accuracy", "eval_loss"):
        assert scored[name] == pytest.approx(run.data.metrics[f"tuned_{name}"], rel=1e-4, abs=1e-6), name


def test_preview_shows_each_answer_after_its_prompt(chained, capsys):
    _, _, recipe = chained
    assert main(["preview", str(recipe), "-n", "1"]) == 0
    shown = capsys.readouterr().out
    assert "chosen (" in shown and "rejected (" in shown and "[[Answer" in shown and "[[I do not know." in shown
