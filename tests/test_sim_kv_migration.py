"""ARES migration that moves the KV in the simulator (`SimConfig.migration="kv"`): the target
pulls the context over the link like a P/D decode, prefills nothing, and the stream keeps
its first token; the source holds the KV until the pull is done. The planner prices the
move with the simulator's own link model."""

from __future__ import annotations

import json

import pytest

from benchmarks.arrivals import TraceEntry
from benchmarks.dataset import BenchRequest
from benchmarks.metrics import SLO
from benchmarks.sim.engine import Engine, SimRequest
from benchmarks.sim.perf import roofline
from benchmarks.sim.simulator import ITER_END, SimConfig, Simulator
from core.workers import Role
from router.length_predictor import MeanLengthBaseline
from router.policies.ares import AresDecodePolicy, MigrationCost, RecomputeCost
from router.rebalance import KV_MOVE_COST, default_planner, link_move_cost

PERF = roofline("llama-3.1-8b", "h100")
PROMPT, OUTPUT = 200, 500


class ForcedMove(Simulator):
    """Moves request 0 to the other decode worker at the first rebalance tick where it is
    decoding (through the same eviction path as the planner's moves), and records the
    state around the move."""

    def __init__(self, migration: str, slo: SLO | None = None) -> None:
        config = SimConfig(prefill=1, decode=2, rebalance_interval_s=0.05,
                           migration=migration, slo=slo or SLO())
        super().__init__(config, PERF, AresDecodePolicy(MeanLengthBaseline(float(OUTPUT))))
        self.before: dict = {}
        self.src_kv_after_move = -1
        self.src_kv_after_pull = -1

    def _rebalance_tick(self, now: float) -> None:
        if self.before:
            return
        for src in self.engines:
            if src.role == Role.DECODE and any(e[2].rid == 0 for e in src.running):
                dst = next(e for e in self.engines if e.role == Role.DECODE and e is not src)
                self._evictions[src.idx] = (self._reqs[0], dst)
                end = src.interrupt(now)
                if end is not None:
                    self._push(end, ITER_END, src, src.version)
                return

    def _migrate(self, src: Engine, req: SimRequest, dst: Engine, now: float) -> None:
        self.before = {"first_token": req.first_token, "src_kv": src.kv_used,
                       "held": req.kv_held, "dst_prefilled": dst.prompt_tokens_done,
                       "src": src, "dst": dst}
        super()._migrate(src, req, dst, now)
        self.before["context"] = req.prompt  # prompt + generated so far
        self.src_kv_after_move = src.kv_used

    def _transfer_done(self, req: SimRequest, need: int, now: float) -> None:
        super()._transfer_done(req, need, now)
        if req.moved:
            self.src_kv_after_pull = self.before["src"].kv_used


def forced(migration: str, slo: SLO | None = None) -> tuple[ForcedMove, object]:
    sim = ForcedMove(migration, slo)
    res = sim.run([TraceEntry(0.0, BenchRequest("x " * PROMPT, PROMPT, OUTPUT))])
    assert sim.before, "request 0 should have been moved"
    return sim, res


def test_a_kv_move_pulls_the_context_and_keeps_the_stream() -> None:
    sim, res = forced("kv")
    b = sim.before
    src, dst = b["src"], b["dst"]
    assert res.migrations == [(res.migrations[0][0], "0", src.name, dst.name)]
    assert PROMPT < b["context"] < PROMPT + OUTPUT  # it moved mid-stream
    # every output token once, one first token: the target decoded only the rest
    assert not res.failed.any() and res.finish_count.tolist() == [1]
    assert res.output_tokens.tolist() == [OUTPUT] and res.prompt_tokens.tolist() == [PROMPT]
    assert src.tokens_generated + dst.tokens_generated == OUTPUT
    assert dst.tokens_generated == PROMPT + OUTPUT - b["context"]
    assert res.gap_log[:, 2].sum() == OUTPUT - 1  # the target's first token ends a gap
    # the stream's first token is the one streamed before the move
    assert res.first_token[0] == b["first_token"]
    # no prefill on the target; the source held the KV until the pull was done
    assert dst.prompt_tokens_done == b["dst_prefilled"]
    assert b["held"] > 0 and sim.src_kv_after_move == b["src_kv"]
    assert sim.src_kv_after_pull == b["src_kv"] - b["held"]
    assert all(e.kv_used == 0 for e in sim.engines)


