"""Against a real `mlflow server` process (loopback, SQLite backend, artifacts served by the server): a run,
its artifacts, the registry and its aliases; an unreachable server stops a run before any work; and a server that
goes away mid-run leaves the run to finish offline, with what it kept sent by `loraflow sync` once it is back."""

import json
import os
import signal
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conf.schema import load_config
from flows.cli import main
from flows.prefect_server import free_port
from tests.conftest import wait_for_http, write_tiny_recipe

pytestmark = pytest.mark.slow


def start_server(folder, port: int) -> subprocess.Popen:
    """`mlflow server` on loopback with its state in `folder`, in its own process group (it starts a worker); one
    worker instead of 4 halves its start-up here (15 s)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    wait_for_http(f"http://127.0.0.1:{port}/health", server)
    return server


def kill_server(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = start_server(folder, port)
    try:
        yield f"http://127.0.0.1:{port}", folder
    finally:
        kill_server(server)


@pytest.fixture
def use_server(tracking_server, monkeypatch):
    uri, folder = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LORAFLOW_ARTIFACT_ROOT")  # the server keeps the artifacts
    mlflow.set_tracking_uri(uri)
    yield uri, folder
    mlflow.set_tracking_uri(None)


def test_a_run_its_artifacts_and_the_registry_live_on_the_server(use_server, tiny_recipe, tmp_path):
    from flows.finetune import finetune

    uri, folder = use_server
    name = f"server-{tmp_path.name[-8:]}"
    summary = finetune(load_config(tiny_recipe, [f"experiment={name}", f"registry.model_name={name}"]))
    client = MlflowClient(uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "2"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server, not a local folder
    adapter = mlflow.artifacts.download_artifacts(run_id=summary.run_id, artifact_path="adapter_peft/adapter_config.json",
                                                  dst_path=str(tmp_path))
    assert '"r": 16' in open(adapter).read()
    assert list((folder / "artifacts").rglob("adapter_model.safetensors"))  # in the server's artifact store
    assert client.get_model_version_by_alias(name, "challenger").run_id == summary.run_id
    # Whether 2 steps beat the base model differs between CPUs: what the registry shows must match what register said.
    aliases = client.get_registered_model(name).aliases
    assert (str(aliases.get("champion")) == summary.registered.version) is summary.registered.promoted
    assert main(["models", name]) == 0


def test_an_unreachable_server_stops_the_run_before_any_work_in_one_line(tiny_recipe, monkeypatch, capsys, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        assert main(["run", str(tiny_recipe)]) == 2
    finally:
        mlflow.set_tracking_uri(None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"loraflow: error: MLFLOW_TRACKING_URI {uri}: the tracking server")
    assert not (tmp_path / "outputs").exists()


def test_a_run_outlives_its_tracking_server_and_sync_sends_what_it_kept(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """In process (the command's own `main`): the server is killed as training's third step ends."""
    import tasks.train.stopping
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, port = tmp_path / "server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    name = f"offline-{tmp_path.name[-8:]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LORAFLOW_ARTIFACT_ROOT")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    step_end = tasks.train.stopping.StopWhenRequested.on_step_end

    def kill_at_step_three(self, args, state, control, **kwargs):
        if state.global_step == 3:
            kill_server(server)
        return step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(tasks.train.stopping.StopWhenRequested, "on_step_end", kill_at_step_three)
    try:
        exit_code = main(["run", str(write_tiny_recipe(tmp_path)), "-o", "train.max_steps=12",
                          "-o", f"experiment={name}", "-o", f"registry.model_name={name}"])
    finally:
        mlflow.set_tracking_uri(None)
    [run_folder] = (tmp_path / "outputs").iterdir()
    run_id = run_folder.name
    assert exit_code == 75
    assert f"loraflow sync {run_id}" in capsys.readouterr().err.strip().splitlines()[-1]
    record_path = tmp_path / "outputs" / run_id / "unlogged.jsonl"
    record = [json.loads(line) for line in record_path.read_text().splitlines()]
    assert record[0]["op"] == "lost" and record[0]["uri"] == uri
    kept_steps = [step for entry in record if entry["op"] == "metrics" for _, _, _, step in entry["metrics"]]
    assert kept_steps and max(kept_steps) == 12
    assert {"path": str(tmp_path / "outputs" / run_id / "train" / "adapter"), "artifact_path": "adapter_peft",
            "op": "artifact"} in record
    assert [entry["op"] for entry in record[-2:]] == ["register", "end"] and record[-1]["status"] == "FINISHED"
    weights_dir = record[-2]["weights_dir"]  # the adapter on disk loads with PEFT's own loader
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), weights_dir)
    assert tuned.peft_config["default"].r == 16

    server = start_server(folder, port)  # back, on the same store
    mlflow.set_tracking_uri(uri)
    try:
        assert main(["sync", run_id, "--output-dir", str(tmp_path / "outputs")]) == 0
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert sorted(metric.step for metric in client.get_metric_history(run_id, "train_loss")) == list(range(1, 13))
        assert "tuned_eval_loss" in run.data.metrics and "adapter_config.json" in {
            os.path.basename(f.path) for f in client.list_artifacts(run_id, "adapter_peft")}
        assert client.get_model_version_by_alias(name, "challenger").run_id == run_id
        assert not record_path.exists() and (record_path.parent / "synced.jsonl").exists()
        assert main(["sync", run_id, "--output-dir", str(tmp_path / "outputs")]) == 2  # nothing is sent twice
    finally:
        mlflow.set_tracking_uri(None)
        kill_server(server)
    assert "nothing to sync" in capsys.readouterr().err
