"""Stage 6, deploy: the version an alias points at (`champion`), served over HTTP, following the alias as it moves.

Endpoints: OpenAI-compatible `POST /v1/chat/completions`, MLflow's `POST /invocations` ({"inputs": [...]} or a chat
request), and `GET /health` (the live version). A watcher reads the alias every `poll_seconds`; when it moves (the
nightly job promotes, `loraflow rollback` moves it back) the new version is loaded beside the live one and swapped
in with one assignment: each request holds the version it started on, so in-flight requests finish there and none
fails. A version that fails to load, or does not answer the prompts it was evaluated on as the evaluation did
(tasks/parity.py), is not switched to; the live one keeps serving and the log says why.

The HTTP server is the standard library's threading server (one thread per request). Chat requests to one version
that arrive together are answered by one generate call (a batch of up to `max_batch`, with the same max_tokens and
temperature), since concurrent generate calls on a CPU only share its cores; `bench/serve.py` measures it. The
engine is transformers (the version's own pyfunc, CPU or GPU) or, on a CUDA machine with the `vllm` extra, vLLM.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.generation import Answer, RequestError
from tasks.parity import EvaluatedAnswers, Parity, served_answers

_logger = logging.getLogger("loraflow.deploy")
MAX_BODY_BYTES = 1 << 20


@dataclass
class _Pending:
    messages: list[dict]
    max_tokens: int
    temperature: float
    done: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None
    error: Exception | None = None


class Batcher:
    """Chat requests to one model that arrive together, answered in one generate call per batch (hand-written: the
    standard library server has no batching, and MLflow's scoring server none for a pyfunc). After `close` (the
    version was switched away from) its last requests are answered one by one."""

    def __init__(self, model, max_batch: int, wait_seconds: float = 0.01):
        self.model, self.max_batch, self.wait_seconds = model, max_batch, wait_seconds
        self.queue: queue.Queue[_Pending | None] = queue.Queue()
        self.lock = threading.Lock()  # one generate call at a time on this model
        self.state = threading.Lock()  # `closed` and the queue change together
        self.closed = False
        threading.Thread(target=self._run, name="loraflow-deploy-batch", daemon=True).start()

    def answer(self, messages: list[dict], max_tokens: int, temperature: float) -> Answer:
        pending = _Pending(messages, max_tokens, temperature)
        with self.state:
            queued = not self.closed
            if queued:
                self.queue.put(pending)
        if not queued:
            with self.lock:
                return self.model.answer([messages], max_tokens, temperature)[0]
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.answer

    def close(self) -> None:
        """No new requests are queued; the thread answers what is queued and stops (the stop mark is queued last)."""
        with self.state:
            self.closed = True
            self.queue.put(None)

    def _run(self) -> None:
        while (first := self.queue.get()) is not None:
            batch, deadline = [first], time.monotonic() + self.wait_seconds
            while len(batch) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # answer this batch, then stop
                    break
                batch.append(item)
            groups: dict[tuple[int, float], list[_Pending]] = {}
            for pending in batch:
                groups.setdefault((pending.max_tokens, pending.temperature), []).append(pending)
            for (max_tokens, temperature), group in groups.items():
                try:
                    with self.lock:
                        answers = self.model.answer([p.messages for p in group], max_tokens, temperature)
                    for pending, answer in zip(group, answers):
                        pending.answer = answer
                except Exception as error:  # handed to each waiting request, which answers with a 500
                    for pending in group:
                        pending.error = error
                for pending in group:
                    pending.done.set()


def load_version(uri: str, engine: str):
    """A registered version ready to answer: its own pyfunc (transformers), or the same model on vLLM."""
    if engine == "vllm":
        from tasks.vllm_engine import load_vllm_version

        return load_vllm_version(uri)
    model = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    if not hasattr(model, "check"):
        raise TypeError(f"{type(model).__name__} is not a chat model (a task head labels text; it has no chat)")
    return model


@dataclass
class LiveVersion:
    """One loaded version and the batcher its chat requests go through."""

    version: str
    model: object  # the TunedChatModel inside the pyfunc, or a VllmChatModel (--engine vllm)
    batcher: Batcher


class AliasFollower:
    """The version `name@alias` points at, loaded, and kept current by `refresh`."""

    def __init__(self, name: str, alias: str, max_tokens_limit: int, max_batch: int = 8, engine: str = "transformers"):
        self.name, self.alias, self.max_tokens_limit, self.max_batch = name, alias, max_tokens_limit, max_batch
        self.engine = engine
        self.live: LiveVersion | None = None
        self.refused: str | None = None  # a version that failed to load: not tried again until the alias moves on

    def refresh(self) -> None:
        """Load and switch to the alias's version if it moved; keep the live one if reading or loading fails."""
        try:
            version = str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException as error:
            _logger.warning(f"{self.name}@{self.alias}: cannot read the alias ({str(error).splitlines()[0]}); "
                            f"still serving version {self.live.version if self.live else 'none'}")
            return
        if (self.live is not None and version == self.live.version) or version == self.refused:
            return
        try:
            loaded = load_version(f"models:/{self.name}/{version}", self.engine)
        except Exception as error:  # any failure to load (missing weights, bad config, import error) keeps the old
            return self._refuse(version, f"it failed to load ({type(error).__name__}: "
                                         f"{str(error).splitlines()[0] if str(error) else ''})")
        if (differs := self._parity_failure(version, loaded)) is not None:
            return self._refuse(version, f"it does not answer as it was evaluated: {differs}")
        previous = self.live
        self.live, self.refused = LiveVersion(version, loaded, Batcher(loaded, self.max_batch)), None  # the switch
        if previous is not None:
            previous.batcher.close()
        _logger.warning(f"{self.name}@{self.alias}: now serving version {version}"
                        + (f" (was {previous.version})" if previous else ""))

    def _refuse(self, version: str, why: str) -> None:
        self.refused = version
        _logger.error(f"{self.name} version {version}: not switched to, {why}; still serving version "
                      f"{self.live.version if self.live else 'none'}")

    def _parity_failure(self, version: str, loaded) -> str | None:
        """Why the loaded version's answers to the prompts it was evaluated on differ from the evaluated answers
        (tasks/parity.py), or None. Checked for the transformers engine, which serves the evaluated computation;
        a version registered before the check existed carries no answers to check."""
        path = getattr(loaded, "evaluated_answers", None)
        if self.engine != "transformers" or path is None:
            return None
        evaluated = EvaluatedAnswers.read(path)
        parity = Parity.of(evaluated, served_answers(loaded, evaluated))
        if parity.share < 1.0:
            return parity.describe("share of identical answers")
        _logger.info(f"{self.name} version {version}: answers its {len(evaluated.answers)} evaluated prompts as "
                     "evaluated")
        return None

    def _serving(self) -> LiveVersion:
        """The version live now; a request holds it to its end, whatever switch comes meanwhile."""
        live = self.live
        if live is None:
            raise LookupError(f"{self.name}@{self.alias}: no version is loaded")
        return live

    def answer(self, request: dict) -> tuple[str, dict]:
        """(version, chat.completion) for one chat request, on the version live when it arrived."""
        live = self._serving()
        if isinstance(request.get("max_tokens"), int) and request["max_tokens"] > self.max_tokens_limit:
            raise RequestError(f"max_tokens: at most {self.max_tokens_limit} on this server")
        checked = live.model.check(request)
        answer = live.batcher.answer(checked.messages, checked.max_tokens, checked.temperature)
        return live.version, live.model.completion(checked, answer, f"{self.name}/{live.version}")

    def predict(self, inputs: list) -> tuple[str, list]:
        live = self._serving()
        if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs) or not inputs:
            raise RequestError("inputs: a non-empty list of prompt strings")
        with live.batcher.lock:
            return live.version, live.model.predict(None, inputs)


