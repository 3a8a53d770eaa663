"""Active health checks and a circuit breaker per worker.

A process can be alive and still useless: stopped (SIGSTOP), wedged, or its port
refusing. The monitor probes every worker's `/health` every `interval_s` with a short
timeout, and the dispatcher reports each leg's transport failure or success. After
`failures` consecutive failures the breaker opens: the worker leaves rotation (its
`healthy` flag, not its life-cycle state, which belongs to the manager and the flip
coordinator), legs waiting on it are abandoned and its streams move to other workers
(`Dispatcher.evacuate_worker`). Probes continue; a successful probe
half-opens the breaker (the worker takes traffic again, but one failure re-opens it),
and `successes` successes in a row close it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from core.workers import WorkerState
from router.cluster import Cluster

log = logging.getLogger("fulcrum.health")

T = TypeVar("T")


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class HealthConfig:
    """Probe cadence and breaker thresholds; `interval_s=0` turns active probes off."""

    interval_s: float = 0.25
    timeout_s: float = 1.0
    failures: int = 2
    successes: int = 2


class WorkerUnhealthy(Exception):
    """A leg was abandoned because its worker's breaker opened."""


@dataclass
class Breaker:
    state: BreakerState = BreakerState.CLOSED
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    opened_at: float | None = None
    trips: int = 0
    tripped: asyncio.Event = field(default_factory=asyncio.Event)
    # legs in flight on this worker: each cancels its own task when the breaker opens
    watchers: set[Callable[[], None]] = field(default_factory=set)


