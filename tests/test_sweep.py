"""Sweeps: which points a grid or a random search makes, a real sweep's runs read back through MLflow (in this
process, and two points at once in processes of their own), and a TPE search that prunes."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conf.schema import ConfigError, SweepConfig, load_config, load_sweep
from flows.cli import main
from flows.prefect_server import free_port
from flows.runs import experiment_id
from flows.sweep import RESULTS_TABLE, run_sweep, sweep_points
from flows.sweep_point import PointJob, prepare_and_run
from tests.conftest import STATE_DIR, wait_for_http, write_tiny_recipe


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
    ("recipe: r.yaml\nmethod: random\nbudget: 2\npruner: median\nparameters: {train.lora.r: [4]}\n",
     "pruner: needs method tpe"),
    ("recipe: r.yaml\nmethod: tpe\nbudget: 2\nfirst_points: [{train.lora.alpha: 4}]\nparameters: {train.lora.r: [4]}\n",
     "first_points.0: ['train.lora.alpha'] are not swept parameters"),
    ("recipe: r.yaml\nmethod: tpe\nparameters: {train.lora.r: [4]}\n", "budget: method tpe needs a budget"),
    ("recipe: r.yaml\nparameters: {train.learning_rate: {low: 1, high: 2}}\n", "a grid needs a list of values"),
    ("recipe: r.yaml\nparameters: {}\n", "parameters: Dictionary should have at least 1 item"),
])
def test_a_bad_sweep_file_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value) and "\n" not in str(error.value)


def tiny_sweep(folder: Path, **fields) -> SweepConfig:
    name = f"sweep-{folder.name[-8:]}"
    return SweepConfig(recipe=write_tiny_recipe(folder), overrides=[f"experiment={name}", f"registry.model_name={name}"],
                       **fields)


def test_points_on_a_pool_need_the_prefect_server_its_workers_poll(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"recipe: {write_tiny_recipe(tmp_path)}\nparameters: {{train.lora.r: [4, 8]}}\n")
    assert main(["sweep", str(sweep_file), "--pool", "gpus"]) == 2
    assert capsys.readouterr().err.strip() == (f"loraflow: error: {sweep_file}: points on work pool gpus need the "
                                               "Prefect server its workers poll: set PREFECT_API_URL")


def test_a_point_whose_data_is_not_the_sweeps_fails_in_one_line_and_trains_nothing(tmp_path):
    """As on a worker that reads other files than the sweep did: the point's data hash is not the one it was given."""
    config = load_config(write_tiny_recipe(tmp_path), [f"experiment=hash-{tmp_path.name[-8:]}"])
    client = MlflowClient()
    run_id = client.create_run(experiment_id(config.experiment)).info.run_id
    point = {"train.learning_rate": 0.001}
    result = prepare_and_run(PointJob(config=config, point=point, run_id=run_id, data_hash="0" * 64))
    assert result.status == "FAILED" and "\n" not in result.error
    assert result.error.startswith("point learning_rate=0.001: its data hash ") and "differs from the sweep's 000000" in result.error
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["loraflow.error"] == result.error
    assert not client.get_metric_history(run_id, "train_loss")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A sweep of the tiny recipe at two learning rates and two LoRA targets, one a module no layer has, as a typo
    would (it passes validation and fails in PEFT)."""
    sweep = tiny_sweep(tmp_path_factory.mktemp("sweep"), parameters={
        "train.learning_rate": [2e-3, 1e-3], "train.lora.target_modules": ["all-linear", ["no_such_layer"]]})
    return sweep.overrides[0].split("=")[1], run_sweep(sweep), sweep


@pytest.mark.slow
def test_a_sweep_runs_each_point_as_a_child_records_a_failed_point_and_registers_the_best(swept):
    name, summary, _ = swept
    client = MlflowClient()
    parent = client.get_run(summary.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'")
    assert sorted(child.info.status for child in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    failed = next(child for child in children if child.info.status == "FAILED")
    assert "no_such_layer" in failed.data.tags["loraflow.error"]
    finished = next(child for child in children if child.info.run_id == summary.best.run_id)
    assert finished.data.params["train.learning_rate"] in ("0.002", "0.001") and "tuned_rougeL" in finished.data.metrics
    assert "train_loss" not in parent.data.metrics and parent.data.metrics["tokenize_train_samples"] == 4
    assert not any("tokenize_train_samples" in child.data.metrics for child in children)  # tokenized once, by the parent
    table = client.load_table(parent.info.experiment_id, RESULTS_TABLE, run_ids=[summary.run_id])
    assert sorted(table["status"]) == ["FAILED", "FAILED", "FINISHED", "FINISHED"] and len(table) == 4
    assert parent.data.tags["loraflow.best_run_id"] == finished.info.run_id
    assert client.get_model_version(name, summary.registered.version).run_id == finished.info.run_id
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"  # registering left its status alone


SCREENSHOTS = os.environ.get("LORAFLOW_SCREENSHOTS")  # a folder: the pages are also saved there as PNGs (the README's)


def trained_from(run) -> int:
    """When the run's training logged its first step (its run was made earlier, when the sweep handed the point out)."""
    return min(metric.timestamp for metric in MlflowClient().get_metric_history(run.info.run_id, "train_loss"))


