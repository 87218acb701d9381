"""Prometheus metrics of one server, in its own CollectorRegistry.

End-to-end figures are recorded by the HTTP layer as requests finish; per-stage figures
are read from each deployment's `app.stats()` at scrape time by `StageCollector`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from serveflow.runtime.app import App
from serveflow.runtime.stats import percentile

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # and +Inf
UNKNOWN_FLOW = "(unknown)"  # the label of requests for flows that do not exist
ROUTES = frozenset({"/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/flows"})
OTHER_ROUTE = "(other)"  # the route label of paths no route serves
PREDICT_ROUTE = "/v1/flows/{name}/predict"


def batch_size_buckets(
    counts: Mapping[Any, int], bounds: tuple[int, ...] = BATCH_SIZE_BUCKETS
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (le, count) and the sum of sizes, from counts of
    batches by size (`{size: batches}`; sizes may arrive as strings, e.g. via JSON)."""
    sizes = sorted((int(size), int(n)) for size, n in counts.items())
    buckets: list[tuple[str, float]] = []
    below = 0
    index = 0
    for bound in bounds:
        while index < len(sizes) and sizes[index][0] <= bound:
            below += sizes[index][1]
            index += 1
        buckets.append((str(bound), float(below)))
    buckets.append(("+Inf", float(sum(n for _, n in sizes))))
    return buckets, float(sum(size * n for size, n in sizes))


class StageCollector(Collector):
    """Per-stage gauges and counters from `app.stats()` of every deployed flow."""

    def __init__(self, apps: Mapping[str, App]) -> None:
        self._apps = apps

    def collect(self) -> Iterator[Metric]:
        labels = ["flow", "stage"]
        requests = CounterMetricFamily(
            "serveflow_stage_requests", "Requests a stage has finished.", labels=labels
        )
        latency = Metric(
            "serveflow_stage_latency_seconds",
            "Stage latency (queue + run): quantiles 0.5 and 0.99 over the last 10 s, "
            "count and sum since the start.",
            "summary",
        )
        queue = GaugeMetricFamily(
            "serveflow_stage_queue_length", "Requests waiting for the stage.", labels=labels
        )
        workers = GaugeMetricFamily(
            "serveflow_stage_workers", "Workers serving the stage.", labels=labels
        )
        cold = CounterMetricFamily(
            "serveflow_stage_cold_starts", "Times a worker loaded the stage.", labels=labels
        )
        batch_mean = GaugeMetricFamily(
            "serveflow_stage_batch_size_mean", "Mean requests per stage call.", labels=labels
        )
        batch_limit = GaugeMetricFamily(
            "serveflow_stage_batch_size_limit",
            "Current most requests per call of a batching stage.",
            labels=labels,
        )
        batch_timeout = GaugeMetricFamily(
            "serveflow_stage_batch_timeout_seconds",
            "Current wait for a batching stage's batch to fill.",
            labels=labels,
        )
        batch_sizes = HistogramMetricFamily(
            "serveflow_stage_batch_size",
            "Requests per call of a batching stage (batches counted by size).",
            labels=labels,
        )
        for flow, app in self._apps.items():
            for stage, s in app.stats().items():
                key = [flow, stage]
                requests.add_metric(key, s.get("requests", 0))
                _add_summary(latency, dict(zip(labels, key, strict=True)), s)
                queue.add_metric(key, s.get("queue", 0))
                workers.add_metric(key, s.get("workers", 0))
                cold.add_metric(key, s.get("cold_starts", 0))
                batch_mean.add_metric(key, s.get("batch_mean", 0.0))
                if "batch_size" in s:
                    batch_limit.add_metric(key, s["batch_size"])
                    batch_timeout.add_metric(key, s.get("timeout_ms", 0.0) / 1e3)
                if s.get("batch_sizes") is not None:  # batching stages, newer runtimes
                    buckets, total = batch_size_buckets(s["batch_sizes"])
                    batch_sizes.add_metric(key, buckets, total)
        yield from (requests, latency, queue, workers, cold, batch_mean, batch_limit)
        yield from (batch_timeout, batch_sizes)


def _add_summary(family: Metric, labels: dict[str, str], stats: Mapping[str, Any]) -> None:
    name = family.name
    for quantile, field in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
        family.add_sample(name, {**labels, "quantile": quantile}, stats.get(field, 0.0) / 1e3)
    family.add_sample(f"{name}_count", labels, float(stats.get("latency_count", 0)))
    family.add_sample(f"{name}_sum", labels, float(stats.get("latency_sum_s", 0.0)))


def route_of(path: str) -> str:
    """The route template a path falls under, for a label of bounded cardinality."""
    if path in ROUTES:
        return path
    if (path + "/").startswith("/v2/"):
        return "/v2"  # the Open Inference Protocol (serving.v2)
    if path.startswith("/v1/flows/"):
        parts = path[len("/v1/flows/") :].split("/")
        if len(parts) == 1:
            return "/v1/flows/{name}"
        if len(parts) == 2 and parts[1] in ("stats", "predict"):
            return "/v1/flows/{name}/" + parts[1]
    return OTHER_ROUTE


