"""Engine model and per-token timing: the overlap term, inter-token gaps, tbt goodput."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.arrivals import TraceEntry
from benchmarks.dataset import BenchRequest
from benchmarks.metrics import SLO, RequestTimeline, meets_tbt, summarize, summarize_arrays
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.oracle import OracleSchedule
from benchmarks.sim.perf import roofline
from benchmarks.sim.simulator import SimConfig, Simulator
from router.policy import LeastLoadedPolicy


def test_a_decode_sharing_a_step_with_a_prefill_chunk_is_slower_than_alone():
    perf = roofline("llama-3.1-8b", "h100")
    overhead = perf.eff.iteration_overhead_s
    decode = perf.iteration_time(0, 0.0, 64, 64 * 1000.0)
    chunk = perf.iteration_time(512, 512 * 256.0, 0, 0.0)
    mixed = perf.iteration_time(512, 512 * 256.0, 64, 64 * 1000.0)
    assert mixed > max(decode, chunk)
    assert mixed < decode + chunk - overhead  # overlap: cheaper than running both in turn


def test_overlap_zero_is_the_roofline_max_and_one_is_the_sum():
    from dataclasses import replace

    base = roofline("llama-3.1-8b", "h100")
    args = (512, 512 * 256.0, 64, 64 * 1000.0)
    none = roofline("llama-3.1-8b", "h100", eff=replace(base.eff, overlap=0.0))
    full = roofline("llama-3.1-8b", "h100", eff=replace(base.eff, overlap=1.0))
    t0, t1, t = none.iteration_time(*args), full.iteration_time(*args), base.iteration_time(*args)
    assert t0 < t < t1
    assert t == pytest.approx(t0 + base.eff.overlap * (t1 - t0))


def test_calibration_matches_the_published_vllm_decode_step():
    # vLLM CI latency benchmark, Llama-3.1-8B TP1 on H100: 997.4 ms for 128 steps (batch 8)
    step = roofline("llama-3.1-8b", "h100").iteration_time(0, 0.0, 8, 8 * 100.0)
    assert step == pytest.approx(0.9974 / 128, rel=0.05)


def _stall_run(budget: int, tbt_ms: float = 50.0):
    """One long decode on an aggregated worker; a 3000-token prompt arrives mid-way."""
    perf = roofline("llama-3.1-8b", "h100")
    trace = [TraceEntry(0.0, BenchRequest("", 100, 400)),
             TraceEntry(1.0, BenchRequest("", 3000, 2))]
    cfg = SimConfig(prefill=0, decode=1, engine=EngineConfig(token_budget=budget),
                    slo=SLO(tpot_ms=40, tbt_ms=tbt_ms))
    return Simulator(cfg, perf, LeastLoadedPolicy()).run(trace)


def test_inter_token_gaps_reveal_a_stall_behind_a_long_prefill():
    whole = _stall_run(8192)   # the prompt runs in one step beside the decode
    chunked = _stall_run(512)  # six chunks, each a short step
    m_whole = whole.metrics(SLO(tpot_ms=40, tbt_ms=50), (50, 99, 100))
    m_chunked = chunked.metrics(SLO(tpot_ms=40, tbt_ms=50), (50, 99, 100))
    # mean TPOT of the long request barely moves, and meets 40 ms either way ...
    tpot_whole = (whole.latency[0] - whole.ttft[0]) / 399
    assert tpot_whole < 0.040
    # ... but its gaps show one step of ~the whole prompt's prefill
    assert m_whole["p100_itl_ms"] > 50 > m_chunked["p100_itl_ms"]
    assert whole.slow_gaps[0] == 1 and chunked.slow_gaps[0] == 0
    # 399 gaps allow 3 slow ones at p99: the single stall still meets tbt; at 250 gaps none
    assert whole.tbt_ok(50)[0]
    short = Simulator(SimConfig(prefill=0, decode=1, slo=SLO(tbt_ms=50)),
                      roofline("llama-3.1-8b", "h100"), LeastLoadedPolicy()).run(
        [TraceEntry(0.0, BenchRequest("", 100, 60)), TraceEntry(0.1, BenchRequest("", 3000, 2))])
    assert short.slow_gaps[0] == 1 and not short.tbt_ok(50)[0]
    assert short.metrics(SLO(tbt_ms=50))["tbt_slo_attainment"] == pytest.approx(0.5)


def test_gap_log_counts_every_gap_once():
    perf = roofline("llama-3.1-8b", "h100")
    trace = [TraceEntry(0.01 * i, BenchRequest("", 200 + 10 * i, 50 + i)) for i in range(40)]
    for prefill, decode in ((0, 2), (1, 1)):
        res = Simulator(SimConfig(prefill=prefill, decode=decode), perf,
                        LeastLoadedPolicy()).run(trace)
        assert res.gap_log[:, 2].sum() == (res.output_tokens - 1).sum()
        # the gaps of each request add up to its decode time
        assert np.all(res.latency >= res.ttft)


def test_ttft_is_sampled_per_leg():
    from benchmarks.sim.perf import FittedModel

    perf = FittedModel((0.0, 0.0, 0.05), (0.01, 0.0, 0.0), 10**7, 1000.0, 1e6)
    res = Simulator(SimConfig(prefill=1, decode=1), perf, LeastLoadedPolicy()).run(
        [TraceEntry(0.0, BenchRequest("", 200, 10))])
    assert res.prefill_done[0] - res.arrival[0] == pytest.approx(0.05)  # prefill leg
    # client TTFT adds the KV transfer (200 tokens at 1 ms) and the first decode step
    assert res.first_token[0] - res.prefill_done[0] == pytest.approx(0.2 + 0.01)
    m = res.metrics()
    assert m["p50_ttft_prefill_leg_ms"] == pytest.approx(50.0)
    assert m["p50_ttft_handoff_ms"] == pytest.approx(210.0)


def test_tbt_goodput_arithmetic_in_the_harness_metrics():
    def req(gaps: list[float]) -> RequestTimeline:
        times = list(np.cumsum([0.1] + gaps))
        return RequestTimeline(start_s=0.0, prompt_tokens=5, output_tokens=len(times),
                               success=True, first_token_s=0.1, chunk_times_s=times,
                               end_s=times[-1])

    fast = [0.02] * 200
    one_stall = [0.02] * 199 + [0.3]        # 200 gaps allow 2 above the target
    three_stalls = [0.02] * 197 + [0.3] * 3
    short_stall = [0.02] * 50 + [0.3]       # 51 gaps allow none
    assert meets_tbt(fast, 50) and meets_tbt(one_stall, 50)
    assert not meets_tbt(three_stalls, 50) and not meets_tbt(short_stall, 50)
    timelines = [req(g) for g in (fast, one_stall, three_stalls, short_stall)]
    r = summarize(timelines, 10.0, SLO(tbt_ms=50))
    assert r["tbt_slo_attainment"] == pytest.approx(0.5)
    assert r["good_completed"] == 2 and r["request_goodput"] == pytest.approx(0.2)
    # mean TPOT of all four is under 40 ms: the tpot SLO alone passes every one
    assert summarize(timelines, 10.0, SLO(tpot_ms=40))["slo_attainment"] == 1.0
    with pytest.raises(ValueError):
        summarize_arrays(duration_s=1.0, prompt_tokens=np.ones(1), output_tokens=np.ones(1),
                         success=np.ones(1, bool), ttft_s=np.zeros(1), latency_s=np.zeros(1),
                         slo=SLO(tbt_ms=50))
    assert SLO.parse(["tbt:50"]) == SLO(tbt_ms=50)


def test_weighted_itl_percentiles():
    r = summarize_arrays(duration_s=1.0, prompt_tokens=np.ones(1), output_tokens=np.full(1, 101.0),
                         success=np.ones(1, bool), ttft_s=np.zeros(1), latency_s=np.ones(1),
                         itls_s=np.array([0.01, 0.2]), itl_weights=np.array([99, 1]),
                         percentiles=(50, 99, 100))
    assert r["median_itl_ms"] == pytest.approx(10.0)
    assert r["p99_itl_ms"] == pytest.approx(10.0) and r["p100_itl_ms"] == pytest.approx(200.0)
    assert r["mean_itl_ms"] == pytest.approx((99 * 10 + 200) / 100)


def test_sampled_flip_times_follow_the_configured_spread():
    sim = Simulator(SimConfig(prefill=1, decode=1, flip_rewarm_s=0.2, flip_rewarm_sigma=0.97,
                              flip_rewarm_max_s=1.9, seed=3),
                    roofline("llama-3.1-8b", "h100"), LeastLoadedPolicy())
    draws = np.array([sim._rewarm_s() for _ in range(4000)])
    assert np.median(draws) == pytest.approx(0.2, rel=0.08)
    assert draws.max() <= 1.9 and (draws == 1.9).mean() > 0.005


def test_oracle_schedule_moves_every_worker_at_the_boundary():
    perf = roofline("llama-3.1-8b", "h100")
    trace = [TraceEntry(0.05 * i, BenchRequest("", 300, 20)) for i in range(200)]
    oracle = OracleSchedule([(0.0, 2), (4.0, 1), (7.0, 3)])
    sim = Simulator(SimConfig(prefill=2, decode=2, control_interval_s=0.5), perf,
                    LeastLoadedPolicy(), oracle)
    res = sim.run(trace)
    assert not res.failed.any()
    by_time = {t: p for t, p, _ in res.roles}
    assert [p for t, p in sorted(by_time.items()) if t >= 4.0][:1] == [1]
    final = [p for t, p, _ in res.roles if t >= 7.0]
    assert final and final[-1] == 3
    # all moves at once: both flips needed at 7 s happen on the same tick
    assert sum(1 for t, *_ in res.flips if 7.0 <= t < 7.5) == 2
