"""ARES rebalancing in the simulator: the gateway's planner, driven through the PolicyDriver,
moves running decodes; the target recomputes the context and the request finishes once with
its full length."""

from __future__ import annotations

from benchmarks.arrivals import TraceEntry
from benchmarks.dataset import BenchRequest
from benchmarks.sim.perf import roofline
from benchmarks.sim.simulator import SimConfig, Simulator
from core.request import RequestInfo
from core.workers import ClusterSnapshot
from router.length_predictor import MeanLengthBaseline
from router.policies.ares import AresDecodePolicy

OUTPUTS = [1500 + 37 * i for i in range(24)]


class AllOnW1(AresDecodePolicy):
    """ARES that places every decode on w1 (a skew only migrations can fix); logs moves."""

    def __init__(self) -> None:
        super().__init__(MeanLengthBaseline(1500.0))
        self.moved: list[tuple[str, str]] = []
        self.progress: list[tuple[str, int]] = []

    def pick_decode(self, request: RequestInfo, cluster: ClusterSnapshot,
                    exclude: frozenset[str] = frozenset()) -> str | None:
        only = ClusterSnapshot(tuple(w for w in cluster.workers if w.name == "w1"),
                               cluster.taken_at)
        return super().pick_decode(request, only, exclude)

    def observe_progress(self, request_id: str, generated: int) -> None:
        self.progress.append((request_id, generated))
        super().observe_progress(request_id, generated)

    def observe_migrated(self, request_id: str, target: str) -> None:
        self.moved.append((request_id, target))
        super().observe_migrated(request_id, target)


def run(rebalance_s: float) -> tuple[AllOnW1, object]:
    trace = [TraceEntry(0.01 * i, BenchRequest("x " * 200, 200, out))
             for i, out in enumerate(OUTPUTS)]
    policy = AllOnW1()
    config = SimConfig(prefill=1, decode=2, rebalance_interval_s=rebalance_s)
    return policy, Simulator(config, roofline("llama-3.1-8b", "h100"), policy).run(trace)


def test_the_planner_moves_decodes_off_the_hot_worker() -> None:
    policy, res = run(rebalance_s=0.5)
    assert res.migrations, "a 24-on-0 skew should be rebalanced"
    assert [(rid, dst) for _, rid, _, dst in res.migrations] == policy.moved
    assert all(src == "w1" and dst == "w2" for _, _, src, dst in res.migrations)
    assert not res.failed.any() and (res.finish_count == 1).all()
    assert res.output_tokens.tolist() == OUTPUTS  # every token generated once, somewhere
    assert res.prompt_tokens.tolist() == [200] * len(OUTPUTS)
    assert policy.progress and all(0 < g < 3000 for _, g in policy.progress)
    assert res.busy_s["w2"] > 0  # the target really computed the moved requests


def test_no_rebalancing_when_disabled() -> None:
    policy, res = run(rebalance_s=0.0)
    assert not res.migrations and not policy.moved and not policy.progress
    assert res.busy_s["w2"] == 0
