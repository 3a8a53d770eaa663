"""The simulator's cached snapshots: same values as plain ClusterSnapshots, rebuilt on change."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.sim.engine import Engine, EngineConfig
from benchmarks.sim.perf import roofline
from benchmarks.sim.snapshots import SimSnapshot, SnapshotCache, make_view
from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView


def _engines(roles: list[Role]) -> list[Engine]:
    perf = roofline("llama-3.1-8b", "h100")
    return [Engine(i, f"w{i}", r, perf, EngineConfig()) for i, r in enumerate(roles)]


def _plain(engines: list[Engine], now: float) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(make_view(e) for e in engines), now)


def test_views_match_the_dataclass_constructor():
    e = _engines([Role.PREFILL])[0]
    e.in_flight_prefill, e.prefill_tokens_in_flight, e.kv_used = 2, 300, e.kv_cap // 4
    v = make_view(e)
    ref = WorkerView(name="w0", url="sim://w0", role=Role.PREFILL, state=WorkerState.READY,
                     in_flight_prefill=2, prefill_tokens_in_flight=300,
                     kv_cache_usage=(e.kv_cap // 4) / e.kv_cap)
    assert v == ref and hash(v) == hash(ref)
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.num_running = 3  # type: ignore[misc]


def test_routable_pools_equal_the_plain_snapshot_and_follow_flips():
    engines = _engines([Role.PREFILL, Role.DECODE, Role.DECODE, Role.PREFILL])
    cache = SnapshotCache(engines)
    snap = cache.get(1.0)
    assert isinstance(snap, ClusterSnapshot) and isinstance(snap, SimSnapshot)
    plain = _plain(engines, 1.0)
    assert (snap.workers, snap.taken_at) == (plain.workers, plain.taken_at)
    for role in (None, Role.PREFILL, Role.DECODE, "decode"):
        assert snap.routable(role) == plain.routable(role)
    assert cache.get(2.0) is snap  # nothing changed: the same object
    engines[1].state = WorkerState.STARTING
    engines[3].role = Role.DECODE
    cache.mark_role_or_state(1)
    cache.mark_role_or_state(3)
    snap2 = cache.get(3.0)
    assert [w.name for w in snap2.routable(Role.DECODE)] == ["w2", "w3"]
    assert [w.name for w in snap2.routable(Role.PREFILL)] == ["w0"]
    assert snap2.taken_at == 3.0
    assert [w.name for w in snap.routable(Role.DECODE)] == ["w1", "w2"]  # old one unchanged


def test_only_marked_views_are_rebuilt():
    engines = _engines([Role.PREFILL, Role.DECODE])
    cache = SnapshotCache(engines)
    first = cache.get(0.0)
    engines[1].in_flight_decode = 5
    cache.mark(1)
    cache.mark(1)  # marking twice rebuilds once
    second = cache.get(0.5)
    assert second.workers[0] is first.workers[0]
    assert second.workers[1].in_flight_decode == 5
    engines[0].in_flight_prefill = 7  # not marked: the cached view stays (caller's contract)
    assert cache.get(0.6).workers[0].in_flight_prefill == 0


def test_replace_falls_back_to_the_plain_routable():
    engines = _engines([Role.PREFILL, Role.DECODE])
    snap = SnapshotCache(engines).get(0.0)
    copy = dataclasses.replace(snap, taken_at=9.0)
    assert copy.routable(Role.DECODE) == snap.routable(Role.DECODE)
