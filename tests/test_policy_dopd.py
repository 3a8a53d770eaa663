"""DOPD length-aware matching on constructed snapshots."""

from core.request import RequestInfo
from core.workers import ClusterSnapshot, Role, WorkerView
from router.policies.dopd_match import DOPDMatchConfig, DOPDMatchPolicy
from router.policies.latency_model import PrefillLatencyModel
from router.policy import POLICIES


def req(prompt, max_tokens=64, rid="r"):
    return RequestInfo(request_id=rid, prompt_tokens=prompt, max_tokens=max_tokens)


def prefill_pool(n, **loads):
    return ClusterSnapshot(tuple(
        WorkerView(f"p{i}", "u", Role.PREFILL, **loads.get(f"p{i}", {})) for i in range(n)))


def warmed(lengths, **cfg):
    policy = DOPDMatchPolicy(DOPDMatchConfig(min_samples=4, **cfg),
                             PrefillLatencyModel(a=1e-6, b=1e-4, c=0.0))
    for n in lengths:
        policy.observe_prompt(n)
    return policy


def test_registered():
    assert POLICIES["dopd-match"] is DOPDMatchPolicy


def test_no_split_until_enough_samples():
    policy = DOPDMatchPolicy(DOPDMatchConfig(min_samples=16))
    assert policy.threshold() is None
    short, long_, _ = policy.split(prefill_pool(4).workers)
    assert len(short) == 4 and long_ == ()


def test_long_pool_sized_by_convex_work_share():
    # 80 % of prompts are 100 tokens, 20 % are 2000: by count the long class is 20 %,
    # by (convex) prefill work it is ~94 %, so it gets 3 of 4 workers.
    policy = warmed([100] * 80 + [2000] * 20, long_quantile=0.8)
    assert 100 <= policy.threshold() < 2000
    short, long_, _ = policy.split(prefill_pool(4).workers)
    assert [w.name for w in short] == ["p0"]
    assert [w.name for w in long_] == ["p1", "p2", "p3"]


def test_short_and_long_requests_land_in_their_own_pools():
    policy = warmed([100] * 50 + [1000] * 50, long_quantile=0.5)
    cluster = prefill_pool(4)
    short_names = {w.name for w in policy.split(cluster.workers)[0]}
    long_names = {w.name for w in policy.split(cluster.workers)[1]}
    assert policy.pick_prefill(req(90), cluster) in short_names
    assert policy.pick_prefill(req(3000), cluster) in long_names


def test_within_pool_least_queued_work_wins():
    policy = warmed([100] * 50 + [1000] * 50, long_quantile=0.5)
    cluster = prefill_pool(4, p1={"in_flight_prefill": 1, "prefill_tokens_in_flight": 1500},
                           p2={"in_flight_prefill": 1, "prefill_tokens_in_flight": 900})
    # p1..p3 form the long pool (most of the work); p3 is idle
    assert policy.pick_prefill(req(3000), cluster) == "p3"


def test_spills_into_idle_other_pool_when_own_pool_is_busy():
    policy = warmed([100] * 50 + [1000] * 50, long_quantile=0.5)
    busy = {"in_flight_prefill": 1, "prefill_tokens_in_flight": 2000}
    cluster = prefill_pool(4, p0=busy)  # the only short-pool worker is busy; p1..p3 idle
    assert policy.pick_prefill(req(50), cluster) in {"p1", "p2", "p3"}


def test_decode_balances_footprint_not_request_count():
    policy = DOPDMatchPolicy(DOPDMatchConfig(expected_output_tokens=100))
    cluster = ClusterSnapshot((
        WorkerView("d1", "u", Role.DECODE, in_flight_decode=1, decode_tokens_in_flight=1800),
        WorkerView("d2", "u", Role.DECODE, in_flight_decode=5, decode_tokens_in_flight=600),
    ))
    assert policy.pick_decode(req(500), cluster) == "d2"
    assert policy.pick_decode(req(500), cluster, exclude=frozenset({"d2"})) == "d1"
    assert policy.pick_decode(req(500), ClusterSnapshot(())) is None


def test_small_prefill_pool_is_one_shared_pool():
    policy = warmed([100] * 80 + [2000] * 20, long_quantile=0.8)
    short, long_, _ = policy.split(prefill_pool(3).workers)
    assert len(short) == 3 and long_ == ()
    short, long_, _ = policy.split(prefill_pool(4).workers)
    assert long_ != ()
    round1 = warmed([100] * 80 + [2000] * 20, long_quantile=0.8, min_split_workers=2)
    assert round1.split(prefill_pool(3).workers)[1] != ()


def test_spills_into_the_other_sub_pool_on_queue_imbalance():
    policy = warmed([100] * 80 + [2000] * 20, long_quantile=0.8)
    short, long_, _ = policy.split(prefill_pool(4).workers)
    # every short-pool worker has a deep queue, the long pool a light one: a short prompt
    # finishes sooner there by more than the spill ratio
    loads = {w.name: {"in_flight_prefill": 5, "prefill_tokens_in_flight": 5000} for w in short}
    loads.update({w.name: {"in_flight_prefill": 1, "prefill_tokens_in_flight": 100}
                  for w in long_})
    assert policy.pick_prefill(req(100), prefill_pool(4, **loads)) in {w.name for w in long_}
    # a mild imbalance keeps the request in its own sub-pool
    loads.update({w.name: {"in_flight_prefill": 1, "prefill_tokens_in_flight": 150}
                  for w in short})
    assert policy.pick_prefill(req(100), prefill_pool(4, **loads)) in {w.name for w in short}
    # round 1 spilled only into an idle sub-pool
    idle_only = warmed([100] * 80 + [2000] * 20, long_quantile=0.8, spill_on_idle_only=True)
    loads.update({w.name: {"in_flight_prefill": 5, "prefill_tokens_in_flight": 5000}
                  for w in short})
    assert idle_only.pick_prefill(req(100), prefill_pool(4, **loads)) in {
        w.name for w in short}
