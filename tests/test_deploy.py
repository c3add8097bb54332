"""Deploying the champion: a registered version loads and answers in a process that has no loraflow, and
`loraflow deploy` serves chat completions, follows the alias with no failed request, refuses a version that cannot
load, and answers each kind of bad request with a 4xx and one line."""

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import promote_while_busy, register_tiny_version

pytestmark = pytest.mark.slow


LOAD_OUTSIDE = """
import importlib.util, json, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]  # no loraflow install
sys.path_hooks = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "")]
sys.path = [p for p in sys.path if p not in ("", sys.argv[2])]
assert importlib.util.find_spec("tasks") is None, "loraflow is importable here"
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[1], model_config={"max_new_tokens": 6})
import tasks
print(json.dumps({"answers": model.predict(["Who are you?"]), "tasks": tasks.__file__,
                  "chat": model.predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})}))
"""


def test_a_version_loads_and_answers_where_loraflow_is_not_installed(tiny_adapter, tmp_path):
    from tests.conftest import REPO

    name = f"outside-{uuid.uuid4().hex[:8]}"
    version = register_tiny_version(name, tiny_adapter, 0.5).version
    result = subprocess.run([sys.executable, "-c", LOAD_OUTSIDE, f"models:/{name}/{version}", str(REPO)],
                            capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"PYTHONPATH": ""},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(loaded["answers"]) == 1 and isinstance(loaded["answers"][0], str)
    assert "/code/tasks/" in loaded["tasks"]  # loraflow's code came with the model (its code_paths)
    assert loaded["chat"]["object"] == "chat.completion" and loaded["chat"]["choices"][0]["message"]["role"] == "assistant"


def post(url, body, raw=None):
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read()), response.headers.get("X-Model-Version")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), None


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def chat(content="Who are you?", **options):
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4} | options


def test_deploy_serves_chat_follows_the_alias_and_refuses_what_cannot_load(tiny_adapter, tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from tasks.deploy import AliasFollower, ServerLimits, deploy

    name = f"deploy-{uuid.uuid4().hex[:8]}"
    assert register_tiny_version(name, tiny_adapter, 0.5).promoted
    served = deploy(AliasFollower(name, "champion"), "127.0.0.1", 0, poll_seconds=0.5,
                    limits=ServerLimits(max_tokens_limit=64))
    try:
        status, completion, header = post(f"{served.url}/v1/chat/completions", chat())
        assert status == 200 and header == "1" and completion["model"] == f"{name}/1"
        assert completion["object"] == "chat.completion" and completion["usage"]["completion_tokens"] <= 4
        # Counted as generated, not by tokenizing the answer again (random tokens re-split into more).
        finish = completion["choices"][0]["finish_reason"]
        assert finish == "stop" or (finish == "length" and completion["usage"]["completion_tokens"] == 4)
        assert get(f"{served.url}/health")["version"] == "1"
        status, invoked, _ = post(f"{served.url}/invocations", {"inputs": ["Hi", "Who are you?"]})
        assert status == 200 and len(invoked["predictions"]) == 2

        bad = {
            "not JSON": (None, b"{nope"),
            "not an object": ([1, 2], None),
            "no messages": ({"messages": []}, None),
            "a wrong role": (chat() | {"messages": [{"role": "wizard", "content": "x"}]}, None),
            "max_tokens over the limit": (chat(max_tokens=10_000), None),
            "a prompt past the context": (chat("word " * 9_000), None),
            "a negative temperature": (chat(temperature=-1), None),
        }
        for what, (body, raw) in bad.items():
            status, error, _ = post(f"{served.url}/v1/chat/completions", body, raw)
            assert 400 <= status < 500 and "\n" not in error["error"]["message"], what
        assert get(f"{served.url}/health")["status"] == "ok"  # still up

        # A promotion while requests are in flight: every request answered, by the old version and then the new.
        answered = []

        def client(stop):
            while not stop.is_set():
                started = time.monotonic()
                status, completion, header = post(f"{served.url}/v1/chat/completions", chat())
                answered.append((started, status, header))

        switched = promote_while_busy(client, name, tiny_adapter, served.url)
        assert answered and all(status == 200 for _, status, _ in answered)  # none failed across the switch
        assert {version for started, _, version in answered if started < switched} >= {"1"}
        assert {version for started, _, version in answered if started > switched} == {"2"}

        # A champion that cannot load: the server keeps serving version 2 and says why.
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text((tiny_adapter / "adapter_config.json").read_text())
        assert register_tiny_version(name, broken, 0.95).promoted
        assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "3"
        deadline = time.monotonic() + 300
        while "not switched to" not in caplog.text:
            assert time.monotonic() < deadline, "the broken version was never tried"
            time.sleep(0.2)
        assert get(f"{served.url}/health")["version"] == "2"
        assert post(f"{served.url}/v1/chat/completions", chat())[2] == "2"
    finally:
        served.stop()


def test_requests_that_arrive_together_share_one_generate_call_and_each_gets_its_own_answer():
    from tasks.deploy import Batcher, Sampling

    class Echo:
        batches = []

        def answer(self, conversations, sampling, sinks, give_up):
            self.batches.append(len(conversations))
            time.sleep(0.05)
            return [f"{conversation[-1]['content']}/{sampling.max_tokens}" for conversation in conversations]

    model = Echo()
    batcher = Batcher(model, max_batch=8, wait_seconds=0.05)
    requests = [([{"role": "user", "content": f"q{n}"}], Sampling(4 if n % 3 else 9, seed=7 if n == 5 else None))
                for n in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda request: batcher.answer(*request), requests))
    assert answers == [f"q{n}/{4 if n % 3 else 9}" for n in range(12)]  # each its own, whatever the batch
    assert max(model.batches) > 1 and sum(model.batches) == 12 and 1 in model.batches  # the seeded one alone
    batcher.close()
    assert batcher.answer([{"role": "user", "content": "late"}], Sampling(4)) == "late/4"  # after close: alone
