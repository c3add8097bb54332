"""Train/serve parity: a registered version answers the prompts it was evaluated on as the evaluate stage did, served
(its pyfunc) and exported (merged), or it is not promoted; `deploy` does not switch to a version that answers
otherwise. The scores given to register are made up: these tests are about parity, not about what training learns."""

import json
import uuid

import pytest
from mlflow.tracking import MlflowClient
from peft.tuners.lora import LoraModel

from conf.schema import RegistryConfig, load_config
from tasks.deploy import AliasFollower
from tasks.parity import ANSWERS_FILE, EvaluatedAnswers
from tasks.register import CHAMPION, PARITY_TAG, PROMOTION_TAG, RegisterRequest, promote, register
from tests.conftest import tiny_base_model, write_tiny_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run, trained and evaluated but not registered: its weights and its evaluated answers."""
    from flows.finetune import finetune

    recipe = write_tiny_recipe(tmp_path_factory.mktemp("parity"))
    summary = finetune(load_config(recipe, [f"experiment=parity-{uuid.uuid4().hex[:8]}"]), register=False)
    return summary.weights_dir, summary.samples_path.with_name(ANSWERS_FILE)


@pytest.fixture
def name():
    return f"parity-{uuid.uuid4().hex[:8]}"


def register_run(name, trained, answers=None):
    """The run's weights registered as a new version (from a run of its own), scored better than its base."""
    weights_dir, evaluated = trained
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    result = register(RegisterRequest(
        run_id=run_id, weights_dir=weights_dir, base_model=tiny_base_model(),
        metrics={"tuned_rougeL": 1.0, "base_rougeL": 0.0}, tags={},
        registry=RegistryConfig(model_name=name, primary_metric="rougeL"), evaluated_answers=answers or evaluated))
    return result, client.get_run(run_id).data.metrics, client.get_model_version(name, result.version).tags


def test_a_version_that_serves_and_merges_as_evaluated_is_promoted(name, trained):
    evaluated = EvaluatedAnswers.read(trained[1])
    assert len(evaluated.answers) == 2 and all(evaluated.answers)  # the two held-out prompts, answered
    result, metrics, tags = register_run(name, trained)
    assert metrics["parity/pyfunc"] == 1.0 and metrics["parity/merged"] == 1.0
    assert json.loads(tags[PARITY_TAG]) | {"why": ""} == {"checked": True, "prompts": 2, "pyfunc": 1.0, "merged": 1.0,
                                                         "why": ""}
    assert result.promoted and result.parity == "pyfunc 1.00, merged 1.00 on 2 prompts"


def test_a_broken_merge_fails_parity_and_the_version_is_not_promoted(name, trained, monkeypatch):
    real_merge = LoraModel.merge_and_unload

    def broken_merge(model, *args, **kwargs):  # the fault: the adapter merged at a thousand times its scale
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.data *= 1000
        return real_merge(model, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "merge_and_unload", broken_merge)
    result, metrics, tags = register_run(name, trained)
    assert metrics["parity/pyfunc"] == 1.0 and metrics["parity/merged"] < 1.0
    assert not result.promoted and result.reason.startswith("served answers differ from the evaluated ones: ")
    assert "merged 0" in result.reason and tags[PROMOTION_TAG] == result.reason
    assert MlflowClient().get_registered_model(name).aliases.get(CHAMPION) is None


def test_deploy_does_not_switch_to_a_version_that_answers_otherwise(name, trained, tmp_path, caplog):
    good, _, _ = register_run(name, trained)
    follower = AliasFollower(name, CHAMPION)
    follower.refresh()
    assert follower.live.version == good.version

    evaluated = EvaluatedAnswers.read(trained[1])
    other = EvaluatedAnswers(**{**evaluated.__dict__, "answers": [evaluated.answers[0] + " (not what it says)",
                                                                  *evaluated.answers[1:]]})
    tampered, metrics, _ = register_run(name, trained, other.write(tmp_path / ANSWERS_FILE))
    assert metrics["parity/pyfunc"] == 0.5 and not tampered.promoted
    promote(name, tampered.version, force=True, reason="test: a version whose answers differ from its evaluation")
    follower.refresh()
    assert follower.live.version == good.version and follower.refused == tampered.version
    assert f"version {tampered.version}: not switched to, it does not answer as it was evaluated" in caplog.text
