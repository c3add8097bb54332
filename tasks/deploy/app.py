"""The HTTP API (FastAPI): OpenAI's `POST /v1/chat/completions` (streamed as server-sent events with `stream: true`)
and `GET /v1/models`, MLflow's `POST /invocations`, `GET /health` and `GET /metrics`.

With an API key, the model's endpoints want `Authorization: Bearer KEY` (401 otherwise); /health and /metrics stay
open, for load balancers and Prometheus. At most `max_concurrent` requests are answered at once and `max_queue`
wait for a slot; past that a request gets 429 at once, and one that waits or runs past `timeout_seconds` gets 503,
both with Retry-After. A client that goes away gives its request up: a queued one is never generated, and a batch
stops generating once none of its requests is still wanted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from tasks.deploy.follower import AliasFollower, LiveVersion
from tasks.deploy.metrics import ServerMetrics
from tasks.deploy.openai_api import ChatCall, Chunks, StreamText, UnknownModel, model_list, read_chat
from tasks.generation import Answer, RequestError

_logger = logging.getLogger("loraflow.deploy")
MAX_BODY_BYTES = 1 << 20
DISCONNECT_CHECK_SECONDS = 0.25  # how often a waiting request looks whether its client is still there


@dataclass(frozen=True)
class ServerLimits:
    max_concurrent: int = 16
    max_queue: int = 64
    timeout_seconds: float = 300.0
    max_tokens_limit: int = 512


class ServerError(Exception):
    """An answer other than 200: its status, one line, and the headers it needs (Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape (the `openai` client raises AuthenticationError, RateLimitError, ... from the status)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Client Closed Request"
    return JSONResponse({"error": {"message": message, "type": kind, "code": phrase}}, status_code=status,
                        headers=headers)


class Admission:
    """At most `max_concurrent` requests answered at once, at most `max_queue` waiting (hand-written: uvicorn's
    --limit-concurrency refuses at once with a bare 503, it has no queue)."""

    def __init__(self, limits: ServerLimits, metrics: ServerMetrics):
        self.limits, self.metrics = limits, metrics
        self.slots = asyncio.Semaphore(limits.max_concurrent)
        self.waiting = 0

    async def enter(self, deadline: float) -> None:
        if self.slots.locked() and self.waiting >= self.limits.max_queue:
            raise ServerError(429, f"the server is busy: {self.limits.max_concurrent} requests running and "
                                   f"{self.limits.max_queue} waiting; try again shortly", {"Retry-After": "1"})
        self.waiting += 1
        self.metrics.waiting.inc()
        try:
            await asyncio.wait_for(self.slots.acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ServerError(503, f"no slot came free within {self.limits.timeout_seconds:g} s",
                              {"Retry-After": "5"}) from None
        finally:
            self.waiting -= 1
            self.metrics.waiting.dec()
        self.metrics.running.inc()

    def leave(self) -> None:
        self.slots.release()
        self.metrics.running.dec()


def build_app(follower: AliasFollower, limits: ServerLimits, metrics: ServerMetrics, api_key: str | None) -> FastAPI:
    app = FastAPI(title="loraflow deploy", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(limits, metrics)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ServerError(401, "a valid API key is required: Authorization: Bearer <key>",
                              {"WWW-Authenticate": "Bearer"})

    def live_version() -> LiveVersion:
        try:
            return follower.serving()
        except LookupError as error:
            raise ServerError(503, str(error), {"Retry-After": "5"}) from None

    async def read_body(request: Request) -> dict:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise ServerError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            parsed = json.loads(body or b"null")
        except ValueError as error:
            raise ServerError(400, f"the body is not JSON ({error})") from None
        if not isinstance(parsed, dict):
            raise ServerError(400, "the body must be a JSON object")
        return parsed

    def answered(endpoint: str, started: float, status: int, tokens: int = 0) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - started)
        metrics.tokens.inc(tokens)

    async def guarded(request: Request, endpoint: str, handle) -> Response:
        """Authorization, admission and the request's deadline around `handle(body, arrival, finish)`, which answers
        and calls `finish(status, tokens)` once its answer is complete (a stream: when it ends); every outcome is
        counted by status, and the request's slot given back once."""
        arrival = time.monotonic()
        admitted, finished = False, False

        def finish(status: int, tokens: int = 0) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if admitted:
                admission.leave()
            answered(endpoint, arrival, status, tokens)

        try:
            authorized(request)
            body = await read_body(request)
            await admission.enter(arrival + limits.timeout_seconds)
            admitted = True
            return await handle(body, arrival, finish)
        except ServerError as error:
            finish(error.status)
            return error_response(error.status, error.message, error.headers)
        except RequestError as error:
            finish(400)
            return error_response(400, str(error))
        except UnknownModel as error:
            finish(404)
            return error_response(404, str(error))
        except Exception as error:  # the model failed on a valid request: this request's error, not the server's
            _logger.exception("request failed")
            finish(500)
            return error_response(500, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")

    async def answer_when_ready(request: Request, live: LiveVersion, call: ChatCall, deadline: float) -> Answer:
        """The request queued for its version's next batch, waited for without a thread: given up (never generated)
        when its client goes away or its deadline passes."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        pending = live.batcher.submit(call.checked.messages, call.sampling,
                                      on_done=lambda: loop.call_soon_threadsafe(
                                          lambda: ready.done() or ready.set_result(None)))
        while not ready.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ready), DISCONNECT_CHECK_SECONDS)
            if ready.done():
                break
            if await request.is_disconnected():
                pending.cancelled.set()
                raise ServerError(499, "the client went away")
            if time.monotonic() > deadline:
                pending.cancelled.set()
                raise ServerError(503, f"not answered within {limits.timeout_seconds:g} s", {"Retry-After": "5"})
        if pending.error is not None:
            raise pending.error
        return pending.answer

    def stream(live: LiveVersion, call: ChatCall, arrival: float, finish) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, ending with [DONE]: the request joins its version's next
        batch, which hands it its text as it is generated; given up when its client goes away or the deadline
        passes (a batch of given-up requests stops generating)."""
        loop = asyncio.get_running_loop()
        deadline = arrival + limits.timeout_seconds
        events: asyncio.Queue = asyncio.Queue()
        pending = live.batcher.submit(
            call.checked.messages, call.sampling,
            on_done=lambda: loop.call_soon_threadsafe(events.put_nowait, None),
            sink=lambda piece: loop.call_soon_threadsafe(events.put_nowait, piece))

        async def sse() -> AsyncIterator[str]:
            chunks = Chunks.of(f"{follower.name}/{live.version}")
            text, first, status, tokens = StreamText(live.model, call.sampling.stop), True, 200, 0
            try:
                yield _event(chunks.chunk({"role": "assistant", "content": ""}))
                while (piece := await asyncio.wait_for(events.get(), max(0.0, deadline - time.monotonic()))) is not None:
                    for delta in text.feed(piece):
                        if first:
                            first = False
                            metrics.first_token.observe(time.monotonic() - arrival)
                        yield _event(chunks.chunk(delta))
                if pending.error is not None:
                    raise pending.error
                answer = pending.answer
                for delta in text.finish(answer.text):
                    yield _event(chunks.chunk(delta))
                tokens = answer.tokens
                yield _event(chunks.chunk({}, "stop" if answer.stopped else "length"))
                if call.include_usage:
                    yield _event(chunks.usage(call.checked.prompt_tokens, answer.tokens))
                yield "data: [DONE]\n\n"
            except TimeoutError:
                status = 503
                yield _event({"error": {"message": f"not finished within {limits.timeout_seconds:g} s",
                                        "type": "server_error"}})
            except Exception as error:
                status = 500
                _logger.exception("stream failed")
                yield _event({"error": {"message": f"{type(error).__name__}: {error}", "type": "server_error"}})
            finally:
                pending.cancelled.set()  # a client gone (the task cancelled) or a deadline passed: give it up
                finish(status, tokens)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"X-Model-Version": live.version})

    async def completion(request: Request, live: LiveVersion, call: ChatCall, arrival: float, finish) -> dict:
        answer = await answer_when_ready(request, live, call, arrival + limits.timeout_seconds)
        finish(200, answer.tokens)
        return live.model.completion(call.checked, answer, f"{follower.name}/{live.version}")

    async def chat(request: Request, body: dict, arrival: float, finish) -> Response:
        live = live_version()
        call = read_chat(body, live.model, (follower.name, live.version), limits.max_tokens_limit)
        if call.stream:
            return stream(live, call, arrival, finish)
        return JSONResponse(await completion(request, live, call, arrival, finish),
                            headers={"X-Model-Version": live.version})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await guarded(request, "chat", lambda body, arrival, finish: chat(request, body, arrival, finish))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """MLflow's scoring protocol: {"inputs": [prompts]} in, {"predictions": [answers]} out; a chat request in,
        {"predictions": [chat.completion]} out."""

        async def invoke(body: dict, arrival: float, finish) -> Response:
            live = live_version()
            if "messages" in body:
                call = read_chat(body | {"stream": False}, live.model, (follower.name, live.version),
                                 limits.max_tokens_limit)
                return JSONResponse({"predictions": [await completion(request, live, call, arrival, finish)]},
                                    headers={"X-Model-Version": live.version})
            inputs = body.get("inputs")
            if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) for item in inputs):
                raise RequestError("inputs: a non-empty list of prompt strings")

            def predict() -> list[str]:
                with live.batcher.lock:
                    return live.model.predict(inputs)

            predictions = await asyncio.to_thread(predict)
            finish(200)
            return JSONResponse({"predictions": predictions, "version": live.version},
                                headers={"X-Model-Version": live.version})

        return await guarded(request, "invocations", invoke)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            authorized(request)
            live = live_version()
        except ServerError as error:
            return error_response(error.status, error.message, error.headers)
        return JSONResponse(model_list(follower.name, follower.alias, live.version, live.created))

    @app.get("/health")
    async def health() -> Response:
        live = follower.live
        if live is None:
            return JSONResponse({"status": "loading", "model": follower.name, "alias": follower.alias}, 503)
        return JSONResponse({"status": "ok", "model": follower.name, "alias": follower.alias, "version": live.version},
                            headers={"X-Model-Version": live.version})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, f"{request.method} {request.url.path}: {error.detail} (POST "
                              "/v1/chat/completions, GET /v1/models, POST /invocations, GET /health, GET /metrics)")

    return app


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
