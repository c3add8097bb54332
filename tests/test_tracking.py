"""The unlogged record without a server: a store that answers turns a failed call into an error, not an offline
run, and a replay cut short keeps exactly what it did not send, under the line naming the lost server."""

import json

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.tracking import read_record, recording_unlogged, replay, set_tags


def test_a_failed_call_to_a_store_that_answers_is_an_error_not_an_offline_run(tmp_path):
    record = tmp_path / "unlogged.jsonl"
    with recording_unlogged("no-such-run", record), pytest.raises(MlflowException):
        set_tags("no-such-run", {"a": "b"})
    assert not record.exists()


def test_a_replay_cut_short_keeps_what_it_did_not_send(tmp_path):
    run_id = MlflowClient().create_run(mlflow.create_experiment(f"replay-{tmp_path.name}")).info.run_id
    entries = [{"op": "lost", "uri": "http://gone", "at": "", "error": ""}, {"op": "tags", "tags": {"first": "1"}},
               {"op": "broken"}, {"op": "params", "params": {"last": "3"}}]
    record = tmp_path / "unlogged.jsonl"
    record.write_text("".join(json.dumps(entry) + "\n" for entry in entries))

    def broken(client, run_id, entry):
        raise MlflowException("the server went away again")

    with pytest.raises(MlflowException):
        replay(run_id, record, {"broken": broken})
    assert read_record(record) == ([entries[0], *entries[2:]], 0)  # the "lost" line stays: it names the server
    assert MlflowClient().get_run(run_id).data.tags["first"] == "1"

    applied = replay(run_id, record, {"broken": lambda client, run_id, entry: None})
    assert applied == {"broken": 1, "params": 1} and read_record(record) == ([entries[0]], 0)
    run = MlflowClient().get_run(run_id)
    assert run.data.params == {"last": "3"} and run.data.tags["first"] == "1"


def test_a_store_url_with_a_password_is_never_shown_with_it(monkeypatch, capsys):
    """`loraflow run` against a PostgreSQL store that does not answer: the one-line error names the store, masked."""
    from flows.cli import main

    monkeypatch.setattr("mlflow.store.db.utils.MAX_RETRY_COUNT", 1)  # MLflow retries a store for 100 s otherwise
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://loraflow:pa55word@127.0.0.1:1/mlflow")
    mlflow.set_tracking_uri(None)
    try:
        assert main(["run", "conf/identity_sft.yaml"]) == 2
    finally:
        mlflow.set_tracking_uri(None)
    error = capsys.readouterr().err
    assert "postgresql://loraflow:***@127.0.0.1:1/mlflow: the tracking store cannot be opened" in error
    assert "pa55word" not in error
