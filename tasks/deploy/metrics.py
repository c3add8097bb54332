"""What an operator watches on a dashboard, in Prometheus' format (`GET /metrics`, prometheus_client): requests by
endpoint and status, latency and time to first token, tokens generated, batch sizes, requests waiting and running,
the live version, switches and refused versions. Each server has its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class ServerMetrics:
    def __init__(self, name: str, alias: str):
        self.name, self.alias = name, alias
        self.registry = CollectorRegistry()
        self.requests = Counter("loraflow_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("loraflow_request_seconds", "time from a request's arrival to its last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("loraflow_time_to_first_token_seconds", "streamed requests: arrival to the "
                                     "first generated text", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("loraflow_generated_tokens", "tokens generated for answers", registry=self.registry)
        self.batch = Histogram("loraflow_batch_size", "requests answered by one generate call",
                               buckets=BATCH_BUCKETS, registry=self.registry)
        self.waiting = Gauge("loraflow_requests_waiting", "requests queued for a free slot", registry=self.registry)
        self.running = Gauge("loraflow_requests_running", "requests being answered", registry=self.registry)
        self.live = Gauge("loraflow_live_version", "1 for the version being served", ["model", "alias", "version"],
                          registry=self.registry)
        self.switches = Counter("loraflow_version_switches", "switches to a new version of the alias",
                                registry=self.registry)
        self.refusals = Counter("loraflow_versions_refused", "versions not switched to, by reason (load, parity)",
                                ["reason"], registry=self.registry)

    def switched(self, previous: str | None, version: str) -> None:
        if previous is not None:
            self.live.remove(self.name, self.alias, previous)
            self.switches.inc()
        self.live.labels(self.name, self.alias, version).set(1)

    def refused(self, version: str, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
