"""Admission control: refuse at once what the gateway or a worker cannot take now.

Two bounds: requests in flight through the whole gateway (`--max-inflight`), and
legs this gateway has in flight on any one worker (`--max-worker-queue`). Beyond
them a request gets 429 with `Retry-After` immediately, instead of queueing until
every client times out.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace

from core.workers import ClusterSnapshot, WorkerView
from router.errors import GatewayError


@dataclass(frozen=True)
class AdmissionConfig:
    """0 turns a bound off."""

    max_inflight: int = 1024
    max_worker_queue: int = 256
    retry_after_s: int = 1


def overloaded(why: str, config: AdmissionConfig, code: str) -> GatewayError:
    return GatewayError(429, f"the gateway is at capacity ({why}); retry after "
                        f"{config.retry_after_s}s", code=code,
                        headers={"Retry-After": str(config.retry_after_s)})


class Admission:
    """Counts requests in flight; the one place that says "no, not now"."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.in_flight = 0
        self.rejected: dict[str, int] = {}

    def try_enter(self) -> bool:
        """Take a gateway-wide slot; False (counted) when the gateway is full."""
        limit = self.config.max_inflight
        if limit and self.in_flight >= limit:
            self._reject("gateway_full")
            return False
        self.in_flight += 1
        return True

    def enter(self) -> None:
        """Take a gateway-wide slot, or raise 429."""
        if not self.try_enter():
            raise self.gateway_full()

    def gateway_full(self) -> GatewayError:
        return overloaded(f"{self.config.max_inflight} requests in flight, --max-inflight",
                          self.config, "gateway_overloaded")

    @functools.cached_property
    def gateway_full_body(self) -> bytes:
        """The 429 body, encoded once: a refusal should cost next to nothing."""
        return json.dumps(self.gateway_full().body()).encode()

    def leave(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)

    def has_room(self, view: WorkerView) -> bool:
        limit = self.config.max_worker_queue
        return not limit or view.in_flight < limit

    def with_room(self, snap: ClusterSnapshot) -> ClusterSnapshot:
        """`snap` without the workers at their queue bound: no new legs for them."""
        if not self.config.max_worker_queue or all(self.has_room(w) for w in snap.workers):
            return snap
        return replace(snap, workers=tuple(w for w in snap.workers if self.has_room(w)))

    def no_decode_room(self) -> GatewayError:
        self._reject("workers_full")
        return overloaded(f"every worker has {self.config.max_worker_queue} requests queued, "
                          "--max-worker-queue", self.config, "workers_overloaded")

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


class AdmissionCollector:
    """Prometheus view: `fulcrum_rejected_total{reason}`, `fulcrum_gateway_in_flight`."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission

    def collect(self):  # noqa: ANN201 - prometheus_client's interface
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        rejected = CounterMetricFamily("fulcrum_rejected", "Requests refused by admission "
                                       "control (429), by reason", labels=["reason"])
        for reason in ("gateway_full", "workers_full"):
            rejected.add_metric([reason], self._admission.rejected.get(reason, 0))
        yield rejected
        yield GaugeMetricFamily("fulcrum_gateway_in_flight", "Client requests in flight "
                                "through the gateway", value=self._admission.in_flight)
