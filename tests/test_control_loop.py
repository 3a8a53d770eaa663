"""The controller loop: scrape (over a mock transport) -> decide -> flip or only advise."""

from __future__ import annotations

import httpx
import pytest

from core.flips import FlipCoordinator
from core.slo import SLOTargets
from core.workers import Role, WorkerState
from instance_manager.controller.arrow import ArrowConfig, ArrowController
from instance_manager.controller.base import ControlSnapshot, FlipAction
from instance_manager.controller.loop import Controller
from instance_manager.metrics_collector import MetricsCollector
from router.cluster import Cluster
from tests.test_collector import vllm_text


class ScriptedPolicy:
    """Asks for the same flip every tick and remembers what it saw."""

    name = "scripted"

    def __init__(self, worker: str, to: Role) -> None:
        self.action = FlipAction(worker, to, "scripted for the test")
        self.seen: list[ControlSnapshot] = []

    def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
        self.seen.append(snapshot)
        return [self.action]


class FakeWorkers:
    """Serves each worker's /metrics: prefill TTFT grows 2.5 s per scrape (slow prefill),
    decode inter-token latency stays at 10-50 ms."""

    def __init__(self) -> None:
        self.scrapes: dict[str, int] = {}

    def handler(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        n = self.scrapes[host] = self.scrapes.get(host, 0) + 1
        if host.startswith("p"):
            text = vllm_text(ttft=[0, 0, 0, 10 * n, 10 * n], itl=[0] * 5, prompt=3000 * n,
                             generation=10 * n, finished=10 * n)
        else:
            text = vllm_text(ttft=[0] * 5, itl=[0, 100 * n, 100 * n, 100 * n, 100 * n],
                             prompt=3000 * n, generation=100 * n, finished=10 * n)
        return httpx.Response(200, text=text)


def make_cluster() -> Cluster:
    cluster = Cluster()
    for name, role in (("p0", Role.PREFILL), ("p1", Role.PREFILL), ("d0", Role.DECODE),
                       ("d1", Role.DECODE)):
        cluster.add(name, f"http://{name}:8000", role, WorkerState.READY)
    return cluster


def make_controller(cluster: Cluster, policy, *, advisory: bool = False) -> Controller:
    ticks = iter(range(0, 10_000, 5))
    collector = MetricsCollector(window_s=30, slo=SLOTargets(ttft_s=1.0, tpot_s=0.1),
                                 clock=lambda: float(next(ticks)))
    return Controller(collector, FlipCoordinator(cluster, poll_interval_s=0.001), policy,
                      advisory=advisory, drain_timeout_s=1.0, history_size=3)


async def test_arrow_controller_flips_a_decode_worker_under_prefill_pressure():
    cluster = make_cluster()
    cluster.begin("d1", Role.DECODE, 5)  # busier, so d0 is the one to go
    controller = make_controller(cluster, ArrowController(ArrowConfig(sustain_ticks=2)))
    workers = FakeWorkers()
    async with httpx.AsyncClient(transport=httpx.MockTransport(workers.handler)) as client:
        first = await controller.tick(client)  # baseline scrape: no percentiles yet
        assert first.actions == () and "within target" in first.note
        second = await controller.tick(client)
        assert second.actions == () and "pressure for 1 of 2 ticks" in second.note
        third = await controller.tick(client)
    assert [(a.worker, a.to) for a in third.actions] == [("d0", Role.PREFILL)]
    assert third.results == ("done: decode -> prefill",)
    assert third.numbers["prefill_load"] > 1.0
    view = cluster.view("d0")
    assert (view.role, view.state) == (Role.PREFILL, WorkerState.READY)
    assert controller.flips.history[-1].reason == third.actions[0].reason
    assert {w["name"] for w in third.workers} == {"p0", "p1", "d0", "d1"}


async def test_gateway_prefill_legs_reach_the_policy_and_tip_arrow():
    """The gateway's per-worker prefill-leg p90 is merged into the scraped metrics; with
    engine TTFTs far inside target, it alone makes Arrow flip a decode worker."""
    cluster = make_cluster()
    asked: list[float] = []

    def legs(window_s: float) -> dict[str, tuple[float, int]]:
        asked.append(window_s)  # no leg timed before the second tick
        return {"p0": (1.4, 30), "p1": (1.2, 30)} if len(asked) > 1 else {}

    ticks = iter(range(0, 10_000, 5))
    collector = MetricsCollector(window_s=30, slo=SLOTargets(ttft_s=1.0, tpot_s=0.1),
                                 clock=lambda: float(next(ticks)))
    controller = Controller(collector, FlipCoordinator(cluster, poll_interval_s=0.001),
                            ArrowController(ArrowConfig(sustain_ticks=1)), drain_timeout_s=1.0,
                            prefill_legs=legs)

    def calm(request: httpx.Request) -> httpx.Response:  # 50 ms engine TTFTs, quick ITLs
        n = calm.n = getattr(calm, "n", 0) + 1
        return httpx.Response(200, text=vllm_text(
            ttft=[10 * n] * 5, itl=[100 * n] * 5, prompt=300 * n, generation=100 * n,
            finished=10 * n))

    async with httpx.AsyncClient(transport=httpx.MockTransport(calm)) as client:
        first = await controller.tick(client)
        decision = await controller.tick(client)
    assert first.actions == () and "within target" in first.note
    assert asked == [30, 30]
    snap = controller.last_snapshot
    assert snap.metrics["p0"].gateway_ttft_p90_s == 1.4
    assert snap.metrics["p0"].gateway_ttft_samples == 30
    assert snap.metrics["d0"].gateway_ttft_p90_s is None
    assert snap.metrics["p0"].ttft_p90_s < 0.1  # the engines alone look fine
    assert [a.to for a in decision.actions] == [Role.PREFILL]
    assert decision.numbers["prefill_load"] == pytest.approx(1.3)
    assert {w["name"]: w.get("gateway_ttft_p90_s") for w in decision.workers}["p1"] == 1.2


async def test_advisory_mode_decides_but_changes_nothing():
    cluster = make_cluster()
    before = cluster.snapshot().workers
    policy = ScriptedPolicy("p0", Role.DECODE)
    controller = make_controller(cluster, policy, advisory=True)
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeWorkers().handler)) as c:
        decision = await controller.tick(c)
    assert decision.mode == "advisory"
    assert decision.results == ("advisory: not applied",)
    assert cluster.snapshot().workers == before
    assert controller.flips.history == ()