class HealthMonitor:
    """Owns every worker's breaker; flips `Cluster` health flags as they open and close."""

    def __init__(self, cluster: Cluster, config: HealthConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.breakers: dict[str, Breaker] = {}
        self.last_progress: dict[str, float] = {}  # a stream's bytes arrived from it (monotonic)
        # called with (worker, why) when a breaker opens: the dispatcher moves its streams
        self.on_open: list[Callable[[str, str], None]] = []

    def breaker(self, name: str) -> Breaker:
        b = self.breakers.get(name)
        if b is None:
            b = self.breakers[name] = Breaker()
        return b

    # -- outcomes, from probes and from legs ---------------------------------------
    def saw_progress(self, name: str) -> None:
        """Bytes of a stream arrived from `name`: it is alive, however slow its probes."""
        self.last_progress[name] = time.monotonic()

    def _busy_not_hung(self, name: str) -> bool:
        last = self.last_progress.get(name)
        return last is not None and time.monotonic() - last < self.config.timeout_s

    def report_failure(self, name: str, why: str) -> None:
        b = self.breaker(name)
        b.consecutive_successes = 0
        b.consecutive_failures += 1
        if b.state == BreakerState.HALF_OPEN or (
                b.state == BreakerState.CLOSED and
                b.consecutive_failures >= self.config.failures):
            self._open(name, b, why)

    def report_success(self, name: str) -> None:
        b = self.breaker(name)
        b.consecutive_failures = 0
        b.consecutive_successes += 1
        if b.state == BreakerState.OPEN:
            b.state = BreakerState.HALF_OPEN
            b.consecutive_successes = 1
            self.cluster.set_healthy(name, True)
            log.warning("worker %s answers again: breaker half-open", name)
        if b.state == BreakerState.HALF_OPEN and \
                b.consecutive_successes >= self.config.successes:
            b.state = BreakerState.CLOSED
            b.opened_at = None
            log.warning("worker %s healthy again: breaker closed", name)

    def _open(self, name: str, b: Breaker, why: str) -> None:
        b.state = BreakerState.OPEN
        b.opened_at = time.monotonic()
        b.trips += 1
        self.cluster.set_healthy(name, False)
        b.tripped.set()
        b.tripped = asyncio.Event()  # the next trip wakes the next waiters
        for abandon in list(b.watchers):
            abandon()
        log.warning("worker %s out of rotation (breaker open): %s", name, why)
        for callback in list(self.on_open):
            try:
                callback(name, why)
            except Exception:  # one listener's bug must not keep a breaker half-done
                log.exception("breaker listener failed for %s", name)

    # -- legs -----------------------------------------------------------------------
    async def guard(self, name: str, work: Awaitable[T]) -> T:
        """Await `work` unless `name`'s breaker opens first (then `WorkerUnhealthy`).

        No extra task per leg: the breaker cancels the awaiting task itself (this runs
        on every leg of every request)."""
        breaker = self.breaker(name)
        task = asyncio.current_task()
        tripped = False

        def abandon() -> None:
            nonlocal tripped
            if not tripped and task is not None:
                tripped = True
                task.cancel()

        breaker.watchers.add(abandon)
        try:
            result = await work
        except asyncio.CancelledError:
            if not tripped:
                raise
            task.uncancel()
            raise WorkerUnhealthy(f"worker {name} was taken out of rotation") from None
        finally:
            breaker.watchers.discard(abandon)
        if tripped:  # the work ignored the cancellation
            task.uncancel()
            raise WorkerUnhealthy(f"worker {name} was taken out of rotation")
        return result

    # -- probes ---------------------------------------------------------------------
    async def run(self, client: httpx.AsyncClient) -> None:
        """Forever: one probe loop per worker (a stuck worker never delays the others)."""
        loops: dict[str, asyncio.Task] = {}
        try:
            while True:
                for name in self.cluster.names():
                    if name not in loops or loops[name].done():
                        loops[name] = asyncio.create_task(self._probe_forever(name, client))
                for name in [n for n in loops if n not in self.cluster.names()]:
                    loops.pop(name).cancel()
                await asyncio.sleep(max(self.config.interval_s, 0.1))
        finally:
            for task in loops.values():
                task.cancel()

    async def _probe_forever(self, name: str, client: httpx.AsyncClient) -> None:
        """A probe every `interval_s`, not waiting for the last one's answer: a hung worker
        collects its `failures` timeouts `interval_s` apart, so it leaves rotation about
        `timeout_s + (failures - 1) x interval_s` after it stopped, not `failures` x
        (`timeout_s` + `interval_s`)."""
        outstanding: set[asyncio.Task] = set()
        most = math.ceil(self.config.timeout_s / self.config.interval_s) + 1
        try:
            while name in self.cluster.names():
                view = self.cluster.view(name)
                if view.state in (WorkerState.READY, WorkerState.DRAINING):
                    if len(outstanding) < most:
                        task = asyncio.create_task(self.probe(name, view.url, client))
                        outstanding.add(task)
                        task.add_done_callback(outstanding.discard)
                elif view.state == WorkerState.DEAD:
                    self._forget(name)  # a restarted process starts with a clean slate
                await asyncio.sleep(self.config.interval_s)
        finally:
            for task in list(outstanding):
                task.cancel()

    def _forget(self, name: str) -> None:
        b = self.breakers.pop(name, None)
        if b is not None and b.state != BreakerState.CLOSED:
            b.tripped.set()
        self.cluster.set_healthy(name, True)

    async def probe(self, name: str, url: str, client: httpx.AsyncClient) -> bool:
        """One `/health` probe; reports its outcome and returns it."""
        if client.is_closed:  # the gateway is shutting down
            return False
        try:
            resp = await client.get(url + "/health", timeout=self.config.timeout_s)
        except (httpx.HTTPError, OSError) as exc:
            if isinstance(exc, httpx.TimeoutException) and self._busy_not_hung(name):
                return False  # slow to answer a probe, but streaming: loaded, not hung
            self.report_failure(name, f"probe failed: {exc.__class__.__name__}")
            return False
        if resp.status_code != 200:
            self.report_failure(name, f"probe answered {resp.status_code}")
            return False
        self.report_success(name)
        return True

    def summary(self) -> dict[str, dict]:
        return {name: {"breaker": b.state.value, "consecutive_failures": b.consecutive_failures,
                       "trips": b.trips} for name, b in self.breakers.items()}


class HealthCollector:
    """Prometheus view: `fulcrum_worker_breaker_open{worker}`, `fulcrum_breaker_trips_total`."""

    def __init__(self, monitor: HealthMonitor) -> None:
        self._monitor = monitor

    def collect(self):  # noqa: ANN201 - prometheus_client's interface
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        state = GaugeMetricFamily("fulcrum_worker_breaker_open", "1 while a worker's circuit "
                                  "breaker keeps it out of rotation", labels=["worker"])
        trips = CounterMetricFamily("fulcrum_breaker_trips", "Times a worker's breaker "
                                    "opened", labels=["worker"])
        for name, b in list(self._monitor.breakers.items()):
            state.add_metric([name], 1 if b.state == BreakerState.OPEN else 0)
            trips.add_metric([name], b.trips)
        yield state
        yield trips
