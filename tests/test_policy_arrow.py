"""Arrow dispatch on constructed cluster snapshots."""

from dataclasses import replace

import pytest

from core.request import RequestInfo
from core.routing import RoutingPolicy
from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView
from router.policies.arrow import ArrowRouting, ArrowTargets
from router.policies.latency_model import LatencyPriors
from router.policy import POLICIES, make_policy

FLAT = LatencyPriors(prefill_a=0.0, prefill_b=1e-3, prefill_c=0.0, decode_m=1e-5, decode_c0=0.01)


def req(prompt=100, rid="r1", tbt=None):
    return RequestInfo(request_id=rid, prompt_tokens=prompt, max_tokens=64, tbt_target_s=tbt)


def snap(*workers):
    return ClusterSnapshot(tuple(workers), taken_at=123.0)


def test_registered_and_satisfies_protocol():
    assert POLICIES["arrow"] is ArrowRouting
    assert isinstance(make_policy("arrow"), RoutingPolicy)


def test_prefill_goes_to_lowest_predicted_ttft_queue_included():
    policy = ArrowRouting(ArrowTargets(ttft_s=10.0), FLAT)
    cluster = snap(
        WorkerView("p1", "u", Role.PREFILL, in_flight_prefill=2, prefill_tokens_in_flight=2000),
        WorkerView("p2", "u", Role.PREFILL, in_flight_prefill=1, prefill_tokens_in_flight=500),
        WorkerView("d1", "u", Role.DECODE),
    )
    assert policy.pick_prefill(req(100), cluster) == "p2"
    assert policy.predicted_ttft(cluster.by_name("p2"), 100) == 0.6


def test_fitted_models_change_the_choice():
    """Same queues, but p2 is measured to be much slower: Arrow moves to p1."""
    policy = ArrowRouting(ArrowTargets(ttft_s=100.0), FLAT)
    for n in (100, 200, 400, 800):
        policy.observe_prefill("p2", n, 0.02 * n)  # 20x slower than the prior
    cluster = snap(
        WorkerView("p1", "u", Role.PREFILL, in_flight_prefill=2, prefill_tokens_in_flight=2000),
        WorkerView("p2", "u", Role.PREFILL, in_flight_prefill=1, prefill_tokens_in_flight=500),
    )
    assert policy.pick_prefill(req(100), cluster) == "p1"


def test_prefill_prefers_worker_without_decode_work_among_feasible():
    policy = ArrowRouting(ArrowTargets(ttft_s=10.0), FLAT)
    cluster = snap(
        WorkerView("p1", "u", Role.PREFILL, decode_tokens_in_flight=300),
        WorkerView("p2", "u", Role.PREFILL, in_flight_prefill=1, prefill_tokens_in_flight=200),
    )
    assert policy.pick_prefill(req(100), cluster) == "p2"


def test_no_feasible_prefill_reports_pressure_and_falls_back_to_cheapest():
    seen = []
    policy = ArrowRouting(ArrowTargets(ttft_s=0.5), FLAT, pressure_sink=seen.append)
    cluster = snap(
        WorkerView("p1", "u", Role.PREFILL, in_flight_prefill=1, prefill_tokens_in_flight=900),
        WorkerView("p2", "u", Role.PREFILL, in_flight_prefill=1, prefill_tokens_in_flight=700),
    )
    assert policy.pick_prefill(req(100, rid="x"), cluster) == "p2"
    assert len(seen) == 1 and seen[0].leg == Role.PREFILL and seen[0].fallback == "p2"
    assert seen[0].predicted_s > seen[0].target_s == 0.5
    assert [s.request_id for s in policy.pressure.drain()] == ["x"]
    assert policy.pressure.drain() == []


