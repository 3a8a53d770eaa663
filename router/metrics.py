"""The gateway's own Prometheus metrics, as clients see them.

Each app gets its own `CollectorRegistry`, so tests and several gateways in one
process never share counters. Label children are bound once and cached: a
`.labels()` lookup per event costs more than the observation itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from router.build_info import build_info
from router.cluster import Cluster

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.5, 0.75, 1.0, 2.0, 5.0)

# `mode` of a latency sample: how the request was served.
PD = "pd"  # prefill leg on one worker, decode on another
LOCAL = "local"  # one worker did both (aggregated, or the prefill leg failed)
ERROR = "error"  # answered with an error before any worker served it


class _ClusterCollector(Collector):
    """Exports per-worker in-flight legs, roles, KV usage and restarts from the registry."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def collect(self):  # noqa: ANN201 - prometheus_client's interface
        in_flight = GaugeMetricFamily("fulcrum_worker_in_flight",
                                      "Requests in flight on a worker, by leg",
                                      labels=["worker", "leg"])
        role = GaugeMetricFamily("fulcrum_worker_role",
                                 "1 for the worker's current role and state",
                                 labels=["worker", "role", "state"])
        kv = GaugeMetricFamily("fulcrum_worker_kv_cache_usage_ratio",
                               "Worker KV-cache usage (0-1), as last scraped", labels=["worker"])
        restarts = CounterMetricFamily("fulcrum_worker_restarts",
                                       "Times the manager restarted a worker's process",
                                       labels=["worker"])
        for w in self._cluster.snapshot().workers:
            in_flight.add_metric([w.name, "prefill"], w.in_flight_prefill)
            in_flight.add_metric([w.name, "decode"], w.in_flight_decode)
            role.add_metric([w.name, w.role.value, w.state.value], 1)
            kv.add_metric([w.name], w.kv_cache_usage)
            restarts.add_metric([w.name], self._cluster.record(w.name).restarts)
        yield in_flight
        yield role
        yield kv
        yield restarts


@dataclass(frozen=True)
class LatencyChildren:
    """The TTFT, TPOT and E2E histogram children of one (route, model, mode, worker)."""

    ttft: object
    tpot: object
    e2e: object


@dataclass
class RouteMetrics:
    """One route's request-counter children, by HTTP status, bound on first use."""

    statuses: dict[int, object] = field(default_factory=dict)


class GatewayMetrics:
    """Counters and histograms the dispatcher feeds."""

    def __init__(self, cluster: Cluster) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fulcrum_requests", "Requests by route and HTTP status",
                                ["route", "status"], registry=r)
        latency_labels = ["route", "model", "mode", "worker"]
        self.ttft = Histogram("fulcrum_time_to_first_token_seconds",
                              "Time to first token as the client sees it (streaming), by "
                              "dispatch mode and decode worker",
                              latency_labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("fulcrum_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request",
                              latency_labels, buckets=_TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("fulcrum_e2e_request_latency_seconds",
                             "End-to-end request latency as the client sees it",
                             latency_labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.leg_failures = Counter("fulcrum_pd_leg_failures",
                                    "Failed P/D legs, by leg and what the gateway did",
                                    ["leg", "action"], registry=r)
        self.pd_requests = Counter("fulcrum_dispatch",
                                   "Requests by dispatch mode (pd, local)", ["mode"], registry=r)
        self.migrations = Counter("fulcrum_stream_migrations",
                                  "Live streams moved to another decode worker", registry=r)
        self.kv_migrations = Counter(
            "fulcrum_stream_kv_migrations",
            "Stream moves whose target pulled the source's KV instead of recomputing it",
            registry=r)
        self.prompt_tokens = Counter("fulcrum_prompt_tokens", "Prompt tokens served",
                                     registry=r)
        self.completion_tokens = Counter("fulcrum_completion_tokens",
                                         "Completion tokens served", registry=r)
        info = build_info()
        Gauge("fulcrum_build_info", "Always 1; labels say which build runs",
              list(info), registry=r).labels(**info).set(1)
        r.register(_ClusterCollector(cluster))
        self.pd_mode = self.pd_requests.labels(PD)
        self.local_mode = self.pd_requests.labels(LOCAL)
        self._routes: dict[str, RouteMetrics] = {}
        self._latency: dict[tuple[str, str, str, str], LatencyChildren] = {}

    def latency(self, route: str, model: str, mode: str, worker: str) -> LatencyChildren:
        """Bound histogram children for one (route, model, mode, worker); cached."""
        key = (route, model, mode, worker)
        found = self._latency.get(key)
        if found is None:
            found = self._latency[key] = LatencyChildren(
                self.ttft.labels(*key), self.tpot.labels(*key), self.e2e.labels(*key))
        return found

    def for_route(self, route: str) -> RouteMetrics:
        found = self._routes.get(route)
        if found is None:
            found = self._routes[route] = RouteMetrics()
        return found

    def count_request(self, route: str, status: int) -> None:
        statuses = self.for_route(route).statuses
        child = statuses.get(status)
        if child is None:
            child = statuses[status] = self.requests.labels(route, str(status))
        child.inc()  # type: ignore[attr-defined]

    def render(self) -> bytes:
        return generate_latest(self.registry)
