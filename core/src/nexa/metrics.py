"""Prometheus metrics for one server instance (``GET /metrics``).

Each app gets its own ``CollectorRegistry`` so several servers in one process (tests)
don't collide. Backends may add their own collectors to ``Metrics.registry``.
"""

from __future__ import annotations

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


@attrs.define(eq=False, slots=False)
class Metrics:
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "nexa_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.queue_depth = Gauge(
            "nexa_queue_depth", "Requests waiting for a model slot", ["model"], registry=r
        )
        self.active = Gauge("nexa_active_requests", "Requests running on a model", ["model"], registry=r)
        self.prompt_tokens = Counter(
            "nexa_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "nexa_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.tokens_per_second = Histogram(
            "nexa_generation_tokens_per_second",
            "Decode speed of each chat request",
            ["model"],
            buckets=(1, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=r,
        )
        self.ttft = Histogram(
            "nexa_time_to_first_token_seconds", "Time to first token", ["model"],
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.latency = Histogram(
            "nexa_request_latency_seconds", "Request latency", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.loads = Counter("nexa_model_loads", "Model loads", ["model", "backend"], registry=r)
        self.load_failures = Counter(
            "nexa_model_load_failures", "Model loads that failed", ["model"], registry=r
        )
        self.evictions = Counter(
            "nexa_model_evictions", "Models unloaded", ["model", "reason"], registry=r
        )
        self.resident = Gauge("nexa_models_resident", "Models loaded now", registry=r)
