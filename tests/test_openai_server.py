"""`loraflow deploy` as OpenAI clients and operators use it: the official `openai` package lists the model, chats with
and without streaming (the chunks join to the whole answer under greedy decoding) and is refused without the key;
a promotion during four streams leaves each stream on one version; /metrics counts what was sent; past its limits
the server answers 429 at once and keeps serving; a client that goes away stops its generation."""

import json
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conf.schema import UserError
from flows.cli import main
from tasks.deploy import AliasFollower, ServerLimits, check_exposure, deploy
from tests.conftest import promote_while_busy, register_tiny_version

pytestmark = pytest.mark.slow
KEY = "sk-test-" + uuid.uuid4().hex
QUESTION = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def served(tiny_adapter):
    """Version 1 of a new model, served with an API key; the name and the running deployment."""
    name = f"openai-{uuid.uuid4().hex[:8]}"
    assert register_tiny_version(name, tiny_adapter, 0.5).promoted
    deployment = deploy(AliasFollower(name, "champion"), "127.0.0.1", 0, poll_seconds=0.3,
                        limits=ServerLimits(max_tokens_limit=4096), api_key=KEY)
    yield name, deployment
    deployment.stop()


def client(deployment, key=KEY):
    return openai.OpenAI(base_url=f"{deployment.url}/v1", api_key=key, max_retries=0)