def test_a_recompute_move_prefills_the_context_on_the_target() -> None:
    sim, res = forced("recompute")
    b = sim.before
    assert res.migrations and res.finish_count.tolist() == [1]
    assert res.output_tokens.tolist() == [OUTPUT]
    assert b["dst"].prompt_tokens_done == b["dst_prefilled"] + b["context"]
    assert sim.src_kv_after_move == b["src_kv"] - b["held"]  # freed at once
    assert sim.src_kv_after_pull == -1  # nothing was pulled
    assert res.first_token[0] == b["first_token"]  # streamed before the move, not again


def test_a_kv_move_keeps_the_slow_gaps_counted_on_the_source() -> None:
    # every step slower than the target: each of the stream's gaps is slow, on both sides
    _, res = forced("kv", SLO(tbt_ms=1e-6))
    assert res.slow_gaps.tolist() == [OUTPUT - 1]


def test_the_planner_moves_with_the_kv_off_a_hot_worker() -> None:
    from tests.test_sim_migration import OUTPUTS, AllOnW1

    trace = [TraceEntry(0.01 * i, BenchRequest("x " * 200, 200, out))
             for i, out in enumerate(OUTPUTS)]
    policy = AllOnW1()
    sim = Simulator(SimConfig(prefill=1, decode=2, rebalance_interval_s=0.5, migration="kv"),
                    PERF, policy)
    res = sim.run(trace)
    assert res.migrations and [(r, d) for _, r, _, d in res.migrations] == policy.moved
    assert not res.failed.any() and (res.finish_count == 1).all()
    assert res.output_tokens.tolist() == OUTPUTS
    w2 = sim.by_name["w2"]
    assert w2.tokens_generated > 0 and w2.prompt_tokens_done == 0  # decoded, never prefilled
    assert all(e.kv_used == 0 for e in sim.engines)


def test_the_sim_planner_prices_a_kv_move_by_its_link() -> None:
    policy = AresDecodePolicy(MeanLengthBaseline(100.0))
    sim = Simulator(SimConfig(prefill=1, decode=2, migration="kv"), PERF, policy)
    cost = sim.driver.planner.cost
    assert cost == MigrationCost(fixed_s=PERF.eff.link_latency_s,
                                 per_token_s=PERF.kv_bytes_per_token / PERF.link_bytes_s)
    assert cost == link_move_cost(PERF.kv_bytes_per_token, PERF.link_bytes_s,
                                  PERF.eff.link_latency_s)
    # what a simulated transfer of that context takes
    assert cost.seconds(1000) == pytest.approx(
        1000 * sim.kv_bytes / sim.link_bytes_s + sim.link_latency_s)
    recompute = Simulator(SimConfig(prefill=1, decode=2), PERF,
                          AresDecodePolicy(MeanLengthBaseline(100.0)))
    assert isinstance(recompute.driver.planner.cost, RecomputeCost)
    # the live gateway's default is unchanged
    assert default_planner(moves_kv=True).cost is KV_MOVE_COST


def test_migration_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="migration"):
        SimConfig(migration="teleport")


def test_sim_cli_takes_the_migration_mode(tmp_path) -> None:
    from benchmarks.sim.cli import main

    out = tmp_path / "kv.json"
    assert main(["--dataset", "random", "--input-len", "128", "--output-len", "32",
                 "--num-prompts", "100", "--request-rate", "20", "--prefill", "1",
                 "--decode", "2", "--policy", "ares", "--migration", "kv",
                 "--result-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["migration"] == "kv" and result["completed"] == 100