def _handler(follower: AliasFollower) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            _logger.info(format % args)

        def send_json(self, status: int, body: dict, version: str | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if version is not None:
                self.send_header("X-Model-Version", version)
            self.end_headers()
            self.wfile.write(data)

        def error(self, status: int, message: str) -> None:
            self.send_json(status, {"error": {"message": message, "type": HTTPStatus(status).phrase}})

        def do_GET(self):
            if self.path != "/health":
                return self.error(404, f"{self.path}: not found (GET /health, POST /v1/chat/completions, /invocations)")
            live = follower.live
            if live is None:
                return self.send_json(503, {"status": "loading", "model": follower.name, "alias": follower.alias})
            self.send_json(200, {"status": "ok", "model": follower.name, "alias": follower.alias,
                                 "version": live.version}, live.version)

        def do_POST(self):
            if self.path not in ("/v1/chat/completions", "/invocations"):
                return self.error(404, f"{self.path}: not found (POST /v1/chat/completions or /invocations)")
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                return self.error(413, f"the request body is over {MAX_BODY_BYTES} bytes")
            try:
                request = json.loads(self.rfile.read(length) or b"null")
            except ValueError as error:
                return self.error(400, f"the body is not JSON ({error})")
            if not isinstance(request, dict):
                return self.error(400, "the body must be a JSON object")
            try:
                if self.path == "/invocations" and "messages" not in request:
                    version, predictions = follower.predict(request.get("inputs"))
                    return self.send_json(200, {"predictions": predictions, "version": version}, version)
                version, completion = follower.answer(request)
            except RequestError as error:
                return self.error(400, str(error))
            except LookupError as error:
                return self.error(503, str(error))
            except Exception as error:  # the model failed on a valid request: this request's error, not the server's
                _logger.exception("request failed")
                return self.error(500, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
            self.send_json(200, completion if self.path != "/invocations" else {"predictions": [completion]}, version)

    return Handler


@dataclass
class Deployment:
    """A running server and its alias watcher."""

    server: ThreadingHTTPServer
    watching: threading.Event

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.watching.set()
        self.server.shutdown()
        self.server.server_close()


def deploy(follower: AliasFollower, host: str, port: int, poll_seconds: float) -> Deployment:
    """Load the alias's version, then serve it and watch the alias in background threads."""
    follower.refresh()
    if follower.live is None:
        raise LookupError(f"{follower.name}@{follower.alias}: no version could be loaded (see the log above)")
    server = ThreadingHTTPServer((host, port), _handler(follower))
    server.daemon_threads = True
    watching = threading.Event()

    def watch() -> None:
        while not watching.wait(poll_seconds):
            follower.refresh()

    threading.Thread(target=server.serve_forever, name="loraflow-deploy-http", daemon=True).start()
    threading.Thread(target=watch, name="loraflow-deploy-watch", daemon=True).start()
    return Deployment(server, watching)
