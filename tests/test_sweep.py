"""Sweeps: which points a grid or a random search makes, and a real sweep's runs read back through MLflow."""

import json

import pytest
from mlflow.tracking import MlflowClient

from conf.schema import ConfigError, SweepConfig, load_sweep
from flows.sweep import RESULTS_TABLE, run_sweep, sweep_points


def test_a_grid_is_every_combination():
    sweep = SweepConfig(recipe="r.yaml", parameters={"train.lora.r": [8, 16], "train.learning_rate": [1e-4, 1e-3, 1e-2]})
    points = sweep_points(sweep)
    assert len(points) == 6 and len({json.dumps(p, sort_keys=True) for p in points}) == 6
    assert {"train.lora.r": 16, "train.learning_rate": 1e-2} in points


def test_a_random_search_draws_its_budget_of_distinct_points_in_range_repeatably():
    sweep = SweepConfig(recipe="r.yaml", method="random", budget=5, seed=3, parameters={
        "train.lora.r": [4, 8, 16, 32], "train.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "train.warmup_steps": {"low": 0, "high": 10}})
    points = sweep_points(sweep)
    assert points == sweep_points(sweep) and len(points) == 5
    assert len({json.dumps(p, sort_keys=True) for p in points}) == 5
    for point in points:
        assert point["train.lora.r"] in (4, 8, 16, 32) and 1e-4 <= point["train.learning_rate"] <= 1e-2
        assert isinstance(point["train.warmup_steps"], int) and 0 <= point["train.warmup_steps"] <= 10
    small = SweepConfig(recipe="r.yaml", method="random", budget=9, parameters={"train.lora.r": [4, 8]})
    assert len(sweep_points(small)) == 2  # only two distinct points exist


@pytest.mark.parametrize("text, expected", [
    ("recipe: r.yaml\nparameters: {data.train: [[a.jsonl]]}\n", "parameters.data.train: a sweep shares one data set"),
    ("recipe: r.yaml\nmethod: random\nparameters: {train.lora.r: [4]}\n", "budget: method random needs a budget"),
    ("recipe: r.yaml\nparameters: {train.learning_rate: {low: 1, high: 2}}\n", "a grid needs a list of values"),
    ("recipe: r.yaml\nparameters: {}\n", "parameters: Dictionary should have at least 1 item"),
])
def test_a_bad_sweep_file_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value) and "\n" not in str(error.value)


def test_a_sweep_runs_each_point_as_a_child_records_a_failed_point_and_registers_the_best(tiny_recipe):
    name = f"sweep-{tiny_recipe.parent.name[-8:]}"
    sweep = SweepConfig(
        recipe=tiny_recipe, overrides=[f"experiment={name}", f"registry.model_name={name}"],
        # A target module no layer has passes validation and fails in PEFT, as a user's typo would.
        parameters={"train.learning_rate": [2e-3], "train.lora.target_modules": ["all-linear", ["no_such_layer"]]},
    )
    summary = run_sweep(sweep)
    client = MlflowClient()
    parent = client.get_run(summary.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'")
    assert sorted(child.info.status for child in children) == ["FAILED", "FINISHED"]
    failed = next(child for child in children if child.info.status == "FAILED")
    assert "no_such_layer" in failed.data.tags["loraflow.error"]
    finished = next(child for child in children if child.info.status == "FINISHED")
    assert finished.data.params["train.learning_rate"] == "0.002" and "tuned_rougeL" in finished.data.metrics
    assert "train_loss" not in parent.data.metrics and parent.data.metrics["tokenize_train_samples"] == 4
    assert not any("tokenize_train_samples" in child.data.metrics for child in children)  # tokenized once, by the parent
    table = client.load_table(parent.info.experiment_id, RESULTS_TABLE, run_ids=[summary.run_id])
    assert sorted(table["status"]) == ["FAILED", "FINISHED"] and len(table) == 2
    assert parent.data.tags["loraflow.best_run_id"] == finished.info.run_id
    assert client.get_model_version(name, summary.registered.version).run_id == finished.info.run_id
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"  # registering left its status alone
