"""Role flips as transactions on the gateway's worker table, shared by the controller
(`instance_manager`), manual `fulcrum flip` / `drain` / `undrain` and workers leaving the
gateway (`router`).

A flip runs in one of two modes (`FlipMode`):

* `drain`: check (never empty a pool) -> DRAINING (routing only uses READY workers, so new
  assignments stop) -> wait until the worker's in-flight legs of its old role, and any KV
  pulls other workers still make from it, reach zero -> switch the role (optional
  `on_switch` hook) -> READY. A drain that times out, or a hook that fails, rolls back to
  the old role and READY.
* `relabel`: check -> switch the role (hook) while the worker stays READY. It takes legs
  of its new role at once, and its in-flight legs of the old role finish in place, in the
  same engine batches (a decode worker moved to prefill keeps streaming its decodes while
  it prefills). A drain would instead hold the worker out of both pools for as long as its
  longest decode runs, which on long outputs is longer than the phase it was moved for.
  A hook that fails rolls back.

Every worker keeps `kv_role=kv_both`, so KV another worker still pulls stays readable
across the switch in either mode: nothing restarts.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from core.worker_table import WorkerTable
from core.workers import Role, WorkerState, WorkerView

FLIP_DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class FlipMode(enum.StrEnum):
    DRAIN = "drain"
    RELABEL = "relabel"


class FlipOutcome(enum.StrEnum):
    DONE = "done"
    ROLLED_BACK = "rolled-back"
    ABORTED = "aborted"
    DRY_RUN = "dry-run"


class FlipRefused(Exception):
    """A flip, drain or undrain that must not start; the message says why."""

    def __init__(self, message: str, *, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class FlipRecord:
    """One flip attempt, for `fulcrum explain`, the admin API and gateway metrics."""

    worker: str
    from_role: Role
    to_role: Role
    started_at: float
    duration_s: float
    outcome: FlipOutcome
    detail: str
    reason: str = "manual"

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(from_role=self.from_role.value, to_role=self.to_role.value,
                 outcome=self.outcome.value)
        return d


@dataclass(frozen=True)
class DrainResult:
    worker: str
    state: WorkerState
    in_flight: int
    drained: bool
    detail: str

    def to_dict(self) -> dict:
        return {**asdict(self), "state": self.state.value}


def legs_of(view: WorkerView, role: Role) -> int:
    return view.in_flight_prefill if role == Role.PREFILL else view.in_flight_decode


class FlipCoordinator:
    """Runs flips and drains against one worker table; keeps their history and tallies."""

    def __init__(self, cluster: WorkerTable, *, mode: FlipMode | str = FlipMode.DRAIN,
                 drain_timeout_s: float = 120.0, poll_interval_s: float = 0.1,
                 history_size: int = 200,
                 kv_pulls_pending: Callable[[str], int] | None = None,
                 on_switch: Callable[[str, Role], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.cluster = cluster
        self.mode = FlipMode(mode)
        """How a flip runs unless the call names a mode."""
        self.drain_timeout_s = drain_timeout_s
        self.poll_interval_s = poll_interval_s
        self._kv_pulls_pending = kv_pulls_pending
        self._on_switch = on_switch
        self._clock = clock
        self._wall = wall_clock
        self._history: deque[FlipRecord] = deque(maxlen=history_size)
        self._active: set[str] = set()
        self.counts: dict[tuple[str, str, str], int] = {}
        self.duration_buckets = [0] * (len(FLIP_DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    @property
    def history(self) -> tuple[FlipRecord, ...]:
        return tuple(self._history)

    @property
    def active(self) -> tuple[str, ...]:
        """Workers with a flip under way."""
        return tuple(sorted(self._active))

    def _view(self, name: str) -> WorkerView:
        try:
            return self.cluster.view(name)
        except KeyError:
            raise FlipRefused(f"no worker named {name!r}; known: {self.cluster.names()}",
                              status=404) from None

    def _check_pool_kept(self, view: WorkerView, action: str, force: bool) -> None:
        others = [w for w in self.cluster.snapshot().routable(view.role) if w.name != view.name]
        if not others and not force:
            raise FlipRefused(f"{action} would leave the {view.role.value} pool "
                              f"with no READY worker; pass force to do it anyway")

    def check_flip(self, name: str, to: Role, *, force: bool = False) -> WorkerView:
        """The worker's view if a flip to `to` may start now; else FlipRefused."""
        view = self._view(name)
        if view.role == to:
            raise FlipRefused(f"{name} is already a {to.value} worker")
        if name in self._active:
            raise FlipRefused(f"{name} is already flipping")
        if view.state != WorkerState.READY:
            raise FlipRefused(f"{name} is {view.state.value}; only a READY worker can flip"
                              + (" (undrain it first)" if view.state == WorkerState.DRAINING
                                 else ""))
        self._check_pool_kept(view, f"flipping {name} to {to.value}", force)
        return view

    def _pending(self, name: str, role: Role) -> tuple[int, int]:
        view = self.cluster.view(name)
        pulls = self._kv_pulls_pending(name) if (
            self._kv_pulls_pending and role == Role.PREFILL) else 0
        return legs_of(view, role), pulls

    async def _wait_drained(self, name: str, role: Role, deadline: float) -> str | None:
        """None once drained; otherwise why the wait stopped ('timeout' or a state)."""
        while True:
            view = self.cluster.view(name)
            if view.state != WorkerState.DRAINING:
                return f"state changed to {view.state.value} while draining"
            legs, pulls = self._pending(name, role)
            if legs == 0 and pulls == 0:
                return None
            if self._clock() >= deadline:
                return (f"drain timed out with {legs} {role.value} legs and {pulls} KV "
                        f"pulls still in flight")
            await asyncio.sleep(self.poll_interval_s)

    async def flip(self, name: str, to: Role | str, *, dry_run: bool = False,
                   drain_timeout_s: float | None = None, force: bool = False,
                   reason: str = "manual", mode: FlipMode | str | None = None) -> FlipRecord:
        """Move a worker to the other pool as one transaction (see the module docstring),
        in `mode` (the coordinator's own when None).

        Raises FlipRefused when the flip must not start; otherwise returns the record,
        whose outcome says whether it completed or was rolled back.
        """
        to = Role(to)
        mode = self.mode if mode is None else FlipMode(mode)
        view = self.check_flip(name, to, force=force)
        old = view.role
        started, t0 = self._wall(), self._clock()
        legs = legs_of(view, old)
        if dry_run:
            plan = (f"would switch to {to.value} now, its {legs} {old.value} legs finishing "
                    f"in place" if mode == FlipMode.RELABEL else
                    f"would drain {legs} {old.value} legs, then switch to {to.value}")
            return FlipRecord(name, old, to, started, 0.0, FlipOutcome.DRY_RUN, plan, reason)
        if mode == FlipMode.RELABEL:
            return await self._relabel(name, old, to, legs, started, t0, reason)
        timeout = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._active.add(name)
        self.cluster.set_state(name, WorkerState.DRAINING)
        outcome, detail = FlipOutcome.DONE, f"{old.value} -> {to.value}"
        try:
            stopped = await self._wait_drained(name, old, t0 + timeout)
            if stopped is not None:
                aborted = not stopped.startswith("drain timed out")
                outcome = FlipOutcome.ABORTED if aborted else FlipOutcome.ROLLED_BACK
                detail = stopped
            else:
                self.cluster.set_role(name, to)
                if self._on_switch is not None:
                    await self._on_switch(name, to)
        except asyncio.CancelledError:
            self._roll_back(name, old, keep_state=False)
            self._finish(FlipRecord(name, old, to, started, self._clock() - t0,
                                    FlipOutcome.ROLLED_BACK, "cancelled", reason))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the switch rolls back
            outcome, detail = FlipOutcome.ROLLED_BACK, f"switch failed: {exc!r}"
        if outcome == FlipOutcome.DONE:
            self.cluster.set_state(name, WorkerState.READY)
        else:
            self._roll_back(name, old, keep_state=outcome == FlipOutcome.ABORTED)
        return self._finish(FlipRecord(name, old, to, started, self._clock() - t0, outcome,
                                       detail, reason))

    async def _relabel(self, name: str, old: Role, to: Role, legs: int, started: float,
                       t0: float, reason: str) -> FlipRecord:
        self._active.add(name)
        outcome = FlipOutcome.DONE
        detail = (f"{old.value} -> {to.value} (relabel: {legs} {old.value} legs finish in "
                  f"place)")
        try:
            self.cluster.set_role(name, to)
            if self._on_switch is not None:
                await self._on_switch(name, to)
        except asyncio.CancelledError:
            self.cluster.set_role(name, old)
            self._finish(FlipRecord(name, old, to, started, self._clock() - t0,
                                    FlipOutcome.ROLLED_BACK, "cancelled", reason))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the switch rolls back
            self.cluster.set_role(name, old)
            outcome, detail = FlipOutcome.ROLLED_BACK, f"switch failed: {exc!r}"
        return self._finish(FlipRecord(name, old, to, started, self._clock() - t0, outcome,
                                       detail, reason))

    def _roll_back(self, name: str, old: Role, *, keep_state: bool) -> None:
        self.cluster.set_role(name, old)
        if not keep_state and self.cluster.view(name).state == WorkerState.DRAINING:
            self.cluster.set_state(name, WorkerState.READY)

    def _finish(self, record: FlipRecord) -> FlipRecord:
        self._active.discard(record.worker)
        self._history.append(record)
        key = (record.from_role.value, record.to_role.value, record.outcome.value)
        self.counts[key] = self.counts.get(key, 0) + 1
        index = next((i for i, b in enumerate(FLIP_DURATION_BUCKETS) if record.duration_s <= b),
                     len(FLIP_DURATION_BUCKETS))
        self.duration_buckets[index] += 1
        self.duration_sum += record.duration_s
        return record

    async def drain(self, name: str, *, force: bool = False, wait: bool = False,
                    timeout_s: float | None = None) -> DrainResult:
        """Stop new assignments to a worker; with `wait`, until its in-flight work ends."""
        view = self._view(name)
        if name in self._active:
            raise FlipRefused(f"{name} is flipping; it drains as part of the flip")
        if view.state not in (WorkerState.READY, WorkerState.DRAINING):
            raise FlipRefused(f"{name} is {view.state.value}; only a READY worker can drain")
        if view.state == WorkerState.READY:
            self._check_pool_kept(view, f"draining {name}", force)
            self.cluster.set_state(name, WorkerState.DRAINING)
        if wait:
            timeout = self.drain_timeout_s if timeout_s is None else timeout_s
            deadline = self._clock() + timeout
            while self.cluster.view(name).in_flight > 0 and self._clock() < deadline:
                await asyncio.sleep(self.poll_interval_s)
        now = self.cluster.view(name)
        drained = now.in_flight == 0
        detail = "drained" if drained else f"{now.in_flight} legs still in flight"
        return DrainResult(name, now.state, now.in_flight, drained, detail)

    def undrain(self, name: str) -> DrainResult:
        """Put a drained worker back into routing (READY)."""
        view = self._view(name)
        if name in self._active:
            raise FlipRefused(f"{name} is flipping; it becomes READY when the flip ends")
        if view.state != WorkerState.DRAINING:
            raise FlipRefused(f"{name} is {view.state.value}, not draining")
        self.cluster.set_state(name, WorkerState.READY)
        return DrainResult(name, WorkerState.READY, view.in_flight, False, "back in routing")


class FlipMetrics(Collector):
    """Prometheus view of a coordinator: flip counts by outcome and flip durations.

    Register it on the gateway's registry: `registry.register(FlipMetrics(flips))`.
    Roles over time come from the gateway's `fulcrum_worker_role` gauge.
    """

    def __init__(self, coordinator: FlipCoordinator) -> None:
        self._flips = coordinator

    def collect(self) -> Iterator:
        count = CounterMetricFamily("fulcrum_role_flips", "Role flips by direction and outcome",
                                    labels=["from_role", "to_role", "outcome"])
        for (src, dst, outcome), n in sorted(self._flips.counts.items()):
            count.add_metric([src, dst, outcome], n)
        yield count
        cumulative, buckets = 0, []
        for bound, n in zip((*map(str, FLIP_DURATION_BUCKETS), "+Inf"),
                            self._flips.duration_buckets, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("fulcrum_role_flip_duration_seconds",
                                    "Wall time of a flip, drain included", buckets=buckets,
                                    sum_value=self._flips.duration_sum)
