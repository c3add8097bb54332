"""Against a real `mlflow server` process (loopback, SQLite backend, artifacts served by the server): a run,
its artifacts, the registry and its aliases; and an unreachable server stops a run before any work."""

import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conf.schema import load_config
from flows.cli import main
from tests.conftest import free_port, wait_for_http

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", str(folder / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", server)
        yield uri, folder
    finally:
        server.terminate()
        server.wait(timeout=30)


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
    assert str(client.get_model_version_by_alias(name, "champion").version) == summary.registered.version
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
