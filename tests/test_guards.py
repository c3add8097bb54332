"""Guard suites that are tasks of lm-evaluation-harness: the project's own multiple-choice task runs offline, and the
harness's accuracy is the share of questions whose answer the model finds likeliest, computed here apart."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from conf.schema import GuardConfig, UserError
from tasks.base_model import load_model
from tasks.guards import lm_eval_score, lm_eval_task
from tests.conftest import REPO

TASK = REPO / "conf" / "lm_eval" / "everyday_mc.yaml"


def likeliest_choices(model, tokenizer, rows: list[dict]) -> list[int]:
    """Per question, the choice with the highest summed log-likelihood after the prompt (lm-eval's `acc`)."""
    picks = []
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in row["choices"]:
            ids = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logits[place - 1, ids[place]].item() for place in range(len(context_ids), len(ids))))
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def test_an_lm_eval_guard_scores_the_projects_own_task_as_the_likeliest_answers_say(tiny_model_dir):
    guard = GuardConfig(data=f"lm-eval:{TASK}", metric="acc")
    task, suite_hash, greater_is_better = lm_eval_task(guard)
    assert greater_is_better and len(suite_hash) == 64
    model, tokenizer = load_model(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [json.loads(line) for line in (TASK.parent / "everyday_mc.jsonl").read_text().splitlines()]
    expected = sum(pick == row["answer"] for pick, row in zip(likeliest_choices(model, tokenizer, rows), rows))
    assert lm_eval_score(task, "acc", model, tokenizer) == pytest.approx(expected / len(rows))


def test_an_lm_eval_guard_that_cannot_run_stops_in_one_line(tmp_path):
    with pytest.raises(UserError, match="measures \\['acc'\\], not 'f1'"):
        lm_eval_task(GuardConfig(data=f"lm-eval:{TASK}", metric="f1"))
    with pytest.raises(UserError, match="no lm-eval task file"):
        lm_eval_task(GuardConfig(data=f"lm-eval:{tmp_path / 'none.yaml'}", metric="acc"))
    (tmp_path / "task.yaml").write_text(TASK.read_text())  # its rows file is not beside it here
    with pytest.raises(UserError, match="no such data file"):
        lm_eval_task(GuardConfig(data=f"lm-eval:{tmp_path / 'task.yaml'}", metric="acc"))
    with pytest.raises(ValueError, match="a data source guard is scored by eval_loss"):
        GuardConfig(data="rows.jsonl", metric="acc")


@pytest.mark.slow
def test_a_run_logs_its_lm_eval_guard_for_the_base_and_the_tuned_model(tiny_recipe, tiny_model_dir):
    import uuid

    from mlflow.tracking import MlflowClient

    from conf.schema import load_config
    from flows.finetune import finetune

    name = f"test-{uuid.uuid4().hex[:8]}"
    guard = f'[{{data: "lm-eval:{TASK}", metric: acc, max_regression: 1.0, name: everyday_mc}}]'
    summary = finetune(load_config(tiny_recipe, [f"registry.model_name={name}", f"registry.guards={guard}"]))
    metrics = MlflowClient().get_run(summary.run_id).data.metrics
    task, _, _ = lm_eval_task(GuardConfig(data=f"lm-eval:{TASK}", metric="acc"))
    base = lm_eval_score(task, "acc", load_model(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir))
    assert metrics["guard_everyday_mc_base_acc"] == pytest.approx(base)
    assert 0.0 <= metrics["guard_everyday_mc_tuned_acc"] <= 1.0
    recorded = json.loads(MlflowClient().get_model_version(name, summary.registered.version).tags[
        "loraflow.guard.everyday_mc"])
    assert recorded["tuned"] == metrics["guard_everyday_mc_tuned_acc"] and recorded["metric"] == "acc"
