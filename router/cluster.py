"""The gateway's registry of its workers: roles, health and in-flight work.

`Cluster` is the one mutable registry; policies only ever see `core.workers.ClusterSnapshot`,
an immutable value, so the same policy object can run in the live router and in
the simulator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView


@dataclass
class _WorkerRecord:
    view: WorkerView
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None


class Cluster:
    """Mutable registry of workers, owned by the gateway app (never a global)."""

    def __init__(self) -> None:
        self._records: dict[str, _WorkerRecord] = {}

    def add(self, name: str, url: str, role: Role,
            state: WorkerState = WorkerState.STARTING) -> None:
        self._records[name] = _WorkerRecord(WorkerView(name=name, url=url, role=role, state=state))

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def names(self) -> list[str]:
        return list(self._records)

    def view(self, name: str) -> WorkerView:
        return self._records[name].view

    def record(self, name: str) -> _WorkerRecord:
        return self._records[name]

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(tuple(r.view for r in self._records.values()))

    def _update(self, name: str, **changes: object) -> None:
        rec = self._records.get(name)
        if rec is not None:
            rec.view = replace(rec.view, **changes)

    def set_state(self, name: str, state: WorkerState) -> None:
        self._update(name, state=state)

    def set_healthy(self, name: str, healthy: bool) -> None:
        rec = self._records.get(name)
        if rec is not None and rec.view.healthy != healthy:
            rec.view = replace(rec.view, healthy=healthy)

    def set_role(self, name: str, role: Role) -> None:
        self._update(name, role=role)

    def set_process(self, name: str, pid: int | None) -> None:
        rec = self._records.get(name)
        if rec is not None:
            if rec.pid is not None and pid is not None and pid != rec.pid:
                rec.restarts += 1
            rec.pid = pid
            rec.started_at = time.time() if pid is not None else rec.started_at

    def set_engine_stats(self, name: str, *, kv_cache_usage: float, num_running: int,
                         num_waiting: int) -> None:
        self._update(name, kv_cache_usage=kv_cache_usage, num_running=num_running,
                     num_waiting=num_waiting)

    def begin(self, name: str, leg: Role, tokens: int) -> None:
        """Count one leg of a request as in flight on a worker."""
        v = self._records[name].view
        if leg == Role.PREFILL:
            self._update(name, in_flight_prefill=v.in_flight_prefill + 1,
                         prefill_tokens_in_flight=v.prefill_tokens_in_flight + tokens)
        else:
            self._update(name, in_flight_decode=v.in_flight_decode + 1,
                         decode_tokens_in_flight=v.decode_tokens_in_flight + tokens)

    def end(self, name: str, leg: Role, tokens: int) -> None:
        """Undo `begin` for a finished, failed or abandoned leg."""
        rec = self._records.get(name)
        if rec is None:
            return
        v = rec.view
        if leg == Role.PREFILL:
            self._update(name, in_flight_prefill=max(0, v.in_flight_prefill - 1),
                         prefill_tokens_in_flight=max(0, v.prefill_tokens_in_flight - tokens))
        else:
            self._update(name, in_flight_decode=max(0, v.in_flight_decode - 1),
                         decode_tokens_in_flight=max(0, v.decode_tokens_in_flight - tokens))
