"""Prometheus metrics of the server (``GET /metrics``), through ``prometheus_client``.

Requests by endpoint and status, prompt and completion tokens, the engine's queue depth and
batch occupancy (read when scraped), time to first token, and each request's decoding speed.
Each server has a registry of its own, so several can live in one process (tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from codefoundry.infer.engine import Engine, Request


class ServerMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("codefoundry_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("codefoundry_request_seconds", "Time to answer a request (to the last byte)",
                                 ["endpoint"], registry=r)
        self.prompt_tokens = Counter("codefoundry_prompt_tokens", "Prompt tokens decoded", registry=r)
        self.completion_tokens = Counter("codefoundry_completion_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("codefoundry_time_to_first_token_seconds", "From submission to the first token",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.speed = Histogram("codefoundry_tokens_per_second", "Decoding speed of each request after its first token",
                               registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000))
        self.finished = Counter("codefoundry_generations", "Engine requests by finish reason", ["reason"], registry=r)
        Gauge("codefoundry_queue_depth", "Requests waiting for a row", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("codefoundry_batch_rows", "Rows being decoded", registry=r).set_function(lambda: engine.active_rows)
        Gauge("codefoundry_batch_occupancy", "Rows being decoded / rows available", registry=r).set_function(
            lambda: engine.active_rows / engine.max_batch)

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe(self, request: Request) -> None:
        """Record a finished engine request."""
        self.finished.labels(request.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(request.prompt_ids))
        self.completion_tokens.inc(len(request.completion_ids))
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted)
            decoding = (request.finished_at or request.first_token_at) - request.first_token_at
            if len(request.completion_ids) > 1 and decoding > 0:
                self.speed.observe((len(request.completion_ids) - 1) / decoding)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
