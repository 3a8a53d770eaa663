"""Control policies on built snapshots: a workload that swings between long-prompt /
short-output and short-prompt / long-output traffic, cooldown, hysteresis, and the rule
that no pool is ever emptied."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest

from core.pressure import SLOPressure
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView
from instance_manager.controller.arrow import ROUND1_KNOBS as ARROW_ROUND1
from instance_manager.controller.arrow import (
    ArrowConfig,
    ArrowController,
    spare_workers,
    wanted_workers,
)
from instance_manager.controller.base import ControlPolicy, ControlSnapshot, WorkerMetrics
from instance_manager.controller.dopd import (
    ROUND1_KNOBS,
    DOPDConfig,
    DOPDController,
    HoltForecast,
    choose_target,
)
from instance_manager.controller.registry import make_control_policy, policy_knobs
from instance_manager.controller.static import StaticConfig, StaticPolicy

PREFILL_TOKENS_PER_S = 4000.0  # one worker's prefill speed in the toy cluster
DECODE_TOKENS_PER_S = 400.0  # one worker's decode capacity in the toy cluster
RATE = 2.0  # requests per second
SLO = SLOTargets(ttft_s=1.0, tpot_s=0.1)
LONG_PROMPTS = (3000, 20)  # (ISL, OSL): prefill-heavy
LONG_OUTPUTS = (100, 300)  # decode-heavy


@dataclass
class ToyCluster:
    """Four workers whose latencies follow a simple queueing model of the current mix."""

    roles: dict[str, Role] = field(default_factory=lambda: {
        "w0": Role.PREFILL, "w1": Role.PREFILL, "w2": Role.DECODE, "w3": Role.DECODE})
    in_flight: dict[str, int] = field(default_factory=dict)
    states: dict[str, WorkerState] = field(default_factory=dict)

    def count(self, role: Role) -> int:
        return sum(1 for r in self.roles.values() if r == role)

    def snapshot(self, t: float, isl: float, osl: float) -> ControlSnapshot:
        n_p, n_d = self.count(Role.PREFILL), self.count(Role.DECODE)
        t_p = isl / PREFILL_TOKENS_PER_S
        rho_p = RATE * t_p / n_p
        ttft = t_p / (1 - rho_p) if rho_p < 1 else 10.0
        rho_d = RATE * osl / DECODE_TOKENS_PER_S / n_d
        itl = min(1.0, 0.02 / (1 - rho_d)) if rho_d < 1 else 1.0
        views, metrics = [], {}
        for name, role in self.roles.items():
            legs = self.in_flight.get(name, 0)
            views.append(WorkerView(
                name=name, url=f"http://{name}", role=role,
                state=self.states.get(name, WorkerState.READY),
                in_flight_prefill=legs if role == Role.PREFILL else 0,
                in_flight_decode=legs if role == Role.DECODE else 0))
            if role == Role.PREFILL:
                metrics[name] = WorkerMetrics(name, ttft_p50_s=ttft / 2, ttft_p90_s=ttft,
                                              ttft_samples=20,
                                              requests_finished_per_s=RATE / n_p)
            else:
                metrics[name] = WorkerMetrics(name, itl_p50_s=itl / 2, itl_p90_s=itl,
                                              itl_samples=500)
        return ControlSnapshot(time=t, cluster=ClusterSnapshot(tuple(views), taken_at=t),
                               metrics=metrics, window_s=20.0, slo=SLO,
                               mean_prompt_tokens=isl, mean_output_tokens=osl)

    def apply(self, policy: ControlPolicy, snapshot: ControlSnapshot) -> list[str]:
        actions = policy.decide(snapshot)
        for action in actions:
            assert self.roles[action.worker] != action.to
            self.roles[action.worker] = action.to
        assert self.count(Role.PREFILL) >= 1 and self.count(Role.DECODE) >= 1
        return [a.worker for a in actions]


def run_swing(policy: ControlPolicy, ticks_per_phase: int = 30, step_s: float = 5.0,
              ) -> tuple[ToyCluster, list[int]]:
    """Prefill-heavy, then decode-heavy traffic; returns the prefill count after each tick."""
    toy, history = ToyCluster(), []
    for i in range(2 * ticks_per_phase):
        isl, osl = LONG_PROMPTS if i < ticks_per_phase else LONG_OUTPUTS
        toy.apply(policy, toy.snapshot(i * step_s, isl, osl))
        history.append(toy.count(Role.PREFILL))
    return toy, history


def test_toy_cluster_model_has_the_pressure_the_tests_rely_on():
    toy = ToyCluster()
    heavy_prefill = toy.snapshot(0, *LONG_PROMPTS)
    assert heavy_prefill.metrics["w0"].ttft_p90_s > SLO.ttft_s
    assert heavy_prefill.metrics["w2"].itl_p90_s < SLO.tpot_s
    heavy_decode = ToyCluster(roles={"w0": Role.PREFILL, "w1": Role.PREFILL,
                                     "w2": Role.PREFILL, "w3": Role.DECODE})
    snap = heavy_decode.snapshot(0, *LONG_OUTPUTS)
    assert snap.metrics["w3"].itl_p90_s > SLO.tpot_s


def test_arrow_moves_a_worker_to_prefill_and_back_when_the_mix_swings():
    policy = ArrowController(ArrowConfig(cooldown_s=20.0, sustain_ticks=2))
    _, history = run_swing(policy)
    first_phase, second_phase = history[:30], history[30:]
    assert max(first_phase) == 3, history  # a decode worker became prefill
    assert history[0] == 2  # but not on the first tick: pressure must be sustained
    assert second_phase[-1] < 3, history  # and went back once outputs got long
    assert min(second_phase) >= 1


def test_arrow_flip_reason_carries_the_numbers():
    policy = ArrowController(ArrowConfig(sustain_ticks=1))
    toy = ToyCluster()
    actions = policy.decide(toy.snapshot(0, *LONG_PROMPTS))
    assert len(actions) == 1 and actions[0].to == Role.PREFILL
    assert "TTFT incl. queue 3.000s vs target 1.000s" in actions[0].reason
    assert policy.last_note.numbers["prefill_load"] == pytest.approx(3.0)


def test_arrow_flips_the_least_loaded_worker():
    policy = ArrowController(ArrowConfig(sustain_ticks=1))
    toy = ToyCluster(in_flight={"w2": 5, "w3": 1})
    actions = policy.decide(toy.snapshot(0, *LONG_PROMPTS))
    assert [a.worker for a in actions] == ["w3"]
    toy = ToyCluster(in_flight={"w2": 0, "w3": 1})
    assert [a.worker for a in ArrowController(ArrowConfig(sustain_ticks=1)).decide(
        toy.snapshot(0, *LONG_PROMPTS))] == ["w2"]


def test_arrow_cooldown_blocks_a_second_flip():
    policy = ArrowController(ArrowConfig(sustain_ticks=1, cooldown_s=30.0, repeat_s=30.0,
                                         max_flips_per_decision=1))
    toy = ToyCluster(roles={f"w{i}": Role.PREFILL if i < 2 else Role.DECODE for i in range(6)})
    assert toy.apply(policy, toy.snapshot(0, *LONG_PROMPTS))
    for t in (5, 10, 25):
        assert toy.apply(policy, toy.snapshot(t, *LONG_PROMPTS)) == []
        assert "before another move the same way" in policy.last_note.summary
    assert toy.apply(policy, toy.snapshot(31, *LONG_PROMPTS))


def test_arrow_repeats_a_move_the_same_way_soon_but_reverses_only_after_cooldown():
    policy = ArrowController(ArrowConfig(sustain_ticks=1, cooldown_s=30.0, repeat_s=2.0,
                                         max_flips_per_decision=1))
    toy = ToyCluster(roles={f"w{i}": Role.PREFILL if i < 2 else Role.DECODE for i in range(6)})
    assert toy.apply(policy, toy.snapshot(0, *LONG_PROMPTS))
    assert toy.apply(policy, toy.snapshot(1, *LONG_PROMPTS)) == []  # within repeat_s
    assert toy.apply(policy, toy.snapshot(3, *LONG_PROMPTS))
    assert toy.count(Role.PREFILL) == 4
    # the mix swings to long outputs: the reverse move waits for the cooldown
    assert toy.apply(policy, toy.snapshot(5, *LONG_OUTPUTS)) == []
    assert "cooldown" in policy.last_note.summary


def test_arrow_holds_when_the_source_pool_would_overload():
    # decode at 0.7 of target on each of 2 workers -> 1.4 after losing one: no flip
    policy = ArrowController(ArrowConfig(sustain_ticks=1))
    toy = ToyCluster()
    snap = toy.snapshot(0, *LONG_PROMPTS)
    hot_decode = {n: (WorkerMetrics(n, itl_p90_s=0.07, itl_samples=50)
                      if toy.roles[n] == Role.DECODE else m) for n, m in snap.metrics.items()}
    snap = ControlSnapshot(snap.time, snap.cluster, hot_decode, snap.window_s, snap.slo)
    assert policy.decide(snap) == []
    assert "would reach load 1.40" in policy.last_note.summary


def test_arrow_counts_the_queue_in_ttft():
    policy = ArrowController(ArrowConfig(sustain_ticks=1))
    toy = ToyCluster()
    snap = toy.snapshot(0, *LONG_OUTPUTS)  # TTFT itself is tiny
    queued = {n: (WorkerMetrics(n, ttft_p90_s=0.05, ttft_samples=20, num_waiting=8,
                                requests_finished_per_s=4.0)
                  if toy.roles[n] == Role.PREFILL else WorkerMetrics(n))
              for n in snap.metrics}
    snap = ControlSnapshot(snap.time, snap.cluster, queued, snap.window_s, snap.slo)
    actions = policy.decide(snap)
    assert [a.to for a in actions] == [Role.PREFILL]  # 0.05 s + 8 / 4 per s = 2.05 s
    assert policy.last_note.numbers["ttft_queue_incl_s"] == pytest.approx(2.05)


def test_arrow_counts_decode_admission_queueing_as_decode_pressure():
    # ITL is within target, but requests wait to be admitted on the decode pool: that wait
    # is paid in TTFT, so the decode side is the starved one and gets a worker.
    policy = ArrowController(ArrowConfig(sustain_ticks=1))
    toy = ToyCluster()
    snap = toy.snapshot(0, *LONG_OUTPUTS)
    full = {n: (WorkerMetrics(n, itl_p90_s=0.01, itl_samples=50, num_waiting=20,
                              requests_finished_per_s=2.0)
                if toy.roles[n] == Role.DECODE else WorkerMetrics(n))
            for n in snap.metrics}
    snap = ControlSnapshot(snap.time, snap.cluster, full, snap.window_s, snap.slo)
    actions = policy.decide(snap)
    assert [a.to for a in actions] == [Role.DECODE]


def test_arrow_flips_on_the_gateway_s_ttft_that_the_engine_s_alone_misses():
    # The engines see 50 ms TTFTs; the gateway, whose clock also runs through the HTTP
    # hops and the API servers of a busy host, sees 1.3 s legs: the client's TTFT misses.
    toy = ToyCluster()
    snap = toy.snapshot(0, *LONG_OUTPUTS)

    def metrics(gateway_s: float | None, samples: int = 20) -> dict:
        return {n: (WorkerMetrics(n, ttft_p90_s=0.05, ttft_samples=20,
                                  gateway_ttft_p90_s=gateway_s, gateway_ttft_samples=samples)
                    if toy.roles[n] == Role.PREFILL else WorkerMetrics(n))
                for n in snap.metrics}

    engine_only = ArrowController(ArrowConfig(sustain_ticks=2))
    for t in range(3):
        assert engine_only.decide(replace(snap, time=t, metrics=metrics(None))) == []
    assert engine_only.last_note.numbers["prefill_load"] == pytest.approx(0.05)
    policy = ArrowController(ArrowConfig(sustain_ticks=2))
    assert policy.decide(replace(snap, time=0, metrics=metrics(1.3))) == []  # 1 of 2 ticks
    actions = policy.decide(replace(snap, time=1, metrics=metrics(1.3)))
    assert [a.to for a in actions] == [Role.PREFILL]
    assert policy.last_note.numbers["ttft_queue_incl_s"] == pytest.approx(1.3)
    assert policy.last_note.numbers["gateway_ttft_p90_s"] == pytest.approx(1.3)
    # a gateway p90 from too few legs counts no more than the engine's would
    few = ArrowController(ArrowConfig(sustain_ticks=1, min_samples=3))
    assert few.decide(replace(snap, metrics=metrics(1.3, samples=2))) == []
    # the gateway's clock never lowers the engine's number (it starts earlier)
    low = ArrowController(ArrowConfig(sustain_ticks=1))
    slow_engine = {n: (replace(m, ttft_p90_s=1.5) if toy.roles[n] == Role.PREFILL else m)
                   for n, m in metrics(0.2).items()}
    assert [a.to for a in low.decide(replace(snap, metrics=slow_engine))] == [Role.PREFILL]


def test_dopd_moves_workers_with_the_mix_and_back():
    policy = DOPDController(DOPDConfig(**{**ROUND1_KNOBS, "adjustment_interval_s": 30.0},
                                       prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
                                       decode_tokens_per_s=DECODE_TOKENS_PER_S))
    _, history = run_swing(policy)
    assert max(history[:30]) == 3, history
    assert history[29] == 3
    assert history[-1] == 1, history  # decode-heavy: down to one prefill worker
    changes = [i for i in range(1, len(history)) if history[i] != history[i - 1]]
    assert all(b - a >= 6 for a, b in zip(changes, changes[1:], strict=False))  # 30 s apart


def test_dopd_forecast_acts_before_the_shift_completes():
    """The mix ramps from decode-heavy to prefill-heavy; with a forecast the prefill pool
    grows earlier than from the current mix alone."""

    def first_growth(horizon_s: float) -> int:
        policy = DOPDController(DOPDConfig(**{**ROUND1_KNOBS,
                                              "forecast_horizon_s": horizon_s},
                                           prefill_tokens_per_s=PREFILL_TOKENS_PER_S,
                                           decode_tokens_per_s=DECODE_TOKENS_PER_S))
        toy = ToyCluster()
        for i in range(40):
            frac = min(1.0, i / 30)  # 150 s ramp
            isl = 100 + frac * (3000 - 100)
            osl = 300 + frac * (20 - 300)
            toy.apply(policy, toy.snapshot(i * 5.0, isl, osl))
            if toy.count(Role.PREFILL) > 2:
                return i
        return 99

    without, with_forecast = first_growth(0.0), first_growth(30.0)
    assert with_forecast < without < 99


def test_dopd_hysteresis_keeps_a_near_balanced_split():
    policy = DOPDController(DOPDConfig(**{**ROUND1_KNOBS, "forecast_horizon_s": 0.0},
                                       prefill_tokens_per_s=1000, decode_tokens_per_s=1000))
    toy = ToyCluster()
    # share 0.65 -> ideal 2.6 prefill of 4: rounds to 3 but sits inside the band
    for t in range(10):
        assert toy.apply(policy, toy.snapshot(t * 5.0, 650, 350)) == []
    assert "hysteresis" in policy.last_note.summary
    # share 0.8 -> ideal 3.2: outside the band once the smoothed level gets there
    moved = [toy.apply(policy, toy.snapshot(100.0 + 5 * t, 800, 200)) for t in range(3)]
    assert sum(len(m) for m in moved) == 1
    assert toy.count(Role.PREFILL) == 3


def test_dopd_waits_for_traffic():
    policy = DOPDController()
    toy = ToyCluster()
    snap = toy.snapshot(0, *LONG_PROMPTS)
    empty = ControlSnapshot(snap.time, snap.cluster, snap.metrics, snap.window_s, snap.slo)
    assert policy.decide(empty) == []
    assert "no finished requests" in policy.last_note.summary


def test_static_moves_toward_its_ratio_one_worker_per_tick():
    policy = StaticPolicy(StaticConfig(prefill=1, decode=3))
    toy = ToyCluster()
    moved = toy.apply(policy, toy.snapshot(0, *LONG_PROMPTS))
    assert len(moved) == 1 and toy.count(Role.PREFILL) == 1
    assert toy.apply(policy, toy.snapshot(5, *LONG_PROMPTS)) == []


@pytest.mark.parametrize("name", ["static", "arrow", "dopd"])
def test_no_policy_ever_empties_a_pool(name):
    rng = random.Random(7)
    knobs = {"static": {"prefill": 1, "decode": 0},
             "arrow": {"sustain_ticks": 1, "cooldown_s": 0.0},
             "dopd": {"adjustment_interval_s": 0.0, "hysteresis": 0.0,
                      "forecast_horizon_s": 0.0}}[name]
    policy = make_control_policy(name, **knobs)
    for size in (2, 3, 5):
        toy = ToyCluster(roles={f"w{i}": Role.PREFILL if i % 2 else Role.DECODE
                                for i in range(size)})
        for tick in range(200):
            isl, osl = rng.choice([LONG_PROMPTS, LONG_OUTPUTS, (5000, 1), (1, 2000)])
            toy.apply(policy, toy.snapshot(1000.0 * size + tick, isl, osl))  # asserts inside


@pytest.mark.parametrize("name", ["static", "arrow", "dopd"])
def test_policies_hold_while_a_worker_drains(name):
    policy = make_control_policy(name, **({"prefill": 1, "decode": 3} if name == "static"
                                          else {}))
    toy = ToyCluster(roles={f"w{i}": Role.PREFILL if i < 3 else Role.DECODE for i in range(6)},
                     states={"w5": WorkerState.DRAINING})
    for t in range(10):
        assert policy.decide(toy.snapshot(t * 50.0, *LONG_OUTPUTS)) == []
    assert "w5 is draining" in policy.last_note.summary


def test_registry_builds_policies_with_typed_knobs():
    policy = make_control_policy("arrow", cooldown_s="7.5", sustain_ticks="4")
    assert policy_knobs(policy)["cooldown_s"] == 7.5
    assert policy_knobs(policy)["sustain_ticks"] == 4
    with pytest.raises(ValueError, match="no knob"):
        make_control_policy("dopd", bogus=1)
    with pytest.raises(ValueError, match="unknown control policy"):
        make_control_policy("nope")
    with pytest.raises(ValueError, match="wants a int"):
        make_control_policy("arrow", sustain_ticks="many")


def test_arrow_ignores_percentiles_from_too_few_samples():
    policy = ArrowController(ArrowConfig(sustain_ticks=1, min_samples=3))
    toy = ToyCluster()
    snap = toy.snapshot(0, *LONG_OUTPUTS)
    few = {n: (WorkerMetrics(n, ttft_p90_s=30.0, ttft_samples=2)
               if toy.roles[n] == Role.PREFILL else WorkerMetrics(n)) for n in snap.metrics}
    assert policy.decide(ControlSnapshot(0, snap.cluster, few, 20.0, SLO)) == []
    enough = {n: (WorkerMetrics(n, ttft_p90_s=30.0, ttft_samples=3)
                  if toy.roles[n] == Role.PREFILL else WorkerMetrics(n)) for n in snap.metrics}
    assert len(policy.decide(ControlSnapshot(1, snap.cluster, enough, 20.0, SLO))) == 1


def test_dopd_forecast_stays_with_the_data_after_a_gap():
    # A steep rise, then 40 s without an update (no request finished), then the share is
    # low: the level must move toward the data, not fly past 1 on the stale trend.
    holt = HoltForecast(0.5, 0.3, max_extrapolation_s=5.0, upper=1.0)
    for t, share in ((0, 0.1), (1, 0.4), (2, 0.7), (3, 0.9)):
        holt.update(share, float(t), 0.0)
    after_gap = holt.update(0.03, 43.0, 0.0)
    assert after_gap < 0.9
    settled = [holt.update(0.03, 44.0 + i, 0.0) for i in range(6)]
    assert settled[-1] < 0.2



# -- DOPD: need-based target, jump, hysteresis -------------------------------------------

NEED_KNOBS = {"prefill_tokens_per_s": 1000.0, "decode_tokens_per_s": 100.0,
              "prefill_utilization": 1.0, "decode_utilization": 1.0, "hysteresis": 0.3,
              "adjustment_interval_s": 2.0, "reverse_hold_s": 10.0, "warmup_s": 0.0,
              "decode_estimate": "flow"}
"""The flow estimate (rate x output length / capacity): the need math these tests check."""


def eight(n_prefill: int, **views: dict) -> ToyCluster:
    return ToyCluster(roles={f"w{i}": Role.PREFILL if i < n_prefill else Role.DECODE
                             for i in range(8)})


def need_snapshot(toy: ToyCluster, t: float, rate: float, isl: float, osl: float,
                  **fields) -> ControlSnapshot:
    snap = toy.snapshot(t, isl, osl)
    views = tuple(replace(w, **fields.get(w.name, {})) for w in snap.cluster.workers)
    return replace(snap, cluster=ClusterSnapshot(views, taken_at=t), arrival_rate_per_s=rate,
                   metrics={})


def test_dopd_need_math_from_rate_lengths_and_capacity():
    policy = DOPDController(DOPDConfig(**NEED_KNOBS))
    toy = eight(4)
    # 10 req/s x 200 prompt tokens / 1000 tok/s = 2 prefill workers;
    # 10 req/s x 30 output tokens / 100 tok/s = 3 decode workers: 4P4D covers both
    assert policy.decide(need_snapshot(toy, 0.0, 10.0, 200, 30)) == []
    numbers = policy.last_note.numbers
    assert numbers["prefill_need"] == pytest.approx(2.0)
    assert numbers["decode_need"] == pytest.approx(3.0)
    assert "both pools have headroom" in policy.last_note.summary


def test_dopd_decode_capacity_counts_batch_slots_and_kv_room():
    knobs = {**NEED_KNOBS, "decode_tokens_per_s": 1000.0, "decode_step_s": 0.1,
             "max_num_seqs": 50, "kv_tokens_per_worker": 2000}
    policy = DOPDController(DOPDConfig(**knobs))
    toy = eight(4)
    # B* = 1000 x 0.1 = 100 sequences, batch slots 50, KV room 2000 / (100 + 200/2) = 10:
    # 10 sequences per step of 0.1 s = 100 tok/s, not the TPOT-bound 1000
    policy.decide(need_snapshot(toy, 0.0, 2.0, 100, 200))
    assert policy.last_note.numbers["decode_slots"] == pytest.approx(10.0)
    assert policy.last_note.numbers["decode_capacity_tokens_per_s"] == pytest.approx(100.0)
    assert policy.last_note.numbers["decode_need_now"] == pytest.approx(4.0)


def test_dopd_jumps_to_the_target_in_one_decision():
    policy = DOPDController(DOPDConfig(**NEED_KNOBS))
    toy = eight(4)
    # decode needs 10 x 70 / 100 = 7 workers, prefill 10 x 100 / 1000 = 1: three flips
    moved = toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 100, 70))
    assert len(moved) == 3 and toy.count(Role.DECODE) == 7
    assert "decode is short" in policy.last_note.summary
    capped = DOPDController(DOPDConfig(**NEED_KNOBS, max_flips_per_decision=1))
    toy = eight(4)
    assert len(toy.apply(capped, need_snapshot(toy, 0.0, 10.0, 100, 70))) == 1


def test_dopd_overload_splits_in_proportion_to_the_needs():
    target, why = choose_target(4, 4, need_p=9.0, need_d=3.0, hysteresis=0.3)
    assert target == 6 and "overloaded" in why
    assert choose_target(4, 4, need_p=4.2, need_d=4.0, hysteresis=0.3)[0] == 4  # dead band
    assert choose_target(4, 4, need_p=2.0, need_d=3.0, hysteresis=0.3)[0] == 4  # headroom
    # prefill short, decode can give two workers and keep its own need
    assert choose_target(4, 4, need_p=5.5, need_d=2.0, hysteresis=0.3)[0] == 6
    # measured prompt backlog with no decode queue: prefill gets what it needs
    assert choose_target(4, 4, 7.0, 4.0, 0.3, prompts_backlogged=True)[0] == 7
    assert choose_target(4, 4, 7.0, 4.0, 0.3, prompts_backlogged=True,
                         decodes_queued=True)[0] == 5


def test_dopd_sizes_a_prompt_queue_for_the_queued_mix_not_to_clear_it_in_one_ttft():
    toy = eight(1)
    # the window still says 100-token prompts; 12 prompts of 400 tokens queue on w0:
    # 4.8 s of prefill work, 4.8 workers to clear it within the 1 s TTFT target, while
    # 10 req/s of 400-token prompts keep 10 x 0.4 = 4 workers busy
    queued = {"w0": {"in_flight_prefill": 12, "prefill_tokens_in_flight": 4800}}
    policy = DOPDController(DOPDConfig(**NEED_KNOBS))
    toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 100, 10, **queued))
    numbers = policy.last_note.numbers
    assert numbers["prefill_backlog_workers"] == pytest.approx(4.8)
    assert numbers["prefill_need"] == pytest.approx(4.0)
    assert toy.count(Role.PREFILL) == 4
    # the same queue on a pool already sized for the mix: no further move
    toy_sized = eight(4)
    assert toy_sized.apply(policy, need_snapshot(toy_sized, 20.0, 10.0, 100, 10,
                                                 **queued)) == []
    # at full utilisation: the margin comes later through the regular need (10 x 0.1 / 0.8)
    margin = DOPDController(DOPDConfig(**{**NEED_KNOBS, "prefill_utilization": 0.8}))
    toy = eight(1)
    margin.decide(need_snapshot(toy, 0.0, 10.0, 100, 10, **queued))
    assert margin.last_note.numbers["prefill_need"] == pytest.approx(4.0)
    # a queued pool gives no worker to a short decode pool (5 x 90 / 100 = 4.5 workers),
    # although 5 req/s of the queued mix keep only 5 x 0.4 = 2 prefill workers busy
    hold = DOPDController(DOPDConfig(**NEED_KNOBS))
    toy = eight(4)
    assert hold.decide(need_snapshot(toy, 0.0, 5.0, 100, 90, **queued)) == []
    assert hold.last_note.numbers["prefill_need"] == pytest.approx(4.0)
    assert hold.last_note.numbers["decode_need"] == pytest.approx(4.5)
    # sized to clear the queue within one TTFT, the pool overshoots to 5
    old = DOPDController(DOPDConfig(**NEED_KNOBS, size_backlog_by_queued_mix=False))
    toy = eight(1)
    toy.apply(old, need_snapshot(toy, 0.0, 10.0, 100, 10, **queued))
    assert toy.count(Role.PREFILL) == 5


def test_dopd_hysteresis_holds_a_small_shortage_and_a_quick_reversal():
    policy = DOPDController(DOPDConfig(**NEED_KNOBS))
    toy = eight(4)
    # decode needs 4.2 workers: inside the 0.3-worker band
    assert toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 100, 42)) == []
    # a real shortage: the pool grows
    assert toy.apply(policy, need_snapshot(toy, 1.0, 10.0, 100, 60))
    n_d = toy.count(Role.DECODE)
    # the mix swings back at once: one decision per interval, then the reverse hold
    assert toy.apply(policy, need_snapshot(toy, 2.0, 10.0, 500, 10)) == []
    assert "one decision per 2s" in policy.last_note.summary
    assert toy.apply(policy, need_snapshot(toy, 5.0, 10.0, 500, 10)) == []
    assert "reverse hold" in policy.last_note.summary
    assert toy.count(Role.DECODE) == n_d
    assert toy.apply(policy, need_snapshot(toy, 12.0, 10.0, 500, 10))


def test_dopd_sees_queued_prompts_and_decodes_before_the_window_does():
    policy = DOPDController(DOPDConfig(**NEED_KNOBS))
    toy = eight(4)
    # the window still says short prompts, but 6 s of prefill work is queued per worker
    queued = {f"w{i}": {"in_flight_prefill": 3, "prefill_tokens_in_flight": 6000}
              for i in range(4)}
    snap = need_snapshot(toy, 0.0, 10.0, 100, 10, **queued)
    assert toy.apply(policy, snap)
    assert policy.last_note.numbers["prefill_backlog_workers"] == pytest.approx(24.0)
    assert toy.count(Role.PREFILL) == 7
    # decodes waiting for a slot raise the decode need although outputs look short
    policy = DOPDController(DOPDConfig(**NEED_KNOBS, max_num_seqs=10))
    toy = eight(4)
    waiting = {f"w{i}": {"in_flight_decode": 15} for i in range(4, 8)}
    policy.decide(need_snapshot(toy, 0.0, 1.0, 100, 10, **waiting))
    assert policy.last_note.numbers["decode_need"] == pytest.approx(6.0)
    assert policy.last_note.numbers["decodes_queued"] == 1


def test_dopd_round1_knobs_keep_the_work_share_target():
    policy = DOPDController(DOPDConfig(**{**NEED_KNOBS, **ROUND1_KNOBS}))
    toy = eight(4)
    moved = toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 100, 60))
    assert len(moved) == 1  # one flip per interval
    assert "prefill_share_now" in policy.last_note.numbers


# -- Arrow: inline flips on predicted misses ---------------------------------------------

def pressure(leg: Role, n: int, ratio: float = 2.0, at: float = 0.0) -> tuple:
    return tuple(SLOPressure(leg, f"r{i}", "w0", ratio * 0.1, 0.1, at) for i in range(n))


def quiet(toy: ToyCluster, t: float, **fields) -> ControlSnapshot:
    """A snapshot whose measured loads are all within target."""
    snap = toy.snapshot(t, *LONG_OUTPUTS)
    calm = {n: WorkerMetrics(n) for n in snap.metrics}
    return replace(snap, metrics=calm, **fields)


def test_arrow_flips_inline_on_predicted_decode_misses_then_guards():
    policy = ArrowController(ArrowConfig(pressure_guard_s=2.0, cooldown_s=10.0,
                                         inline_max_flips=1))
    toy = eight(4)
    assert toy.apply(policy, quiet(toy, 0.0)) == []
    moved = toy.apply(policy, quiet(toy, 1.0, pressure=pressure(Role.DECODE, 5)))
    assert len(moved) == 1 and toy.count(Role.DECODE) == 5
    assert "predicted to miss on every decode worker" in policy.last_note.summary
    # within the guard the next signals wait; after it they flip again
    assert toy.apply(policy, quiet(toy, 2.0, pressure=pressure(Role.DECODE, 5))) == []
    assert "guard" in policy.last_note.summary
    assert toy.apply(policy, quiet(toy, 3.5, pressure=pressure(Role.DECODE, 5)))
    # the other way needs the cooldown: prefill misses 1 s later are held
    assert toy.apply(policy, quiet(toy, 6.0, pressure=pressure(Role.PREFILL, 5))) == []
    assert "other way" in policy.last_note.summary
    # uncapped, misses at 3x target on a 4-worker pool move as many as prefill spares
    wide = ArrowController(ArrowConfig())
    toy = eight(4)
    moved = toy.apply(wide, quiet(toy, 0.0, pressure=pressure(Role.DECODE, 5, ratio=3.0)))
    assert len(moved) == 3 and toy.count(Role.PREFILL) == 1


def test_arrow_inline_needs_enough_signals_and_a_quiet_other_leg():
    policy = ArrowController(ArrowConfig(pressure_signals=3, pressure_fraction=0.1,
                                         pressure_window_s=0.0))  # this tick's alone
    toy = eight(4)
    assert toy.apply(policy, quiet(toy, 0.0, pressure=pressure(Role.DECODE, 2))) == []
    both = pressure(Role.DECODE, 5) + pressure(Role.PREFILL, 5)
    assert toy.apply(policy, quiet(toy, 1.0, pressure=both)) == []
    # 5 misses out of 100 arrivals since the last tick: below the 10% fraction
    assert toy.apply(policy, quiet(toy, 2.0, pressure=pressure(Role.DECODE, 5),
                                   arrival_rate_per_s=100.0)) == []
    assert toy.apply(policy, quiet(toy, 3.0, pressure=pressure(Role.DECODE, 20),
                                   arrival_rate_per_s=100.0))
    off = ArrowController(ArrowConfig(**ARROW_ROUND1))
    toy = eight(4)
    assert toy.apply(off, quiet(toy, 0.0, pressure=pressure(Role.DECODE, 50))) == []


def test_arrow_inline_counts_signals_over_its_window_at_a_low_rate():
    # 1 request/s, one predicted miss per tick: no tick holds 3, the window does
    policy = ArrowController(ArrowConfig(pressure_signals=3, pressure_window_s=3.0))
    toy = eight(4)
    low = {"arrival_rate_per_s": 1.0}
    assert toy.apply(policy, quiet(toy, 0.0, **low)) == []
    assert toy.apply(policy, quiet(toy, 1.0, pressure=pressure(Role.PREFILL, 1), **low)) == []
    assert toy.apply(policy, quiet(toy, 2.0, pressure=pressure(Role.PREFILL, 1), **low)) == []
    assert policy.last_note.numbers["prefill_pressure"] == 2
    moved = toy.apply(policy, quiet(toy, 3.0, pressure=pressure(Role.PREFILL, 1), **low))
    assert moved and toy.count(Role.PREFILL) > 4
    # the signals that made the flip are spent: one more after the guard is not enough
    assert toy.apply(policy, quiet(toy, 6.0, pressure=pressure(Role.PREFILL, 1), **low)) == []
    assert policy.last_note.numbers["prefill_pressure"] == 1
    # signals older than the window drop out
    spread = ArrowController(ArrowConfig(pressure_signals=3, pressure_window_s=3.0))
    toy = eight(4)
    for t in (0.0, 2.0, 4.0, 6.0):
        assert toy.apply(spread, quiet(toy, t, pressure=pressure(Role.PREFILL, 1), **low)) == []
    assert spread.last_note.numbers["prefill_pressure"] == 2
    # per tick (window 0) the same three ticks never flip
    per_tick = ArrowController(ArrowConfig(pressure_signals=3, pressure_window_s=0.0))
    toy = eight(4)
    for t in (0.0, 1.0, 2.0, 3.0):
        assert toy.apply(per_tick, quiet(toy, t, pressure=pressure(Role.PREFILL, 1), **low)) \
            == []


def shared_host(toy: ToyCluster, t: float, itl_per_decode_worker: float) -> ControlSnapshot:
    """Idle prefill, and a decode ITL that grows with the decode pool (workers sharing
    cores: each one added steps beside the others), over a 6 s window."""
    snap = quiet(toy, t)
    itl = itl_per_decode_worker * toy.count(Role.DECODE)
    metrics = {n: WorkerMetrics(n, itl_p90_s=itl, itl_samples=100) if role == Role.DECODE
               else WorkerMetrics(n) for n, role in toy.roles.items()}
    return replace(snap, metrics=metrics, window_s=6.0)


def test_arrow_undoes_a_move_that_made_the_grown_pool_slower_and_backs_off():
    policy = ArrowController(ArrowConfig(sustain_ticks=1, inline_flips=False,
                                         harm_backoff_s=30.0))
    toy = ToyCluster(roles={"w0": Role.PREFILL, "w1": Role.PREFILL, "w2": Role.PREFILL,
                            "w3": Role.DECODE})
    # ITL 0.15 s against 0.1 s on one decode worker: it moves one prefill worker over
    assert toy.apply(policy, shared_host(toy, 0.0, 0.15)) and toy.count(Role.DECODE) == 2
    # still over target: another worker follows before the check is due
    assert toy.apply(policy, shared_host(toy, 3.0, 0.15)) and toy.count(Role.DECODE) == 3
    # a window after the last move the decode ITL tripled (0.45 s): both moves go back
    undone = toy.apply(policy, shared_host(toy, 9.0, 0.15))
    assert sorted(undone) == ["w0", "w1"] and toy.count(Role.DECODE) == 1
    assert "made it slower" in policy.last_note.summary
    assert policy.last_note.numbers["latency_before_move_s"] == pytest.approx(0.15)
    # decode pressure persists, but moves to decode wait 30 s
    for t in (20.0, 30.0, 38.0):
        assert toy.apply(policy, shared_host(toy, t, 0.15)) == []
        assert "wait" in policy.last_note.summary
    # then it tries again; hurt again, the next wait doubles
    assert toy.apply(policy, shared_host(toy, 40.0, 0.15))
    assert toy.apply(policy, shared_host(toy, 46.0, 0.15))
    assert policy.last_note.numbers["blocked_for_s"] == 60.0
    # a move whose pool got no slower is kept
    helped = ArrowController(ArrowConfig(sustain_ticks=1, inline_flips=False))
    toy = ToyCluster(roles={"w0": Role.PREFILL, "w1": Role.PREFILL, "w2": Role.PREFILL,
                            "w3": Role.DECODE})
    assert toy.apply(helped, shared_host(toy, 0.0, 0.15))
    assert toy.apply(helped, shared_host(toy, 6.0, 0.04)) == []  # 0.08 s on two workers
    assert toy.count(Role.DECODE) == 2
    # with the check off, the slower pool keeps its worker
    off = ArrowController(ArrowConfig(sustain_ticks=1, inline_flips=False, harm_factor=0))
    toy = ToyCluster(roles={"w0": Role.PREFILL, "w1": Role.PREFILL, "w2": Role.PREFILL,
                            "w3": Role.DECODE})
    assert toy.apply(off, shared_host(toy, 0.0, 0.15))
    toy.apply(off, shared_host(toy, 6.0, 0.15))
    assert toy.count(Role.DECODE) >= 2


def test_arrow_moves_several_workers_far_past_target():
    policy = ArrowController(ArrowConfig(sustain_ticks=1))
    toy = eight(2)
    # prefill load 3 on 2 workers: 6 workers' worth, so 4 more, all the decode pool spares
    moved = toy.apply(policy, toy.snapshot(0, *LONG_PROMPTS))
    assert len(moved) > 1
    assert policy.last_note.numbers["workers_moved"] == len(moved)
    assert wanted_workers(3.0, 2, 1.0) == 4
    assert spare_workers(0.5, 6, 1.0) == 2  # 0.5 x 6 / 4 = 0.75 < 1; / 3 = 1.0 is not
    assert spare_workers(0.0, 3, 1.0) == 2  # never the last worker


def test_arrow_counts_full_decode_batches_as_load():
    policy = ArrowController(ArrowConfig(sustain_ticks=1, decode_slots=100))
    toy = eight(4)
    full = {f"w{i}": {"in_flight_decode": 150} for i in range(4, 8)}
    snap = need_snapshot(toy, 0.0, 1.0, *LONG_OUTPUTS, **full)
    snap = replace(snap, metrics={n: WorkerMetrics(n) for n in toy.roles})
    actions = policy.decide(snap)
    assert actions and actions[0].to == Role.DECODE
    assert policy.last_note.numbers["decode_load"] == pytest.approx(1.5)


def test_arrow_prefill_busy_fraction_bounds_what_prefill_gives_up():
    policy = ArrowController(ArrowConfig(prefill_tokens_per_s=1000.0,
                                         max_prefill_utilization=0.9))
    toy = eight(4)
    busy = {f"w{i}": WorkerMetrics(f"w{i}", prompt_tokens_per_s=800.0) for i in range(4)}
    snap = replace(quiet(toy, 0.0, pressure=pressure(Role.DECODE, 5)), metrics=busy)
    assert policy.decide(snap) == []  # 0.8 x 4 / 3 = 1.07 > 0.9
    assert policy.last_note.numbers["prefill_utilization"] == pytest.approx(0.8)


def test_dopd_does_not_shrink_decode_on_the_first_short_outputs():
    # the first requests to finish are the short ones: for warmup_s the decode pool moves
    # only on a queue, so an output mean of 2 tokens does not hand decode workers away
    policy = DOPDController(DOPDConfig(**{**NEED_KNOBS, "warmup_s": 10.0}))
    toy = eight(4)
    # prefill needs 4.7 workers; the decode need counts as the 4 it has, not 0.2
    assert toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 470, 2)) == []
    assert policy.last_note.numbers["decode_need"] == pytest.approx(4.0)
    assert toy.apply(policy, need_snapshot(toy, 11.0, 10.0, 470, 2))  # warmed up: it moves
    assert toy.count(Role.PREFILL) == 5


# -- DOPD and Arrow: the decodes in flight, read live ---------------------------------------

OCCUPANCY_KNOBS = {**NEED_KNOBS, "decode_estimate": "occupancy", "decode_tokens_per_s": 1000.0,
                   "decode_step_s": 0.1, "max_num_seqs": 100, "occupancy_horizon_s": 10.0}
"""100 sequences per decode worker (the TPOT-bound batch 1000 tok/s x 0.1 s = slots)."""


def decodes(toy: ToyCluster, per_worker: int, role: Role = Role.DECODE) -> dict:
    return {n: {"in_flight_decode": per_worker} for n, r in toy.roles.items() if r == role}


def test_dopd_grows_decode_while_decodes_pile_up_before_any_long_output_finishes():
    for estimate, grows in (("occupancy", True), ("flow", False)):
        policy = DOPDController(DOPDConfig(**{**OCCUPANCY_KNOBS, "decode_estimate": estimate}))
        toy = eight(6)
        # finished requests still say 10-token outputs; 40 decodes in flight: room to spare
        assert toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 100, 10,
                                               **decodes(toy, 20))) == []
        # 2 s later 120 in flight, growing 40/s: in 10 s 520, five workers' worth
        moved = toy.apply(policy, need_snapshot(toy, 2.0, 10.0, 100, 10, **decodes(toy, 60)))
        numbers = policy.last_note.numbers
        if grows:
            assert toy.count(Role.DECODE) == 6 and len(moved) == 4
            assert numbers["decode_growth_per_s"] == pytest.approx(40.0)
            assert numbers["decode_occupancy_need"] == pytest.approx(5.2)
            assert numbers["decode_flow_need"] < 1  # the finished outputs still look short
        else:
            assert moved == [] and toy.count(Role.DECODE) == 2


def test_dopd_decodes_finishing_on_relabelled_workers_do_not_hold_decode_workers():
    policy = DOPDController(DOPDConfig(**OCCUPANCY_KNOBS))
    toy = eight(1)
    backlog = {"w0": {"in_flight_prefill": 10, "prefill_tokens_in_flight": 5000}}
    # long outputs in flight on every decode worker (90 of 100 slots), 5 s of prompts
    # queued on the one prefill worker: prefill gets the workers it needs
    snap = need_snapshot(toy, 0.0, 10.0, 500, 1400, **decodes(toy, 90), **backlog)
    flipped = toy.apply(policy, snap)
    assert toy.count(Role.PREFILL) == 5
    # the flipped workers keep finishing their 90 decodes each: only the 3 x 90 on the
    # decode pool count, so the pool is not short (all workers' 630 would say 6.3 of 3)
    held = {**decodes(toy, 90), **{n: {"in_flight_decode": 90} for n in flipped}}
    assert toy.apply(policy, need_snapshot(toy, 3.0, 10.0, 500, 1400, **held)) == []
    numbers = policy.last_note.numbers
    assert numbers["decode_occupancy_need"] == pytest.approx(2.7)
    assert numbers["decodes_queued"] == 0
    assert toy.count(Role.PREFILL) == 5


def test_arrow_counts_growing_decodes_in_flight_as_decode_load():
    policy = ArrowController(ArrowConfig(sustain_ticks=1, decode_slots=100,
                                         occupancy_horizon_s=10.0, growth_window_s=3.0))
    toy = eight(6)
    calm = {n: WorkerMetrics(n) for n in toy.roles}
    first = replace(need_snapshot(toy, 0.0, 1.0, *LONG_OUTPUTS, **decodes(toy, 20)),
                    metrics=calm)
    assert policy.decide(first) == []
    # 60 per worker now and growing 40/s: (60 + 400 / 2) / 100 = 2.6 per worker
    second = replace(need_snapshot(toy, 2.0, 1.0, *LONG_OUTPUTS, **decodes(toy, 60)),
                     metrics=calm)
    actions = policy.decide(second)
    assert policy.last_note.numbers["decode_load"] == pytest.approx(2.6)
    assert actions and all(a.to == Role.DECODE for a in actions) and len(actions) > 1
    # without the projection the same pool is within target (60 of 100 slots)
    still = ArrowController(ArrowConfig(sustain_ticks=1, decode_slots=100,
                                        occupancy_horizon_s=0.0))
    toy = eight(6)
    assert still.decide(replace(need_snapshot(toy, 0.0, 1.0, *LONG_OUTPUTS,
                                              **decodes(toy, 60)), metrics=calm)) == []


def test_dopd_does_not_shrink_decode_on_the_first_decodes_in_flight():
    # right after start the decodes in flight are still climbing to their steady count:
    # for warmup_s the decode pool keeps its workers (it may grow on a pile-up)
    policy = DOPDController(DOPDConfig(**{**OCCUPANCY_KNOBS, "warmup_s": 10.0}))
    toy = eight(4)
    assert toy.apply(policy, need_snapshot(toy, 0.0, 10.0, 470, 2, **decodes(toy, 1))) == []
    assert policy.last_note.numbers["decode_need"] == pytest.approx(4.0)
    assert toy.apply(policy, need_snapshot(toy, 11.0, 10.0, 470, 2, **decodes(toy, 1)))
    assert toy.count(Role.PREFILL) == 5
