"""Helpers every control policy shares: pools, loads, the flip candidate, and the note
a policy leaves behind for `fulcrum explain`."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from core.workers import Role, WorkerState, WorkerView
from instance_manager.controller.base import ControlSnapshot, WorkerMetrics


@dataclass(frozen=True)
class PolicyNote:
    """Why a policy did (or did not) act at its last tick, with the numbers behind it."""

    summary: str
    numbers: Mapping[str, float | int | str | None] = field(default_factory=dict)


def other(role: Role) -> Role:
    return Role.DECODE if role == Role.PREFILL else Role.PREFILL


def pool(snapshot: ControlSnapshot, role: Role) -> tuple[WorkerView, ...]:
    """READY workers of one role: the workers that take new work of that kind."""
    return snapshot.cluster.routable(role)


def flip_in_progress(snapshot: ControlSnapshot) -> str | None:
    """Name of a worker that is DRAINING (a flip or a drain is under way), else None."""
    busy = [w.name for w in snapshot.cluster.workers if w.state == WorkerState.DRAINING]
    return busy[0] if busy else None


def hold_reason_while_draining(snapshot: ControlSnapshot) -> str | None:
    """Why a policy must not act now because a worker is draining, else None."""
    busy = flip_in_progress(snapshot)
    return f"{busy} is draining" if busy else None


def held(why: str, facts: str, numbers: dict) -> PolicyNote:
    """The note a policy leaves when it decides not to act."""
    return PolicyNote(f"hold: {why}; {facts}", numbers)


def metrics_of(snapshot: ControlSnapshot, name: str) -> WorkerMetrics:
    return snapshot.metrics.get(name) or WorkerMetrics(name=name)


def role_load_key(snapshot: ControlSnapshot, worker: WorkerView) -> tuple:
    """Sort key for 'least loaded in its current role' (work it would have to finish)."""
    m = metrics_of(snapshot, worker.name)
    if worker.role == Role.PREFILL:
        return (worker.prefill_tokens_in_flight, worker.in_flight_prefill, m.num_waiting,
                m.num_running, worker.name)
    return (worker.in_flight_decode, worker.decode_tokens_in_flight, m.num_running,
            m.kv_cache_usage, worker.name)


def least_loaded(snapshot: ControlSnapshot, source: Role) -> WorkerView | None:
    """The READY worker of `source` with the least work of that role, if the pool can
    spare one (a pool is never emptied)."""
    members = pool(snapshot, source)
    if len(members) < 2:
        return None
    return min(members, key=lambda w: role_load_key(snapshot, w))


def describe_load(worker: WorkerView) -> str:
    if worker.role == Role.PREFILL:
        return (f"{worker.in_flight_prefill} prefill legs / "
                f"{worker.prefill_tokens_in_flight} prompt tokens in flight")
    return f"{worker.in_flight_decode} decode legs in flight"


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


class InFlightTrend:
    """Growth per second of the decodes in flight on every worker, over a few seconds of
    ticks. The total is what the gateway counts live; a relabel flip does not change it,
    so a positive slope means decodes arrive faster than they finish (longer outputs than
    the finished requests show)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._history: deque[tuple[float, int]] = deque()

    def observe(self, snapshot: ControlSnapshot) -> float:
        total = sum(w.in_flight_decode for w in snapshot.cluster.workers)
        hist = self._history
        if hist and snapshot.time <= hist[-1][0]:
            hist.clear()  # a clock that went back: start over
        hist.append((snapshot.time, total))
        while len(hist) > 2 and hist[1][0] <= snapshot.time - self.window_s:
            hist.popleft()
        t0, n0 = hist[0]
        return (total - n0) / (snapshot.time - t0) if snapshot.time > t0 else 0.0


def kv_slots(metrics: WorkerMetrics, limit: float) -> float:
    """Sequences a worker's KV cache holds at its current mix (running / KV usage, where it
    reports enough usage to tell), at most `limit`."""
    if metrics.num_running > 0 and metrics.kv_cache_usage > 0.05:
        return min(limit, metrics.num_running / metrics.kv_cache_usage)
    return limit
