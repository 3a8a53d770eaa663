"""Cheap `ClusterSnapshot`s for the simulator, rebuilt only where a worker changed.

The simulator hands policies two snapshots per request (pick_prefill at arrival,
pick_decode when the KV is ready). Building them naively (a fresh frozen `WorkerView` per
worker, then `ClusterSnapshot.routable` filtering every worker through a property on each
call) cost more than the rest of the simulation together. `SnapshotCache` keeps one view
per worker and rebuilds only the views of workers marked changed; `SimSnapshot` is a
`ClusterSnapshot` whose `routable(role)` answers from per-role index lists that change
only when a worker's role or state does, memoised per snapshot. Policies see the same
immutable values as before: same type hierarchy, same fields, same `routable` results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView

_new = object.__new__
_set = object.__setattr__  # a frozen dataclass refuses its own __setattr__
_ROLES = (Role.PREFILL, Role.DECODE)


class SimSnapshot(ClusterSnapshot):
    """A `ClusterSnapshot` with precomputed routable pools (values are identical)."""

    def routable(self, role: Role | None = None) -> tuple[WorkerView, ...]:
        pools = self.__dict__.get("_pools")
        if pools is None:  # built some other way (e.g. dataclasses.replace)
            return super().routable(role)
        pool = pools.get(role)
        if pool is None:
            index = self._index  # type: ignore[attr-defined]
            if role not in index:
                return super().routable(role)
            workers = self.workers
            pool = pools[role] = tuple([workers[i] for i in index[role]])
        return pool

    def decode_candidates(self, exclude: frozenset[str] = frozenset()
                          ) -> tuple[WorkerView, ...]:
        if exclude or "_pools" not in self.__dict__:
            return super().decode_candidates(exclude)
        # nothing excluded: the decode pool itself, else every routable worker (equal
        # tuples to the base class's filtered copies)
        return self.routable(Role.DECODE) or self.routable()


def make_view(e: Any) -> WorkerView:
    """A frozen `WorkerView` of a simulated engine, without dataclass __init__ overhead."""
    v = _new(WorkerView)
    _set(v, "__dict__", {
        "name": e.name, "url": e.url, "role": e.role, "state": e.state,
        "in_flight_prefill": e.in_flight_prefill, "in_flight_decode": e.in_flight_decode,
        "prefill_tokens_in_flight": e.prefill_tokens_in_flight,
        "decode_tokens_in_flight": e.decode_tokens_in_flight,
        "kv_cache_usage": e.kv_used / e.kv_cap if e.kv_cap else 1.0,
        "num_running": len(e.running),
        "num_waiting": len(e.prefill_queue) + len(e.slai_waiting) + len(e.decode_wait)})
    return v


def _picker(indices: tuple[int, ...]) -> Callable[[tuple], tuple]:
    """workers -> tuple of the workers at `indices` (a C-level itemgetter when it can)."""
    if len(indices) >= 2:
        return itemgetter(*indices)
    if len(indices) == 1:
        i = indices[0]
        return lambda workers: (workers[i],)
    return lambda workers: ()


class SnapshotCache:
    """Current views of a fixed list of engines; `mark(i)` after engine i changes."""

    def __init__(self, engines: Sequence[Any]) -> None:
        self.engines = list(engines)
        self.views: list[WorkerView | None] = [None] * len(self.engines)
        self.dirty: list[int] = list(range(len(self.engines)))
        self.snapshot: SimSnapshot | None = None
        self.index: dict | None = None  # role (or None) -> routable worker indices
        self.pickers: tuple = ()  # per role in _ROLES: workers -> that role's pool

    def mark(self, idx: int) -> None:
        views = self.views
        if views[idx] is not None:
            views[idx] = None
            self.dirty.append(idx)
        self.snapshot = None

    def mark_role_or_state(self, idx: int) -> None:
        """Engine idx changed role or state: its pool membership may have changed."""
        self.index = None
        self.mark(idx)

    def _build_index(self) -> dict:
        ready = [i for i, e in enumerate(self.engines) if e.state == WorkerState.READY]
        index: dict = {None: tuple(ready)}
        for role in _ROLES:
            index[role] = tuple(i for i in ready if self.engines[i].role == role)
        return index

    def get(self, now: float) -> SimSnapshot:
        snap = self.snapshot
        if snap is not None:
            return snap
        views = self.views
        if self.dirty:
            engines = self.engines
            for i in self.dirty:
                views[i] = make_view(engines[i])
            self.dirty = []
        index = self.index
        if index is None:
            index = self.index = self._build_index()
            self.pickers = tuple(_picker(index[role]) for role in _ROLES)
        workers = tuple(views)
        # the role pools every routing decision asks for, built here in one go
        pick_p, pick_d = self.pickers
        pools = {Role.PREFILL: pick_p(workers), Role.DECODE: pick_d(workers)}
        snap = self.snapshot = _new(SimSnapshot)
        _set(snap, "__dict__", {"workers": workers, "taken_at": now, "_pools": pools,
                                "_index": index})
        return snap
