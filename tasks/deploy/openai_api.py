"""OpenAI's chat completions API as this server speaks it: which request fields it takes (any other is refused in one
400 line), and the shapes of what it answers (chat.completion, chat.completion.chunk, the model list).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from tasks.deploy.batcher import Sampling
from tasks.deploy.engine import ServedModel
from tasks.generation import RequestError, cut_at_stop

FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
          "stream_options", "n")
MAX_STOP_STRINGS = 4  # as OpenAI's API


class UnknownModel(LookupError):
    """A request for a model this server does not serve (a 404, as OpenAI's API answers it)."""


@dataclass(frozen=True)
class ChatCall:
    """A checked chat request: the version's own check (messages, prompt tokens) and how to answer it."""

    checked: object  # the version's ChatRequest
    sampling: Sampling
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage


def _number(body: dict, key: str, low: float, high: float, default: float) -> float:
    value = body.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{key}: a number from {low:g} to {high:g}")
    return float(value)


def _max_tokens(body: dict, limit: int) -> int | None:
    given = {key: body[key] for key in ("max_completion_tokens", "max_tokens") if body.get(key) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise RequestError("max_tokens and max_completion_tokens differ; give one")
    value = next(iter(given.values()), None)
    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise RequestError(f"{next(iter(given))}: at most {limit} on this server")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop: a string or a list of up to {MAX_STOP_STRINGS} non-empty strings")
    return tuple(stop)


def _messages(messages):
    """OpenAI's message forms the versions' check does not take, as it takes them: content as a list of text parts
    (joined by newlines, as vLLM joins them) and the `developer` role (a system turn). Anything else is left for
    the check to judge."""
    if not isinstance(messages, list):
        return messages
    plain = []
    for number, message in enumerate(messages):
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            parts = message["content"]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in parts):
                raise RequestError(f"messages[{number}].content: only text parts are supported")
            message = message | {"content": "\n".join(part["text"] for part in parts)}
        if isinstance(message, dict) and message.get("role") == "developer":
            message = message | {"role": "system"}
        plain.append(message)
    return plain


def read_chat(body: dict, model: ServedModel, served: tuple[str, str], max_tokens_limit: int) -> ChatCall:
    """The request checked field by field (RequestError: one line for a 400; UnknownModel: a 404). `served` is the
    model name and the live version: a request may name either `NAME` or `NAME/VERSION`."""
    body = {key: value for key, value in body.items() if value is not None}  # null: the default, as OpenAI reads it
    if unknown := sorted(set(body) - set(FIELDS)):
        raise RequestError(f"unsupported field(s) {', '.join(unknown)}; this server takes {', '.join(FIELDS)}")
    name, version = served
    if body.get("model") not in (None, name, f"{name}/{version}"):
        raise UnknownModel(f"model {body['model']!r} is not served here; it serves {name} (version {version}), "
                           "as GET /v1/models lists")
    if body.get("n", 1) != 1:
        raise RequestError("n: only 1 answer per request is supported")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise RequestError("stream: true or false; stream_options: {include_usage: true or false}, with stream")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("seed: a whole number")
    max_tokens = _max_tokens(body, max_tokens_limit)
    request = {"messages": _messages(body.get("messages")), "temperature": body.get("temperature", 0.0)}
    checked = model.check(request | ({"max_tokens": max_tokens} if max_tokens is not None else {}))
    sampling = Sampling(checked.max_tokens, checked.temperature, _number(body, "top_p", 0.0, 1.0, 1.0), _stop(body),
                        seed)
    if sampling.top_p == 0.0:
        raise RequestError("top_p: above 0, at most 1")
    model.refuse_unsupported(sampling, stream)
    return ChatCall(checked, sampling, stream, bool(options.get("include_usage")))


class StreamText:
    """A streamed answer's text as OpenAI deltas: reasoning (`reasoning_content`) and answer (`content`) apart, the
    way the whole answer is split; a stop string and anything after it held back, and so are leading and trailing
    spaces, so that the deltas join to the non-streamed answer. Hand-written: transformers streams text, not
    OpenAI's deltas."""

    def __init__(self, model: ServedModel, stop: tuple[str, ...]):
        self.model, self.stop = model, stop
        self.text, self.sent = "", {"reasoning_content": "", "content": ""}
        self.stopped = False

    def feed(self, piece: str) -> list[dict]:
        """The deltas `piece` adds (none once a stop string has come)."""
        if self.stopped:
            return []
        self.text += piece
        visible, self.stopped = cut_at_stop(self.text, self.stop)
        if not self.stopped:  # a stop string may be on its way: hold back its start
            held = max((size for string in self.stop for size in range(len(string), 0, -1)
                        if visible.endswith(string[:size])), default=0)
            visible = visible[: len(visible) - held]
        return self._deltas(visible)

    def finish(self, whole: str) -> list[dict]:
        """The deltas still owed once the answer is complete (`whole`: the answer's text, its stop string cut)."""
        return self._deltas(whole)

    def _deltas(self, text: str) -> list[dict]:
        reasoning, answer = self.model.split(text)
        deltas = []
        for key, now in (("reasoning_content", reasoning), ("content", answer)):
            if now.startswith(self.sent[key]) and len(now) > len(self.sent[key]):
                deltas.append({key: now[len(self.sent[key]):]})
                self.sent[key] = now
        return deltas


@dataclass(frozen=True)
class Chunks:
    """The chat.completion.chunk objects of one streamed answer."""

    model: str
    id: str
    created: int

    @classmethod
    def of(cls, model: str) -> Chunks:
        return cls(model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()))

    def chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                         "total_tokens": prompt_tokens + completion_tokens}}


def model_list(name: str, alias: str, version: str, created: int) -> dict:
    """GET /v1/models: the served model under its name, with the live version beside it."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "loraflow",
                                        "version": version, "alias": alias}]}