def metric_values(deployment) -> dict[tuple, float]:
    with urllib.request.urlopen(f"{deployment.url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_the_openai_client_lists_the_model_and_chats_streamed_and_whole(served):
    name, deployment = served
    openai_client = client(deployment)
    [model] = openai_client.models.list().data
    assert model.id == name and model.model_extra["version"] == "1" and model.owned_by == "loraflow"

    whole = openai_client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12)
    assert whole.model == f"{name}/1" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 12 and whole.usage.total_tokens == (whole.usage.prompt_tokens
                                                                                 + whole.usage.completion_tokens)
    chunks = list(openai_client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12, stream=True,
                                                        stream_options={"include_usage": True}))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == \
        whole.choices[0].message.content
    assert {chunk.model for chunk in chunks} == {f"{name}/1"}
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # include_usage: the last chunk

    parts = openai_client.chat.completions.create(model=name, max_tokens=12, messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Who are"}, {"type": "text", "text": "you?"}]}])
    joined = openai_client.chat.completions.create(model=name, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are\nyou?"}])
    assert parts.choices[0].message.content == joined.choices[0].message.content  # OpenAI's forms, as plain turns
    nulls = openai_client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12,
                                                  extra_body={"temperature": None, "stop": None, "seed": None})
    assert nulls.choices[0].message.content == whole.choices[0].message.content  # null: the default

    text = whole.choices[0].message.content
    assert len(text) > 6, text  # the tiny random model says something to cut
    cut = openai_client.chat.completions.create(model=name, messages=QUESTION, max_completion_tokens=12,
                                                stop=[text[3:6]])
    assert cut.choices[0].message.content == text[: text.index(text[3:6])].strip()
    assert cut.choices[0].finish_reason == "stop"
    sampled = [openai_client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12, temperature=1.0,
                                                     top_p=0.9, seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample

    with pytest.raises(openai.BadRequestError, match="unsupported field"):
        openai_client.chat.completions.create(model=name, messages=QUESTION, logprobs=True)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        openai_client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        client(deployment, key="sk-wrong").chat.completions.create(model=name, messages=QUESTION)
    with pytest.raises(openai.AuthenticationError):
        client(deployment, key="sk-wrong").models.list()


def test_metrics_count_what_was_sent(served, caplog):
    name, deployment = served
    before = metric_values(deployment)
    openai_client = client(deployment)
    answers = [openai_client.chat.completions.create(model=name, messages=QUESTION, max_tokens=5) for _ in range(3)]
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            openai_client.chat.completions.create(model=name, messages=QUESTION, temperature=5)
    with pytest.raises(openai.AuthenticationError):
        client(deployment, key="sk-wrong").chat.completions.create(model=name, messages=QUESTION)
    after = metric_values(deployment)

    def sent(status):
        key = ("loraflow_requests_total", (("endpoint", "chat"), ("status", status)))
        return after.get(key, 0) - before.get(key, 0)

    assert (sent("200"), sent("400"), sent("401")) == (3, 2, 1)
    tokens = ("loraflow_generated_tokens_total", ())
    assert after[tokens] - before.get(tokens, 0) == sum(answer.usage.completion_tokens for answer in answers)
    assert after[("loraflow_live_version", (("alias", "champion"), ("model", name), ("version", "1")))] == 1
    assert after[("loraflow_batch_size_count", ())] - before.get(("loraflow_batch_size_count", ()), 0) == 3
    assert after[("loraflow_requests_running", ())] == 0
    assert KEY not in caplog.text  # the key is never logged


def stream_versions(url: str, name: str) -> set[str]:
    """One streamed answer read to its end: the versions its chunks name."""
    body = json.dumps({"model": name, "messages": QUESTION, "max_tokens": 40, "stream": True}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    versions, done = set(), False
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                versions.add(json.loads(line[6:])["model"])
    assert done
    return versions


def test_a_promotion_during_four_streams_leaves_each_stream_on_one_version(served, tiny_adapter):
    name, deployment = served
    url, streams = f"{deployment.url}/v1/chat/completions", []

    def keep_streaming(stop):
        while not stop.is_set():
            streams.append((time.monotonic(), stream_versions(url, name)))

    switched = promote_while_busy(keep_streaming, name, tiny_adapter, deployment.url)
    assert all(len(versions) == 1 for _, versions in streams)  # each stream answered by one version only
    assert {f"{name}/1"} <= set().union(*(v for started, v in streams if started < switched))
    assert set().union(*(v for started, v in streams if started > switched)) == {f"{name}/2"}
    assert metric_values(deployment)[("loraflow_version_switches_total", ())] >= 1


def post(url: str, body: dict) -> tuple[int, dict, float, dict]:
    """(status, headers, seconds taken, the JSON answer)."""
    started = time.monotonic()
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, dict(response.headers), time.monotonic() - started, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), time.monotonic() - started, json.loads(error.read())


def test_past_its_limits_the_server_answers_429_at_once_and_keeps_serving(tiny_adapter):
    name = f"limits-{uuid.uuid4().hex[:8]}"
    assert register_tiny_version(name, tiny_adapter, 0.5).promoted
    deployment = deploy(AliasFollower(name, "champion"), "127.0.0.1", 0, poll_seconds=60,
                        limits=ServerLimits(max_concurrent=1, max_queue=1, timeout_seconds=120, max_tokens_limit=4096))
    url = f"{deployment.url}/v1/chat/completions"
    long = {"messages": QUESTION, "max_tokens": 400}
    try:
        with ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda _: post(url, long), range(6)))
        refused = [(headers, seconds, body) for status, headers, seconds, body in outcomes if status == 429]
        assert refused and len(refused) + sum(outcome[0] == 200 for outcome in outcomes) == 6
        assert all(headers["retry-after"] and seconds < 2 and "busy" in body["error"]["message"]
                   for headers, seconds, body in refused)  # at once
        assert post(url, {"messages": QUESTION, "max_tokens": 4})[0] == 200  # and it keeps answering

        # A client that goes away mid-stream stops its generation: the next request need not wait for it.
        status, _, whole_seconds, whole = post(url, long)
        assert status == 200 and whole["usage"]["completion_tokens"] == 400  # the tiny model never stops by itself
        body = json.dumps(long | {"max_tokens": 4000, "stream": True}).encode()
        response = urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}))
        response.readline()
        response.close()  # the client goes away
        started = time.monotonic()
        assert post(url, {"messages": QUESTION, "max_tokens": 4})[0] == 200
        assert time.monotonic() - started < 5 * whole_seconds  # 4000 tokens would take ten times 400
    finally:
        deployment.stop()


def test_a_request_past_its_timeout_gets_503_with_retry_after(tiny_adapter):
    name = f"timeout-{uuid.uuid4().hex[:8]}"
    assert register_tiny_version(name, tiny_adapter, 0.5).promoted
    deployment = deploy(AliasFollower(name, "champion"), "127.0.0.1", 0, poll_seconds=60,
                        limits=ServerLimits(timeout_seconds=1, max_tokens_limit=4096))
    try:
        status, headers, seconds, body = post(f"{deployment.url}/v1/chat/completions",
                                              {"messages": QUESTION, "max_tokens": 4000})
        assert status == 503 and headers["retry-after"] and seconds < 5 and "within 1 s" in body["error"]["message"]
    finally:
        deployment.stop()


def test_a_model_served_beyond_this_machine_needs_a_key(capsys):
    with pytest.raises(UserError, match="--api-key"):
        check_exposure("0.0.0.0", None, insecure=False)
    check_exposure("0.0.0.0", "a key", insecure=False)
    check_exposure("0.0.0.0", None, insecure=True)
    check_exposure("127.0.0.1", None, insecure=False)
    assert main(["deploy", "no-such-model", "--host", "0.0.0.0"]) == 2
    assert "serves the model beyond this machine" in capsys.readouterr().err
