"""Flips as transactions on a real `Cluster` whose in-flight counters the test drives."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from core.flips import FlipCoordinator, FlipMetrics, FlipMode, FlipOutcome, FlipRefused
from core.workers import Role, WorkerState
from router.cluster import Cluster


def make_cluster(prefill: int = 2, decode: int = 2) -> Cluster:
    cluster = Cluster()
    for i in range(prefill):
        cluster.add(f"p{i}", f"http://p{i}", Role.PREFILL, WorkerState.READY)
    for i in range(decode):
        cluster.add(f"d{i}", f"http://d{i}", Role.DECODE, WorkerState.READY)
    return cluster


async def wait_for(predicate, timeout_s: float = 2.0) -> None:
    async def spin() -> None:
        while not predicate():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(spin(), timeout_s)


async def test_flip_drains_then_switches_and_marks_ready():
    cluster = make_cluster()
    cluster.begin("p0", Role.PREFILL, 100)
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    task = asyncio.create_task(flips.flip("p0", Role.DECODE, drain_timeout_s=10))
    await wait_for(lambda: cluster.view("p0").state == WorkerState.DRAINING)
    # new assignments stop: routing sees only p1 in the prefill pool
    assert [w.name for w in cluster.snapshot().routable(Role.PREFILL)] == ["p1"]
    assert cluster.view("p0").role == Role.PREFILL  # not switched while work is in flight
    assert flips.active == ("p0",)
    await asyncio.sleep(0.02)
    assert not task.done()
    cluster.end("p0", Role.PREFILL, 100)
    record = await task
    assert record.outcome == FlipOutcome.DONE
    view = cluster.view("p0")
    assert (view.role, view.state) == (Role.DECODE, WorkerState.READY)
    assert flips.history == (record,) and flips.active == ()


async def test_decode_legs_of_a_prefill_worker_do_not_block_its_flip():
    cluster = make_cluster()
    cluster.begin("p0", Role.DECODE, 10)  # a local decode: keeps running after the flip
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    record = await flips.flip("p0", "decode", drain_timeout_s=5)
    assert record.outcome == FlipOutcome.DONE
    assert cluster.view("p0").in_flight_decode == 1


async def test_relabel_switches_at_once_and_old_legs_finish_in_place():
    cluster = make_cluster()
    cluster.begin("d0", Role.DECODE, 500)  # a long stream on the decode worker
    flips = FlipCoordinator(cluster, mode=FlipMode.RELABEL, poll_interval_s=0.005)
    plan = await flips.flip("d0", Role.PREFILL, dry_run=True)
    assert plan.outcome == FlipOutcome.DRY_RUN and "finishing in place" in plan.detail
    assert cluster.view("d0").role == Role.DECODE
    record = await flips.flip("d0", Role.PREFILL)  # the leg is still in flight
    assert record.outcome == FlipOutcome.DONE
    assert "1 decode legs finish in place" in record.detail
    view = cluster.view("d0")
    assert (view.role, view.state, view.in_flight_decode) == (Role.PREFILL, WorkerState.READY, 1)
    # routable as a prefill worker at once, beside its running decode
    assert "d0" in [w.name for w in cluster.snapshot().routable(Role.PREFILL)]
    cluster.end("d0", Role.DECODE, 500)
    assert cluster.view("d0").in_flight == 0 and flips.active == ()
    # a call may still name the other mode: this one waits for the prefill leg
    cluster.begin("d0", Role.PREFILL, 10)
    task = asyncio.create_task(flips.flip("d0", Role.DECODE, mode="drain", drain_timeout_s=5))
    await wait_for(lambda: cluster.view("d0").state == WorkerState.DRAINING)
    cluster.end("d0", Role.PREFILL, 10)
    assert (await task).outcome == FlipOutcome.DONE and cluster.view("d0").role == Role.DECODE


async def test_relabel_keeps_the_pool_guard_and_rolls_back_a_failed_hook():
    async def broken(name: str, role: Role) -> None:
        raise RuntimeError("warm-up request failed")

    cluster = make_cluster(prefill=1)
    flips = FlipCoordinator(cluster, mode=FlipMode.RELABEL, on_switch=broken)
    with pytest.raises(FlipRefused, match="no READY worker"):
        await flips.flip("p0", Role.DECODE)
    record = await flips.flip("d0", Role.PREFILL)
    assert record.outcome == FlipOutcome.ROLLED_BACK and "warm-up" in record.detail
    view = cluster.view("d0")
    assert (view.role, view.state) == (Role.DECODE, WorkerState.READY)
    assert flips.active == ()


async def test_flip_that_times_out_rolls_back():
    cluster = make_cluster()
    cluster.begin("d1", Role.DECODE, 50)  # a decode that never finishes
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    record = await flips.flip("d1", Role.PREFILL, drain_timeout_s=0.05)
    assert record.outcome == FlipOutcome.ROLLED_BACK
    assert "timed out with 1 decode legs" in record.detail
    view = cluster.view("d1")
    assert (view.role, view.state) == (Role.DECODE, WorkerState.READY)
    assert flips.counts == {("decode", "prefill", "rolled-back"): 1}


async def test_dry_run_changes_nothing():
    cluster = make_cluster()
    cluster.begin("p1", Role.PREFILL, 7)
    before = cluster.snapshot().workers
    flips = FlipCoordinator(cluster)
    record = await flips.flip("p1", Role.DECODE, dry_run=True)
    assert record.outcome == FlipOutcome.DRY_RUN
    assert "would drain 1 prefill legs" in record.detail
    assert cluster.snapshot().workers == before
    assert flips.history == () and flips.counts == {}


async def test_dry_run_still_refuses_what_the_real_flip_would():
    cluster = make_cluster(prefill=1)
    with pytest.raises(FlipRefused, match="no READY worker"):
        await FlipCoordinator(cluster).flip("p0", Role.DECODE, dry_run=True)


async def test_a_pool_is_never_emptied_unless_forced():
    cluster = make_cluster(prefill=1, decode=2)
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    with pytest.raises(FlipRefused, match="prefill pool with no READY worker"):
        await flips.flip("p0", Role.DECODE)
    assert cluster.view("p0").role == Role.PREFILL
    record = await flips.flip("p0", Role.DECODE, force=True)
    assert record.outcome == FlipOutcome.DONE
    assert cluster.snapshot().routable(Role.PREFILL) == ()


async def test_two_concurrent_flips_cannot_empty_a_pool():
    cluster = make_cluster(prefill=2, decode=1)
    cluster.begin("p0", Role.PREFILL, 1)
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    first = asyncio.create_task(flips.flip("p0", Role.DECODE, drain_timeout_s=5))
    await wait_for(lambda: cluster.view("p0").state == WorkerState.DRAINING)
    with pytest.raises(FlipRefused, match="no READY worker"):
        await flips.flip("p1", Role.DECODE)
    cluster.end("p0", Role.PREFILL, 1)
    assert (await first).outcome == FlipOutcome.DONE


async def test_refuses_unknown_same_role_and_non_ready_workers():
    cluster = make_cluster()
    flips = FlipCoordinator(cluster)
    with pytest.raises(FlipRefused, match="no worker named") as err:
        await flips.flip("zz", Role.DECODE)
    assert err.value.status == 404
    with pytest.raises(FlipRefused, match="already a decode"):
        await flips.flip("d0", Role.DECODE)
    cluster.set_state("p1", WorkerState.STARTING)
    with pytest.raises(FlipRefused, match="starting"):
        await flips.flip("p1", Role.DECODE)


async def test_failed_switch_hook_rolls_back():
    async def broken(name: str, role: Role) -> None:
        raise RuntimeError("warm-up request failed")

    cluster = make_cluster()
    flips = FlipCoordinator(cluster, on_switch=broken)
    record = await flips.flip("p0", Role.DECODE)
    assert record.outcome == FlipOutcome.ROLLED_BACK
    assert "warm-up request failed" in record.detail
    view = cluster.view("p0")
    assert (view.role, view.state) == (Role.PREFILL, WorkerState.READY)


async def test_worker_dying_mid_drain_aborts_without_reviving_it():
    cluster = make_cluster()
    cluster.begin("d0", Role.DECODE, 1)
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    task = asyncio.create_task(flips.flip("d0", Role.PREFILL, drain_timeout_s=5))
    await wait_for(lambda: cluster.view("d0").state == WorkerState.DRAINING)
    cluster.set_state("d0", WorkerState.DEAD)  # the health checker's verdict
    record = await task
    assert record.outcome == FlipOutcome.ABORTED
    view = cluster.view("d0")
    assert (view.role, view.state) == (Role.DECODE, WorkerState.DEAD)


async def test_cancelled_flip_rolls_back():
    cluster = make_cluster()
    cluster.begin("p0", Role.PREFILL, 1)
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    task = asyncio.create_task(flips.flip("p0", Role.DECODE, drain_timeout_s=5))
    await wait_for(lambda: cluster.view("p0").state == WorkerState.DRAINING)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    view = cluster.view("p0")
    assert (view.role, view.state) == (Role.PREFILL, WorkerState.READY)
    assert flips.history[-1].detail == "cancelled" and flips.active == ()


async def test_prefill_flip_waits_for_kv_pulls_from_it():
    cluster = make_cluster(prefill=3)
    pulls = {"p0": 2}
    flips = FlipCoordinator(cluster, poll_interval_s=0.005,
                            kv_pulls_pending=lambda name: pulls.get(name, 0))
    task = asyncio.create_task(flips.flip("p0", Role.DECODE, drain_timeout_s=5))
    await asyncio.sleep(0.03)
    assert not task.done() and cluster.view("p0").role == Role.PREFILL
    pulls["p0"] = 0
    assert (await task).outcome == FlipOutcome.DONE
    timed_out = FlipCoordinator(cluster, poll_interval_s=0.005,
                                kv_pulls_pending=lambda name: 1)
    record = await timed_out.flip("p1", Role.DECODE, drain_timeout_s=0.03)
    assert record.outcome == FlipOutcome.ROLLED_BACK and "1 KV pulls" in record.detail


async def test_drain_and_undrain():
    cluster = make_cluster(prefill=1, decode=2)
    flips = FlipCoordinator(cluster, poll_interval_s=0.005)
    with pytest.raises(FlipRefused, match="no READY worker"):
        await flips.drain("p0")
    cluster.begin("d0", Role.DECODE, 3)
    result = await flips.drain("d0", wait=True, timeout_s=0.03)
    assert result.state == WorkerState.DRAINING and not result.drained
    assert cluster.snapshot().routable(Role.DECODE)[0].name == "d1"
    cluster.end("d0", Role.DECODE, 3)
    assert (await flips.drain("d0", wait=True, timeout_s=1)).drained
    with pytest.raises(FlipRefused, match="undrain it first"):
        await flips.flip("d0", Role.PREFILL)
    assert flips.undrain("d0").state == WorkerState.READY
    assert cluster.view("d0").state == WorkerState.READY
    with pytest.raises(FlipRefused, match="not draining"):
        flips.undrain("d0")


async def test_flip_metrics_export_counts_and_durations():
    cluster = make_cluster()
    flips = FlipCoordinator(cluster)
    await flips.flip("p0", Role.DECODE)
    cluster.begin("d0", Role.DECODE, 1)
    await flips.flip("d0", Role.PREFILL, drain_timeout_s=0.01)
    registry = CollectorRegistry()
    registry.register(FlipMetrics(flips))
    text = generate_latest(registry).decode()
    assert 'fulcrum_role_flips_total{from_role="prefill",outcome="done",to_role="decode"} 1.0' \
        in text
    assert 'outcome="rolled-back",to_role="prefill"} 1.0' in text
    assert 'fulcrum_role_flip_duration_seconds_count 2.0' in text
