"""Chat requests to one served version that arrive together, answered by one generate call.

Hand-written: uvicorn and FastAPI serve requests, not model batches, and MLflow's scoring server has none for a
pyfunc. Concurrent generate calls on a CPU only share its cores (`bench/serve.py`), so requests with the same
sampling settings, streamed or not, are answered as one batch of up to `max_batch`; a seeded request is answered
alone, so that its seed gives the same answer whatever else arrives. A batch stops early once every request in it
was given up (clients gone, deadlines passed).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tasks.generation import Answer


@dataclass(frozen=True)
class Sampling:
    """How one request's answer is generated: OpenAI's max_tokens, temperature, top_p, stop and seed."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Pending:
    messages: list[dict]
    sampling: Sampling
    on_done: Callable[[], None] = lambda: None
    sink: Callable[[str], None] | None = None  # a streamed request: its text, piece by piece, as it is generated
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client went away or gave up
    answer: Answer | None = None
    error: Exception | None = None

    def settle(self, answer: Answer | None = None, error: Exception | None = None) -> None:
        self.answer, self.error = answer, error
        self.done.set()
        self.on_done()


class Batcher:
    """One served model's generate calls: queued requests answered in batches by a thread of its own. After `close`
    (the version was switched away from) its last requests are answered one by one. `on_batch` hears each batch's
    size (the server's metrics)."""

    def __init__(self, model, max_batch: int, wait_seconds: float = 0.01,
                 on_batch: Callable[[int], None] = lambda size: None):
        self.model, self.max_batch, self.wait_seconds, self.on_batch = model, max_batch, wait_seconds, on_batch
        self.queue: queue.Queue[Pending | None] = queue.Queue()
        self.lock = threading.Lock()  # one generate call at a time on this model
        self.state = threading.Lock()  # `closed` and the queue change together
        self.closed = False
        threading.Thread(target=self._run, name="loraflow-deploy-batch", daemon=True).start()

    def submit(self, messages: list[dict], sampling: Sampling, on_done: Callable[[], None] = lambda: None,
               sink: Callable[[str], None] | None = None) -> Pending:
        """Queue a request; `on_done` is called (from the batcher's thread) once it is answered or has failed, and
        `sink`, for a streamed request, with each piece of its text as it is generated."""
        pending = Pending(messages, sampling, on_done, sink)
        with self.state:
            queued = not self.closed
            if queued:
                self.queue.put(pending)
        if not queued:  # its version was switched away from: answered alone, never in the caller's thread
            threading.Thread(target=self._answer, args=([pending],), name="loraflow-deploy-late", daemon=True).start()
        return pending

    def answer(self, messages: list[dict], sampling: Sampling) -> Answer:
        """A request answered, waiting for it here (a thread's call)."""
        pending = self.submit(messages, sampling)
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
            groups: dict[object, list[Pending]] = {}
            for pending in batch:
                if pending.cancelled.is_set():
                    pending.settle(error=TimeoutError("cancelled before it was answered"))
                    continue
                key = pending.sampling if pending.sampling.seed is None else id(pending)  # seeded: alone
                groups.setdefault(key, []).append(pending)
            for group in groups.values():
                self._answer(group)

    def _answer(self, group: list[Pending]) -> None:
        sampling = group[0].sampling
        try:
            with self.lock:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                self.on_batch(len(group))
                answers = self.model.answer([pending.messages for pending in group], sampling,
                                            [pending.sink for pending in group],
                                            give_up=lambda: all(pending.cancelled.is_set() for pending in group))
        except Exception as error:  # handed to each waiting request, which answers with a 500
            for pending in group:
                pending.settle(error=error)
            return
        for pending, answer in zip(group, answers):
            pending.settle(answer)
