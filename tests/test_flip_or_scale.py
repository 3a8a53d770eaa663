"""Flip-or-scale on built snapshots, in the simulator, and through the live controller hook."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.arrivals import pair, poisson_times, synthetic_pool
from benchmarks.metrics import SLO
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_routing
from benchmarks.sim.simulator import SimConfig, Simulator
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView
from instance_manager.controller.base import ControlSnapshot, FlipAction, WorkerMetrics
from instance_manager.controller.registry import make_control_policy
from instance_manager.controller.scaling import BackendScaler, FlipOrScale, ScaleAction

TARGET = SLOTargets(ttft_s=1.0, tpot_s=0.1)


def snap(t: float, prefill_load: float, decode_load: float, *, prefill: int = 2,
         decode: int = 2, states: dict[str, WorkerState] | None = None,
         in_flight: dict[str, int] | None = None) -> ControlSnapshot:
    """Workers p0.. and d0.. whose windowed latencies give the asked pool loads."""
    views, metrics = [], {}
    for role, count in ((Role.PREFILL, prefill), (Role.DECODE, decode)):
        for i in range(count):
            name = f"{role.value[0]}{i}"
            legs = (in_flight or {}).get(name, 0)
            views.append(WorkerView(name, f"http://{name}", role,
                                    (states or {}).get(name, WorkerState.READY),
                                    in_flight_prefill=legs if role == Role.PREFILL else 0,
                                    in_flight_decode=legs if role == Role.DECODE else 0))
            metrics[name] = WorkerMetrics(
                name, ttft_p90_s=prefill_load * TARGET.ttft_s, ttft_samples=50,
                itl_p90_s=decode_load * TARGET.tpot_s, itl_samples=500)
    return ControlSnapshot(time=t, cluster=ClusterSnapshot(tuple(views), taken_at=t),
                           metrics=metrics, window_s=10.0, slo=TARGET)


def policy(**knobs: str) -> FlipOrScale:
    p = make_control_policy("flip-or-scale", **{"start_time_s": "60", "hold_s": "100",
                                                "min_workers": "4", **knobs})
    assert isinstance(p, FlipOrScale)
    return p


def run(p: FlipOrScale, loads: list[tuple[float, float]], step_s: float = 5.0,
        **kw: object) -> list[tuple[float, list]]:
    return [(i * step_s, p.decide(snap(i * step_s, pl, dl, **kw)))
            for i, (pl, dl) in enumerate(loads)]


def test_both_pools_over_scales_only_after_a_start_time() -> None:
    p = policy()
    out = run(p, [(2.0, 1.5)] * 14)  # 0..65 s
    first = next((t, a) for t, a in out if a)
    assert first[0] == 60.0  # not before the pressure outlasted one start-up
    (action,) = first[1]
    assert isinstance(action, ScaleAction) and action.direction == "up"
    assert action.role == Role.PREFILL  # the pool further over target
    assert "start time 60s" in action.reason
    p2 = policy()
    run(p2, [(2.0, 1.5)] * 12)  # 55 s of pressure
    assert "both pools over target for 55s < start time 60s" in p2.last_note.summary
    assert "would likely arrive after the burst" in p2.last_note.summary


def test_one_scale_at_a_time_while_the_new_worker_starts() -> None:
    p = policy()
    acted = [a for _, a in run(p, [(2.0, 1.5)] * 40) if a]  # 200 s of pressure
    assert len(acted) == 3  # at 60 s, 120 s, 180 s: one start time apart
    starting = snap(300, 2.0, 1.5, states={"d1": WorkerState.STARTING})
    p2 = policy()
    run(p2, [(2.0, 1.5)] * 13)
    assert p2.decide(starting) == []
    assert "still starting" in p2.last_note.summary


def test_a_one_sided_imbalance_that_a_flip_fixes_flips() -> None:
    p = policy()
    # prefill at 1.4 on 2 workers needs one more; decode at 0.2 spares one easily
    out = run(p, [(1.4, 0.2)] * 2)
    (action,) = out[1][1]  # arrow wants the pressure sustained for 2 ticks
    assert isinstance(action, FlipAction) and action.to == Role.PREFILL
    assert p.last_note.summary.startswith("flip")
    assert not any(isinstance(a, ScaleAction) for _, acts in run(p, [(1.4, 0.2)] * 40)
                   for a in acts)  # a flip fixes it: never scale for it


def test_one_pool_short_beyond_what_flips_fix_scales_after_start_time() -> None:
    p = policy()
    # decode at 0.8: giving one of two decoders away would push it to 1.6: no flip possible
    out = run(p, [(3.0, 0.8)] * 14)
    kinds = [type(a).__name__ for _, acts in out for a in acts]
    assert kinds == ["ScaleAction"]
    assert out[12][1][0].role == Role.PREFILL
    assert "prefill needs 4 more workers (load 3.00), the decode pool can spare 0" in \
        out[12][1][0].reason
    # prefill at 3.0 needs 4 more; 6 decoders at 0.2 can spare 4: flips, no scaling
    p2 = policy(max_workers="16")
    acts = [a for _, x in run(p2, [(3.0, 0.2)] * 30, decode=6) for a in x]
    assert acts and all(isinstance(a, FlipAction) for a in acts)


def test_idle_capacity_goes_back_after_the_hold_and_never_below_min() -> None:
    p = policy(min_workers="4")
    calm = run(p, [(0.1, 0.1)] * 30, prefill=2, decode=3, in_flight={"d0": 2, "d2": 1})
    downs = [(t, a) for t, acts in calm for a in acts]
    assert [t for t, _ in downs] == [100.0]
    assert downs[0][1].direction == "down" and downs[0][1].worker == "d1"  # least loaded
    at_min = policy(min_workers="4")
    assert not any(a for _, a in run(at_min, [(0.1, 0.1)] * 30))


def test_scale_only_never_flips_and_flip_only_never_scales() -> None:
    scale_only = policy(mode="scale-only", sustain_s="10")
    out = run(scale_only, [(3.0, 0.2)] * 4)
    assert [t for t, a in out if a] == [10.0]
    assert isinstance(out[2][1][0], ScaleAction)
    flip_only = policy(mode="flip-only")
    acts = [a for _, x in run(flip_only, [(2.0, 1.5)] * 40) for a in x]
    assert acts == []


def test_measured_start_time_replaces_the_configured_one() -> None:
    p = policy()
    p.start_time_source = lambda: 20.0
    out = run(p, [(2.0, 1.5)] * 6)
    assert [t for t, a in out if a] == [20.0]
    assert p.last_note.numbers["start_time_s"] == 20.0


def test_simulator_prices_start_up_and_counts_worker_seconds() -> None:
    perf = roofline("llama-3.1-8b", "h100")
    slo = SLO(ttft_ms=1000, tpot_ms=40)
    pool = synthetic_pool(50, 1000, 100, seed=1)
    trace = pair(poisson_times(2000, 40.0, 0), pool)  # ~50 s

    class UpThenDown:
        name = "test"

        def __init__(self) -> None:
            self.ticks = 0

        def decide(self, snapshot: ControlSnapshot) -> list:
            self.ticks += 1
            if self.ticks == 1:
                return [ScaleAction("up", "test", role=Role.DECODE)]
            if self.ticks == 20:
                return [ScaleAction("down", "test", worker="w2")]
            return []

    cfg = SimConfig(prefill=1, decode=1, slo=slo, spare=1, start_time_s=15.0,
                    control_interval_s=1.0)
    sim = Simulator(cfg, perf, make_routing("least-loaded"), UpThenDown())
    res = sim.run(trace)
    assert not res.failed.any() and (res.finish_count == 1).all()
    assert [(round(t), d, w) for t, d, w, _ in res.scales] == [(1, "up", "w2"),
                                                               (20, "down", "w2")]
    assert res.busy_s["w2"] > 0  # it served between ready (16 s) and its retirement
    assert sim.engines[2].state == WorkerState.DEAD
    end = float(res.finish.max())
    # two workers all along, the third from its start request (1 s) to retirement (>= 20 s)
    assert 2 * end + 19 <= res.worker_seconds <= 2 * end + 19 + 5
    roles = [(n_p + n_d) for _, n_p, n_d in res.roles]
    assert max(roles) == 3 and roles[-1] == 2


def test_controller_hands_scale_actions_to_the_back_end() -> None:
    from core.flips import FlipCoordinator
    from instance_manager.controller.loop import Controller
    from router.cluster import Cluster

    class Backend:
        start_seconds = [42.0, 50.0]

        def __init__(self) -> None:
            self.started: list[Role] = []

        async def start_worker(self, role: Role) -> str:
            self.started.append(role)
            return "ray-x-1"

    class Registry:
        def __init__(self) -> None:
            self.removed: list[str] = []

        async def remove(self, name: str) -> dict:
            self.removed.append(name)
            return {}

    async def go() -> None:
        backend, registry = Backend(), Registry()
        controller = Controller(collector=None, flips=FlipCoordinator(Cluster()),  # type: ignore[arg-type]
                                policy=policy())
        scaler = BackendScaler(backend, registry)
        controller.scaler = scaler
        assert await controller._apply(ScaleAction("up", "x", role=Role.DECODE)) == \
            "starting ray-x-1"
        assert await controller._apply(ScaleAction("down", "x", worker="w3")) == \
            "draining w3, then giving it back"
        await asyncio.sleep(0)
        assert backend.started == [Role.DECODE] and registry.removed == ["w3"]
        assert scaler.measured_start_s() == pytest.approx(46.0)

    asyncio.run(go())


def test_no_give_back_while_the_measured_throughput_needs_the_worker() -> None:
    p = policy(min_workers="4", hold_s="20")

    def with_tput(s: ControlSnapshot, per_worker: float) -> ControlSnapshot:
        from dataclasses import replace

        metrics = {n: replace(m, prompt_tokens_per_s=per_worker * 10,
                              generation_tokens_per_s=per_worker)
                   for n, m in s.metrics.items()}
        return replace(s, metrics=metrics)

    # over target on 2+3 workers, each decoder delivering 100 tok/s: that is its capacity
    p.decide(with_tput(snap(0, 2.0, 1.5, prefill=2, decode=3), 100))
    assert p.capacity[Role.DECODE] == 100
    # calm by latency, yet 3 decoders run 90 tok/s each: 2 would need 135 > 0.7 * 100
    for t in range(5, 60, 5):
        assert p.decide(with_tput(snap(t, 0.1, 0.1, prefill=2, decode=3), 90)) == []
    assert "throughput" in p.last_note.summary
    # the load falls to 40 tok/s each: 2 decoders at 60 tok/s stay under 70: one goes back
    acts = [p.decide(with_tput(snap(t, 0.1, 0.1, prefill=2, decode=3), 40))
            for t in range(60, 120, 5)]
    assert acts[0] and acts[0][0].direction == "down"  # at once: calm for the hold already
