"""ARES decode balancing and the migration decision, on constructed state."""

import pytest

from core.feedback import ResidentRequest
from core.request import RequestInfo
from core.workers import ClusterSnapshot, Role, WorkerView
from router.length_predictor import DecodeState, MeanLengthBaseline
from router.policies.ares import (
    AresDecodePolicy,
    MigrationConfig,
    MigrationCost,
    MigrationPlanner,
    RecomputeCost,
)
from router.policies.latency_model import PrefillLatencyModel
from router.policy import POLICIES


class LookupPredictor:
    """Remaining = a fixed total per prompt length, minus what was generated."""

    def __init__(self, totals):
        self.totals = totals

    def remaining(self, state: DecodeState) -> float:
        return max(0.0, self.totals[state.prompt.prompt_tokens] - state.generated)


def req(rid, prompt, max_tokens=4096):
    return RequestInfo(request_id=rid, prompt_tokens=prompt, max_tokens=max_tokens)


def decoders(**tokens):
    return ClusterSnapshot(tuple(WorkerView(n, "u", Role.DECODE, decode_tokens_in_flight=t)
                                 for n, t in tokens.items()))


def test_registered_with_default_predictor():
    policy = POLICIES["ares"]()
    assert policy.predictor.remaining(DecodeState(prompt=_features(100))) > 0


def _features(n):
    from router.length_predictor import PromptFeatures

    return PromptFeatures(n)


def test_decode_counts_predicted_future_tokens_not_only_current():
    policy = AresDecodePolicy(LookupPredictor({10: 2000, 11: 50, 12: 50}))
    cluster = decoders(d1=0, d2=0)
    assert policy.pick_decode(req("long", 10), cluster) == "d1"
    # Equal current tokens in the snapshot, but d1 holds 2000 predicted future tokens.
    assert policy.pick_decode(req("a", 11), cluster) == "d2"
    assert policy.predicted_future_tokens("d1") == 2000
    # Snapshot load can outweigh predictions: d2 now resident-heavy.
    assert policy.pick_decode(req("b", 12), decoders(d1=0, d2=5000)) == "d1"


def test_progress_refresh_and_finish_update_the_ledger():
    policy = AresDecodePolicy(LookupPredictor({10: 1000}))
    policy.pick_decode(req("r", 10), decoders(d1=0))
    policy.observe_progress("r", 400)
    assert policy.predicted_future_tokens("d1") == 600
    (resident,) = policy.residents()["d1"]
    assert resident.context_tokens == 410 and resident.predicted_remaining == 600
    policy.observe_finished("r")
    assert policy.predicted_future_tokens("d1") == 0


def test_migration_and_re_placement_move_the_ledger():
    policy = AresDecodePolicy(LookupPredictor({10: 1000, 11: 300}))
    policy.pick_decode(req("r", 10), decoders(d1=0, d2=5000))
    policy.pick_decode(req("s", 11), decoders(d1=0, d2=5000))
    assert policy.predicted_future_tokens("d1") == 1300
    policy.observe_migrated("r", "d2")
    assert policy.predicted_future_tokens("d1") == 300
    assert policy.predicted_future_tokens("d2") == 1000
    policy.pick_decode(req("s", 11), decoders(d1=9000, d2=0))  # a retry lands elsewhere
    assert policy.predicted_future_tokens("d1") == 0
    assert policy.predicted_future_tokens("d2") == 1300


def test_max_tokens_caps_the_prediction():
    policy = AresDecodePolicy(LookupPredictor({10: 1000}))
    policy.pick_decode(req("r", 10, max_tokens=100), decoders(d1=0))
    assert policy.predicted_future_tokens("d1") == 100


def test_prefill_least_loaded_and_empty_pools():
    policy = AresDecodePolicy(MeanLengthBaseline(100))
    cluster = ClusterSnapshot((
        WorkerView("p1", "u", Role.PREFILL, prefill_tokens_in_flight=500),
        WorkerView("p2", "u", Role.PREFILL, prefill_tokens_in_flight=100),
    ))
    assert policy.pick_prefill(req("r", 10), cluster) == "p2"
    assert policy.pick_decode(req("r", 10), ClusterSnapshot(())) is None


# -- migration decision ------------------------------------------------------------------

def linear_step(worker: str, tokens: float) -> float:
    return 0.01 + 1e-5 * tokens


def planner(**cfg):
    return MigrationPlanner(linear_step, MigrationCost(fixed_s=0.05, per_token_s=1e-4),
                            MigrationConfig(**cfg))


def test_balanced_cluster_moves_nothing():
    residents = {
        "d1": [ResidentRequest("a", 1000, 500)],
        "d2": [ResidentRequest("b", 1000, 500)],
    }
    assert planner().decide(residents) is None