def test_decode_picks_feasible_worker_with_lowest_predicted_tpot():
    policy = ArrowRouting(ArrowTargets(tpot_s=0.05), FLAT)  # MT = (0.05-0.01)/1e-5 = 4000
    cluster = snap(
        WorkerView("d1", "u", Role.DECODE, decode_tokens_in_flight=3000),
        WorkerView("d2", "u", Role.DECODE, decode_tokens_in_flight=1000),
        WorkerView("d3", "u", Role.DECODE, decode_tokens_in_flight=3950),
    )
    assert policy.pick_decode(req(100), cluster) == "d2"
    assert policy.pick_decode(req(100), cluster, exclude=frozenset({"d2"})) == "d1"
    assert policy.pressure.drain() == []


def test_decode_fill_packs_the_busiest_worker_within_the_fill_then_spreads():
    # tpot 50 ms, fill 0.5: a worker is filled while its predicted step is <= 25 ms,
    # i.e. below 1500 resident tokens with the request (10 ms + 1e-5 s/token)
    policy = ArrowRouting(ArrowTargets(tpot_s=0.05, decode_fill=0.5), FLAT)
    busy = WorkerView("d1", "u", Role.DECODE, in_flight_decode=9, decode_tokens_in_flight=1300)
    idle = WorkerView("d2", "u", Role.DECODE)
    assert policy.pick_decode(req(100), snap(busy, idle)) == "d1"
    # past the fill the lowest predicted TPOT wins again, within the target
    fuller = replace(busy, decode_tokens_in_flight=1450)
    assert policy.pick_decode(req(100), snap(fuller, idle)) == "d2"
    # a worker with prefill work queued is packed last
    mixed = replace(busy, prefill_tokens_in_flight=200)  # e.g. relabelled from prefill
    light = replace(idle, in_flight_decode=1, decode_tokens_in_flight=100)
    assert policy.pick_decode(req(100), snap(mixed, light)) == "d2"
    # 0 spreads: the lowest predicted TPOT, even where a model predicts a free step
    assert ArrowRouting(ArrowTargets(tpot_s=0.05, decode_fill=0.0), FLAT).pick_decode(
        req(100), snap(busy, idle)) == "d2"
    free = LatencyPriors(decode_m=0.0, decode_c0=0.0)
    assert ArrowRouting(ArrowTargets(tpot_s=0.05, decode_fill=0.0), free).pick_decode(
        req(100), snap(replace(idle, name="d0"), busy)) == "d0"  # a tie: by name
    assert policy.pressure.drain() == []


def test_decode_uses_request_tbt_target_and_reports_when_none_fits():
    policy = ArrowRouting(ArrowTargets(tpot_s=1.0), FLAT)
    cluster = snap(
        WorkerView("d1", "u", Role.DECODE, decode_tokens_in_flight=3000),
        WorkerView("d2", "u", Role.DECODE, decode_tokens_in_flight=2000),
    )
    # 10 ms floor + 1e-5 s/token: no worker can hold a 20 ms target with 2000+ tokens
    assert policy.pick_decode(req(100, tbt=0.02), cluster) == "d2"
    (signal,) = policy.pressure.drain()
    assert signal.leg == Role.DECODE and signal.target_s == 0.02


def test_decode_measured_slowness_excludes_a_worker():
    policy = ArrowRouting(ArrowTargets(tpot_s=0.05), FLAT)
    for b in (100, 500, 1000):
        policy.observe_decode("d2", b, 0.2)  # d2 is measured far above target
    cluster = snap(
        WorkerView("d1", "u", Role.DECODE, decode_tokens_in_flight=3000),
        WorkerView("d2", "u", Role.DECODE, decode_tokens_in_flight=10),
    )
    assert policy.pick_decode(req(100), cluster) == "d1"


