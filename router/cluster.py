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
        # Other gateway processes' legs per worker: (prefill, decode, prefill tokens,
        # decode tokens); see router/peers.py. Views include them.
        self._peer_load: dict[str, tuple[int, int, int, int]] = {}

    def add(self, name: str, url: str, role: Role,
            state: WorkerState = WorkerState.STARTING) -> None:
        self._records[name] = _WorkerRecord(WorkerView(name=name, url=url, role=role, state=state))

    def remove(self, name: str) -> None:
        self._records.pop(name, None)

    def names(self) -> list[str]:
        return list(self._records)

    def view(self, name: str) -> WorkerView:
        return self._with_peers(self._records[name].view)

    def record(self, name: str) -> _WorkerRecord:
        return self._records[name]

    def snapshot(self) -> ClusterSnapshot:
        if self._peer_load:
            return ClusterSnapshot(tuple(self._with_peers(r.view)
                                         for r in self._records.values()))
        return ClusterSnapshot(tuple(r.view for r in self._records.values()))

    def _with_peers(self, view: WorkerView) -> WorkerView:
        peer = self._peer_load.get(view.name)
        if not peer:
            return view
        out = object.__new__(WorkerView)
        out.__dict__.update(view.__dict__,
                            in_flight_prefill=view.in_flight_prefill + peer[0],
                            in_flight_decode=view.in_flight_decode + peer[1],
                            prefill_tokens_in_flight=view.prefill_tokens_in_flight + peer[2],
                            decode_tokens_in_flight=view.decode_tokens_in_flight + peer[3])
        return out

    def set_peer_load(self, load: dict[str, tuple[int, int, int, int]]) -> None:
        """Other gateway processes' in-flight legs and tokens, per worker."""
        self._peer_load = {k: v for k, v in load.items() if any(v)}

    def own_load(self) -> dict[str, tuple[int, int, int, int]]:
        """This process's own in-flight legs and tokens, per worker."""
        return {name: (v.in_flight_prefill, v.in_flight_decode, v.prefill_tokens_in_flight,
                       v.decode_tokens_in_flight)
                for name, v in ((n, r.view) for n, r in self._records.items())}

    def _update(self, name: str, **changes: object) -> None:
        rec = self._records.get(name)
        if rec is not None:
            # `dataclasses.replace` without its per-call field introspection: this runs
            # twice per request leg. WorkerView has no __post_init__ to skip.
            view = object.__new__(WorkerView)
            view.__dict__.update(rec.view.__dict__, **changes)
            rec.view = view

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