def test_moves_the_long_remaining_request_from_hot_to_cool():
    residents = {
        "hot": [ResidentRequest("long", 1000, 2000), ResidentRequest("short", 1000, 70),
                ResidentRequest("x", 4000, 300), ResidentRequest("y", 4000, 300)],
        "cool": [ResidentRequest("z", 200, 100)],
    }
    decision = planner(horizon_steps=512).decide(residents)
    assert decision is not None
    assert (decision.request_id, decision.source, decision.target) == ("long", "hot", "cool")
    assert decision.gain_s > decision.cost_s


def test_cost_decides_between_moving_and_staying():
    residents = {
        "hot": [ResidentRequest("a", 6000, 80), ResidentRequest("b", 6000, 80)],
        "cool": [ResidentRequest("c", 100, 80)],
    }
    # Gain over the 80 remaining steps is 80 * 0.059 = 4.72 s of decode time.
    cheap = MigrationPlanner(linear_step, MigrationCost(0.05, 1e-4), MigrationConfig())
    decision = cheap.decide(residents)
    assert decision is not None and decision.gain_s == pytest.approx(4.72)
    assert decision.cost_s == pytest.approx(0.65)
    # A re-prefill-like cost (1 ms per context token: 6.05 s) no longer pays for itself.
    dear = MigrationPlanner(linear_step, MigrationCost(0.05, 1e-3), MigrationConfig())
    assert dear.decide(residents) is None


def test_guards_min_remaining_and_migration_cap():
    residents = {
        "hot": [ResidentRequest("done-soon", 3000, 10),
                ResidentRequest("moved", 3000, 3000, migrations=1)],
        "cool": [],
    }
    assert planner(min_remaining=64, max_migrations_per_request=1).decide(residents) is None


def test_gain_formula_on_a_small_case():
    p = planner(horizon_steps=100)
    r = ResidentRequest("r", 900, 100)  # weight 1000 tokens over 100 steps
    gain = p.gain_seconds(r, "s", "d", w_src=3000, n_src=3, w_dst=0, n_dst=0)
    # per step: 2 requests save 1e-5*1000 each; r goes from 0.04 to 0.02 s; nobody on d
    assert gain == pytest.approx(100 * (2 * 0.01 + (0.04 - 0.02)))


def test_recompute_cost_prices_the_prefill_and_the_targets_stall():
    cost = RecomputeCost(PrefillLatencyModel(a=0.0, b=1e-4, c=0.01), fixed_s=0.05)
    # T(2000) = 0.21 s; the moved request and both residents of the target wait that long
    assert cost.seconds(2000) == pytest.approx(0.26)
    assert cost.seconds(2000, target_residents=2) == pytest.approx(0.05 + 3 * 0.21)
    assert MigrationCost(0.05, 1e-4).seconds(2000, target_residents=2) == pytest.approx(0.25)


def test_planner_prices_a_recompute_by_default_and_counts_target_residents():
    residents = {
        "hot": [ResidentRequest("a", 6000, 80), ResidentRequest("b", 6000, 80)],
        "cool": [ResidentRequest("c", 100, 80)],
    }
    # the KV-pull price of test_cost_decides_between_moving_and_staying moves "a" ...
    assert planner().decide(residents) is not None
    # ... the recompute it really is (T(6000) = 2.41 s at 2500 prompt tokens/s, paid by the
    # moved request and the target's resident: 4.87 s > the 4.72 s gain) does not
    recompute = MigrationPlanner(linear_step, RecomputeCost(
        PrefillLatencyModel(a=0.0, b=4e-4, c=0.01)), MigrationConfig())
    assert recompute.decide(residents) is None
    assert isinstance(MigrationPlanner(linear_step).cost, RecomputeCost)
    cheap = MigrationPlanner(linear_step, RecomputeCost(
        PrefillLatencyModel(a=0.0, b=1e-6, c=0.0), fixed_s=0.0), MigrationConfig())
    decision = cheap.decide(residents)
    assert decision is not None and decision.cost_s == pytest.approx(2 * 6000 * 1e-6)


def test_the_gateways_planner_prices_what_its_moves_do() -> None:
    from router.rebalance import KV_MOVE_COST, default_planner

    kv, recompute = default_planner(moves_kv=True), default_planner()
    assert kv.cost is KV_MOVE_COST and isinstance(recompute.cost, RecomputeCost)
    # moving 4000 tokens of context: a pull costs a fraction of re-prefilling them, and
    # does not stall the target's residents, which a recompute does
    assert kv.cost.seconds(4000) < recompute.cost.seconds(4000) / 3
    assert kv.cost.seconds(4000, target_residents=8) == kv.cost.seconds(4000)
    assert recompute.cost.seconds(4000, target_residents=8) > 8 * recompute.cost.seconds(4000)