async def test_refused_flips_are_recorded_not_raised_and_history_is_bounded():
    cluster = Cluster()
    cluster.add("p0", "http://p0:8000", Role.PREFILL, WorkerState.READY)
    cluster.add("d0", "http://d0:8000", Role.DECODE, WorkerState.READY)
    controller = make_controller(cluster, ScriptedPolicy("p0", Role.DECODE))
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeWorkers().handler)) as c:
        for _ in range(5):
            decision = await controller.tick(c)
    assert decision.results[0].startswith("refused:")
    assert "prefill pool with no READY worker" in decision.results[0]
    assert cluster.view("p0").role == Role.PREFILL
    assert [d.tick for d in controller.decisions] == [3, 4, 5]


async def test_no_decision_while_a_flip_is_under_way():
    cluster = make_cluster()
    policy = ScriptedPolicy("p0", Role.DECODE)
    controller = make_controller(cluster, policy)
    controller.flips._active.add("d1")  # a manual flip of d1 is draining right now
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeWorkers().handler)) as c:
        decision = await controller.tick(c)
    assert policy.seen == [] and decision.actions == ()
    assert "flip of d1 in progress" in decision.note


async def test_run_survives_a_failing_tick_and_stops_on_cancel():
    import asyncio

    class FlakyPolicy(ScriptedPolicy):
        def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
            self.seen.append(snapshot)
            if len(self.seen) == 1:
                raise RuntimeError("bad numbers")
            return []

    cluster = make_cluster()
    policy = FlakyPolicy("p0", Role.DECODE)
    controller = make_controller(cluster, policy)
    controller.interval_s = 0.001
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeWorkers().handler)) as c:
        task = asyncio.create_task(controller.run(c))

        async def enough_ticks() -> None:
            while len(controller.decisions) < 2:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(enough_ticks(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert len(policy.seen) >= 3  # the first tick raised, later ones were recorded
    assert cluster.view("p0").role == Role.PREFILL


async def test_routing_pressure_wakes_the_loop_and_reaches_the_policy():
    import asyncio

    from core.pressure import SLOPressure
    from router.policies.arrow import ArrowRouting

    cluster = make_cluster()
    policy = ScriptedPolicy("p0", Role.DECODE)
    policy.action = None  # only watch
    policy.decide = lambda snap: (policy.seen.append(snap), [])[1]
    controller = make_controller(cluster, policy, advisory=True)
    controller.interval_s = 60.0  # without a wake-up the second tick is a minute away
    controller.min_interval_s = 0.0
    routing = ArrowRouting()
    controller.listen(routing)
    signal = SLOPressure(Role.DECODE, "r1", "d0", 0.2, 0.1, 0.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeWorkers().handler)) as c:
        task = asyncio.create_task(controller.run(c))
        while not policy.seen:
            await asyncio.sleep(0.001)
        assert policy.seen[0].pressure == ()
        routing.pressure.report(signal)
        await asyncio.wait_for(_until(lambda: len(policy.seen) >= 2), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert policy.seen[1].pressure == (signal,)
    assert routing.pressure.drain() == []  # the controller drained it


async def _until(condition) -> None:
    import asyncio

    while not condition():
        await asyncio.sleep(0.001)


async def test_several_flips_of_one_decision_are_applied_together():
    class Jump:
        name = "jump"

        def decide(self, snapshot: ControlSnapshot) -> list[FlipAction]:
            return [FlipAction("p0", Role.DECODE, "jump"), FlipAction("p1", Role.DECODE, "jump")]

    cluster = Cluster()
    for name, role in (("p0", Role.PREFILL), ("p1", Role.PREFILL), ("p2", Role.PREFILL),
                       ("d0", Role.DECODE)):
        cluster.add(name, f"http://{name}:8000", role, WorkerState.READY)
    cluster.begin("p0", Role.PREFILL, 100)  # p0 is busy: its drain never ends here
    controller = make_controller(cluster, Jump())
    async with httpx.AsyncClient(transport=httpx.MockTransport(FakeWorkers().handler)) as c:
        decision = await controller.tick(c)
    # p1 switched while p0's drain ran into its timeout beside it (in turn, p1 would only
    # have started after p0 rolled back)
    assert decision.results[1] == "done: prefill -> decode"
    assert decision.results[0].startswith("rolled-back: drain timed out")
    assert [r.worker for r in controller.flips.history] == ["p1", "p0"]
    assert cluster.view("p1").role == Role.DECODE and cluster.view("p0").role == Role.PREFILL