class LatencyWindow:
    """The last `size` end-to-end latencies and finish times of one flow, for the
    dashboard's percentiles and throughput (Prometheus keeps the histogram)."""

    def __init__(self, size: int = 2048) -> None:
        self._lock = threading.Lock()
        self._entries: deque[tuple[float, float]] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        with self._lock:
            self._entries.append((time.monotonic(), seconds))

    def summary(self, horizon_s: float = 5.0) -> dict[str, float]:
        """p50/p99 (ms) over the window; req/s over the last `horizon_s` seconds."""
        now = time.monotonic()
        with self._lock:
            entries = list(self._entries)
        latencies = sorted(seconds for _, seconds in entries)
        recent = sum(1 for finished, _ in entries if now - finished <= horizon_s)
        return {
            "p50_ms": percentile(latencies, 0.50) * 1e3,
            "p99_ms": percentile(latencies, 0.99) * 1e3,
            "throughput_rps": recent / horizon_s,
        }


class FlowMetrics:
    """The per-request metrics of one flow label, its labelled children cached."""

    def __init__(self, metrics: ServingMetrics, flow: str) -> None:
        self._metrics = metrics
        self.flow = flow
        self.in_flight = metrics.in_flight.labels(flow)
        self.shed = metrics.shed.labels(flow)
        self._by_status: dict[int, Any] = {}
        self.refusals = 0  # 503s of the in-flight bound not yet in the counters (`refused`)
        known = flow in metrics.windows
        self._duration = metrics.duration.labels(flow) if known else None
        self._window = metrics.windows.get(flow)

    def count(self, status: int, amount: int = 1) -> None:
        """Count `amount` answers with `status` (no latency: e.g. a 401 of the token
        check)."""
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self._metrics.requests.labels(
                self.flow, str(status)
            )
        counter.inc(amount)

    def refused(self) -> None:
        """Count a 503 of the flow's in-flight bound (shed, by status, by route) as a
        plain int, added to the counters when they are read (`ServingMetrics.flush`):
        a flood is mostly these, and three Prometheus increments, each with its lock,
        took 6 of the 44 us the event loop spent on one."""
        self.refusals += 1

    def flush(self) -> None:
        """Add the refusals counted since the last flush to the counters."""
        refusals, self.refusals = self.refusals, 0
        if refusals:
            self.shed.inc(refusals)
            self.count(503, refusals)
            self._metrics.count_response(PREDICT_ROUTE, 503, refusals)

    def observe(self, status: int, seconds: float) -> None:
        self.count(status)
        if self._duration is not None:
            self._duration.observe(seconds)
            if status < 400 and self._window is not None:
                self._window.add(seconds)


class ServingMetrics:
    """Everything one server exports on /metrics."""

    def __init__(self, apps: Mapping[str, App]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "serveflow_requests",
            "Prediction requests by flow and HTTP status.",
            ["flow", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "serveflow_request_duration_seconds",
            "End-to-end prediction latency seen by the HTTP server (body read to response).",
            ["flow"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shed = Counter(
            "serveflow_shed_requests",
            "Requests refused because the deployment was overloaded.",
            ["flow"],
            registry=self.registry,
        )
        self.responses = Counter(
            "serveflow_http_responses",
            "Every HTTP response, by route template and status (predictions included).",
            ["route", "status"],
            registry=self.registry,
        )
        self._responses: dict[tuple[str, int], Any] = {}
        self.in_flight = Gauge(
            "serveflow_requests_in_flight",
            "Prediction requests the HTTP server is handling.",
            ["flow"],
            registry=self.registry,
        )
        self.registry.register(StageCollector(apps))
        self.windows = {name: LatencyWindow() for name in apps}
        # Labelled children looked up once, not per request (labels() costs a lock and
        # a dict lookup on tuples); every flow shows up at 0 before its first request.
        self._flows: dict[str, FlowMetrics] = {}
        for name in apps:
            self.flow(name)

    def flow(self, name: str) -> FlowMetrics:
        """The metrics of one flow label (a deployed flow, or UNKNOWN_FLOW)."""
        metrics = self._flows.get(name)
        if metrics is None:
            metrics = self._flows[name] = FlowMetrics(self, name)
        return metrics

    def observe(self, flow: str, status: int, seconds: float) -> None:
        self.flow(flow).observe(status, seconds)

    def count_response(self, route: str, status: int, amount: int = 1) -> None:
        """Count `amount` HTTP responses (`route` from `route_of`)."""
        counter = self._responses.get((route, status))
        if counter is None:
            counter = self._responses[route, status] = self.responses.labels(route, str(status))
        counter.inc(amount)

    def flush(self) -> None:
        """Bring the counters up to date (before they are read: on the event loop, as
        the counting is)."""
        for metrics in self._flows.values():
            metrics.flush()

    def http_summary(self, flow: str) -> dict[str, Any]:
        """Counts by status and the recent latency summary of one flow."""
        self.flush()
        by_status: dict[str, float] = {}
        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels["flow"] == flow:
                    by_status[sample.labels["status"]] = sample.value
        return {"by_status": by_status, **self.windows[flow].summary()}

    def render(self) -> bytes:
        self.flush()
        return generate_latest(self.registry)