def loss_history(run_id: str) -> list[float]:
    return [metric.value for metric in sorted(MlflowClient().get_metric_history(run_id, "train_loss"),
                                              key=lambda metric: metric.step)]


@pytest.mark.slow
def test_two_points_at_once_in_processes_of_their_own_reproduce_their_sequential_losses(swept, tmp_path):
    """The same two learning rates, two at once (each process one of the two cores): every step's loss as when the
    points ran one after the other in the sweep's process."""
    _, sequential, _ = swept
    sweep = tiny_sweep(tmp_path, max_concurrency=2, parameters={
        "train.learning_rate": [2e-3, 1e-3], "train.lora.target_modules": ["all-linear"]})
    summary = run_sweep(sweep)
    assert [result.status for result in summary.results] == ["FINISHED", "FINISHED"]
    first, second = (MlflowClient().get_run(result.run_id) for result in summary.results)
    assert trained_from(first) < second.info.end_time and trained_from(second) < first.info.end_time  # at once
    threads = str(max(1, os.cpu_count() // 2))
    assert first.data.tags["loraflow.torch_threads"] == second.data.tags["loraflow.torch_threads"] == threads
    for result in sequential.results:
        if result.status == "FINISHED":
            concurrent = next(r for r in summary.results if r.point == result.point)
            assert loss_history(concurrent.run_id) == pytest.approx(loss_history(result.run_id), rel=1e-4)
            assert len(loss_history(result.run_id)) == 2


@pytest.mark.slow
def test_tpe_with_a_median_pruner_prunes_a_learning_rate_that_cannot_learn(tmp_path):
    """Optuna's TPE over learning rates from 1e-9 (no step changes the loss) to 1e-2. The first two points are queued
    (first_points) so that pruning does not hang on the sampler's draws: 5e-3 finishes first, then 1e-9 reports a
    held-out loss at step 2 no lower than before training, above the finished point's: pruned before its 4th step."""
    sweep = tiny_sweep(tmp_path, method="tpe", budget=3, pruner="median", pruner_startup=1,
                       first_points=[{"train.learning_rate": 5e-3}, {"train.learning_rate": 1e-9}],
                       parameters={"train.learning_rate": {"low": 1e-9, "high": 1e-2, "log": True}})
    sweep = sweep.model_copy(update={"overrides": [*sweep.overrides, "train.max_steps=4", "train.warmup_steps=0",
                                                   "evaluate.loss_every_steps=2"]})
    summary = run_sweep(sweep)
    client = MlflowClient()
    statuses = {result.point["train.learning_rate"]: result.status for result in summary.results}
    assert statuses[5e-3] == "FINISHED" and statuses[1e-9] == "PRUNED" and len(summary.results) == 3
    pruned = next(result for result in summary.results if result.status == "PRUNED")
    run = client.get_run(pruned.run_id)
    assert run.data.tags["loraflow.sweep_state"] == "pruned" and run.info.status == "KILLED"
    assert [metric.step for metric in client.get_metric_history(pruned.run_id, "eval_loss")] == [2]
    assert max(metric.step for metric in client.get_metric_history(pruned.run_id, "train_loss")) == 2
    assert "tuned_rougeL" not in run.data.metrics
    name = sweep.overrides[0].split("=")[1]
    assert client.get_model_version(name, summary.registered.version).run_id == summary.best.run_id != pruned.run_id
    parent = client.get_run(summary.run_id)
    trials = client.load_table(parent.info.experiment_id, "sweep/trials.json", run_ids=[summary.run_id])
    assert {"COMPLETE", "PRUNED"} <= set(trials["state"]) and len(trials) == 3
    assert json.loads(parent.data.tags["loraflow.study_best_params"])["train.learning_rate"] > 1e-9
    assert parent.data.metrics["sweep_points_pruned"] >= 1


def chromium(url: str, shows: str, height: int = 1000, screenshot: str = "") -> str:
    """The page's DOM after its scripts ran, in headless Chromium (Debian's; `make test` installs it), once it
    `shows` the text: a cold UI server on a loaded machine can take longer than one load's time budget (five loads
    at most)."""
    with tempfile.TemporaryDirectory() as profile:
        command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={profile}", "--virtual-time-budget=15000", f"--window-size=1400,{height}"]
        for _ in range(5):
            page = subprocess.run([*command, "--dump-dom", url], capture_output=True, text=True, timeout=180,
                                  check=True).stdout
            if shows in page:
                break
        if SCREENSHOTS and screenshot:
            subprocess.run([*command, f"--screenshot={Path(SCREENSHOTS) / screenshot}", url], capture_output=True,
                           timeout=180, check=True)
        return page


@pytest.mark.slow
def test_the_mlflow_ui_shows_a_points_run_and_compares_the_sweeps_children_in_a_browser(swept):
    name, summary, _ = swept
    client = MlflowClient()
    experiment = client.get_run(summary.run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary.run_id}'")
    best = summary.best.run_id
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=STATE_DIR,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/#/experiments/{experiment}/runs/{best}"
    try:
        wait_for_http(f"http://127.0.0.1:{port}", server)
        overview = chromium(base, "train.lora.target_modules", screenshot="run.png")
        assert "train.learning_rate" in overview and "train.lora.target_modules" in overview
        charts = chromium(f"{base}/model-metrics", ">train_loss<", height=5000, screenshot="charts.png")
        assert ">train_loss<" in charts
        loss_chart = charts[charts.index(">train_loss<"):][:20000]
        assert "js-line" in loss_chart  # the chart titled train_loss draws a line
        assert "adapter_peft" in chromium(f"{base}/artifacts", "adapter_peft", screenshot="artifacts.png")
        ids = json.dumps([child.info.run_id for child in children])
        compare = f"http://127.0.0.1:{port}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment])}"
        page = chromium(compare, "train.lora.target_modules", screenshot="compare.png")
        assert all(child.info.run_name in page for child in children) and "train.lora.target_modules" in page
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_run_again_a_sweep_resumes_in_its_parent_run_and_trains_only_the_points_that_did_not_finish(swept):
    """Last in the module: it adds children to the module's sweep. Its two failed points run (and fail) again; the
    finished ones are kept, and the best, already registered, is not registered twice."""
    _, first, _ = swept
    again = run_sweep(swept[2])
    assert again.run_id == first.run_id
    assert sorted(result.status for result in again.results) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    kept = {result.run_id for result in first.results if result.status == "FINISHED"}
    assert {result.run_id for result in again.results if result.status == "FINISHED"} == kept
    assert not {result.run_id for result in again.results if result.status == "FAILED"} & {r.run_id for r in first.results}
    client = MlflowClient()
    children = client.search_runs([client.get_run(first.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{first.run_id}'")
    assert len(children) == 6
    assert again.registered.version == first.registered.version and again.best.run_id == first.best.run_id
