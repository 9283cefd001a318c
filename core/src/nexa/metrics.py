"""Prometheus metrics for one server instance (``GET /metrics``).

Each app gets its own ``CollectorRegistry`` so several servers in one process (tests)
don't collide. Figures only a backend knows (``Backend.runtime_metrics``) are collected
from every loaded model at scrape time by ``BackendCollector``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

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
        self.pulls = Counter(
            "nexa_pulls", "Pulls through POST /v1/admin/pull, by how they ended (done, cancelled, failed)",
            ["outcome"], registry=r,
        )


_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]*")
_OWN_LABELS = ("model", "backend")


class BackendCollector(Collector):
    """``nexa_backend_<name>{model, backend}`` from each loaded model's ``runtime_metrics``.

    ``loaded`` returns the resident models (``LoadedModel``s) at scrape time. A backend
    whose figures can't be read (it raised, or a name is malformed) is skipped and
    logged: a scrape never fails because of one backend.
    """

    def __init__(self, loaded: Callable[[], Iterable[Any]]) -> None:
        self._loaded = loaded

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for entry in self._loaded():
            if not entry.ready.done() or entry.ready.cancelled() or entry.ready.exception() is not None:
                continue
            backend = entry.backend
            try:
                figures = list(backend.runtime_metrics())
            except Exception:
                log.exception("backend %s could not report its metrics", backend.name)
                continue
            for m in figures:
                if not _METRIC_NAME.fullmatch(m.name) or (m.kind == "counter" and m.name.endswith("_total")):
                    log.warning("backend %s reported a badly named metric %r", backend.name, m.name)
                    continue
                if any(not _METRIC_NAME.fullmatch(k) or k in _OWN_LABELS for k in m.labels):
                    log.warning("backend %s reported metric %r with bad labels %s", backend.name, m.name,
                                sorted(m.labels))
                    continue
                name = "nexa_backend_" + m.name
                family = families.get(name)
                if family is None:
                    cls = CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily
                    family = families[name] = cls(name, m.help or m.name, labels=list(_OWN_LABELS))
                elif family.type != ("counter" if m.kind == "counter" else "gauge"):
                    continue  # two backends disagree on the kind: keep the first
                if m.labels:
                    # One sample's own label set (a replica's): the family's label names are
                    # only the common ones, so it is added as a sample, not by add_metric.
                    labels = {"model": entry.manifest.name, "backend": backend.name}
                    labels.update((k, str(v)) for k, v in m.labels.items())
                    sample = name + "_total" if m.kind == "counter" else name
                    family.add_sample(sample, labels, float(m.value))
                else:
                    family.add_metric([entry.manifest.name, backend.name], float(m.value))
        yield from families.values()

    def describe(self) -> list[Metric]:
        return []  # names depend on what is loaded: collected lazily, never at registration