def test_empty_pools_and_unroutable_workers():
    policy = ArrowRouting(priors=FLAT)
    assert policy.pick_prefill(req(), snap()) is None
    assert policy.pick_decode(req(), snap()) is None
    cluster = snap(WorkerView("a", "u", Role.DECODE),
                   WorkerView("b", "u", Role.PREFILL, state=WorkerState.DRAINING))
    assert policy.pick_prefill(req(), cluster) == "a"  # no prefill pool: any routable worker
    assert policy.pick_decode(req(), cluster, exclude=frozenset({"a"})) is None


def test_full_decode_batch_queues_and_misses_although_its_step_meets_tpot():
    # one step at 1000 resident tokens is 0.01 + 0.01 = 20 ms < 40 ms, but every slot is
    # taken: the request waits ~(queued + 1) x step x E[OSL] / slots for one to free up
    seen = []
    policy = ArrowRouting(ArrowTargets(tpot_s=0.04, decode_slots=4, expected_output_tokens=100),
                          FLAT, pressure_sink=seen.append)
    full = WorkerView("d1", "u", Role.DECODE, in_flight_decode=5, decode_tokens_in_flight=900)
    free = WorkerView("d2", "u", Role.DECODE, in_flight_decode=3, decode_tokens_in_flight=900)
    # two requests ahead of it beyond the 4 slots: the third slot to free is its own
    assert policy.predicted_tpot(full, 100, 64) == pytest.approx(0.02 + 3 * 0.02 * 64 / 4)
    assert policy.predicted_tpot(free, 100, 64) == pytest.approx(0.02)
    assert policy.pick_decode(req(100), snap(full, free)) == "d2"
    assert policy.pick_decode(req(100, rid="r2"), snap(full)) == "d1"
    assert [s.leg for s in seen] == [Role.DECODE]
    unlimited = ArrowRouting(ArrowTargets(tpot_s=0.04, decode_slots=0), FLAT)
    assert unlimited.predicted_tpot(full, 100) == pytest.approx(0.02)


def test_decode_without_kv_room_queues():
    policy = ArrowRouting(ArrowTargets(tpot_s=0.04, kv_tokens=1000,
                                       expected_output_tokens=100), FLAT)
    roomy = WorkerView("d1", "u", Role.DECODE, in_flight_decode=1, decode_tokens_in_flight=500)
    assert policy.predicted_tpot(roomy, 100, 64) == pytest.approx(0.016)
    tight = WorkerView("d1", "u", Role.DECODE, in_flight_decode=1, decode_tokens_in_flight=900)
    assert policy.predicted_tpot(tight, 100, 64) > 0.04
    reported_full = WorkerView("d1", "u", Role.DECODE, kv_cache_usage=0.99)
    assert policy.predicted_tpot(reported_full, 100, 64) > policy.predicted_tpot(
        replace(reported_full, kv_cache_usage=0.5), 100, 64)


def test_a_worker_without_samples_is_predicted_with_the_best_fitted_model():
    slow_prior = LatencyPriors(decode_m=1e-5, decode_c0=0.03)
    cluster = snap(WorkerView("d1", "u", Role.DECODE, in_flight_decode=30,
                              decode_tokens_in_flight=3000),
                   WorkerView("d2", "u", Role.DECODE))

    def fitted(targets: ArrowTargets) -> ArrowRouting:
        policy = ArrowRouting(targets, slow_prior)
        for i in range(30):  # d1 measured at 5 ms + 1 us per resident token
            b = 100 * (i + 1)
            policy.observe_decode("d1", b, 0.005 + 1e-6 * b)
        return policy

    # borrowing d1's fit, the empty d2 is the faster worker and gets the request (spread;
    # packing would keep filling d1)
    assert fitted(ArrowTargets(tpot_s=0.05, decode_fill=0.0)).pick_decode(
        req(100), cluster) == "d2"
    # on its prior alone d2 looks slower than the loaded d1, so it would never get work
    # (and never the samples to look better)
    never = fitted(ArrowTargets(tpot_s=0.05, decode_fill=0.0, min_fit_samples=1000))
    assert never.pick_decode(req(100), cluster) == "d1"
