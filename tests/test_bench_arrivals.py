"""Arrival processes: means, dispersion, ramps, phase mixes, trace files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.arrivals import (
    Phase,
    TraceEntry,
    gamma_times,
    load_trace,
    pair,
    phase_mix,
    poisson_times,
    ramp_times,
    save_trace,
    scale_rate,
    split_by_shape,
)
from benchmarks.dataset import BenchRequest

N = 40_000


def _gaps(times: np.ndarray) -> np.ndarray:
    return np.diff(times)


def test_poisson_mean_and_dispersion():
    gaps = _gaps(poisson_times(N, rate=5.0, seed=1))
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1.0, rel=0.03)  # exponential gaps


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(burstiness):
    gaps = _gaps(gamma_times(N, rate=2.0, burstiness=burstiness, seed=2))
    assert gaps.mean() == pytest.approx(0.5, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_counts_in_windows_are_overdispersed_only_when_bursty():
    def index_of_dispersion(times: np.ndarray) -> float:
        counts = np.bincount((times // 10.0).astype(int))[:-1]
        return counts.var() / counts.mean()

    assert index_of_dispersion(poisson_times(N, 10.0, seed=3)) == pytest.approx(1.0, abs=0.2)
    assert index_of_dispersion(gamma_times(N, 10.0, 0.2, seed=3)) > 3.0
    assert index_of_dispersion(gamma_times(N, 10.0, math.inf)) < 0.1


def test_infinite_rate_and_vllm_total_rescale():
    assert np.all(poisson_times(10, math.inf) == 0)
    t = gamma_times(100, 4.0, 1.0, seed=5, match_total=True)
    assert t[0] == 0 and t[-1] == pytest.approx(25.0)


def test_seeded_processes_are_deterministic():
    assert np.array_equal(poisson_times(100, 3.0, seed=9), poisson_times(100, 3.0, seed=9))
    assert not np.array_equal(poisson_times(100, 3.0, seed=9), poisson_times(100, 3.0, seed=8))


def test_linear_ramp_rate_rises():
    t = ramp_times(N, 1.0, 9.0, seed=4)
    gaps = _gaps(t)
    first, last = gaps[: N // 10].mean(), gaps[-N // 10:].mean()
    assert 1 / first == pytest.approx(1.4, rel=0.1)   # mean rate over first tenth
    assert 1 / last == pytest.approx(8.6, rel=0.1)
    exp = ramp_times(1000, 1.0, 100.0, strategy="exponential")
    assert np.all(np.diff(exp) >= 0)
    with pytest.raises(ValueError):
        ramp_times(10, 1.0, 2.0, strategy="cubic")


def test_phase_mix_alternates_pools_at_their_rates():
    long_prompt = (BenchRequest("p", 2000, 20),)
    long_output = (BenchRequest("o", 50, 800),)
    phases = [Phase(100.0, 20.0, long_prompt), Phase(100.0, 5.0, long_output)]
    trace = phase_mix(phases, cycles=3, seed=6)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:], strict=False))
    for cycle in range(3):
        base = cycle * 200.0
        first = [e for e in trace if base <= e.arrival_s < base + 100]
        second = [e for e in trace if base + 100 <= e.arrival_s < base + 200]
        assert {e.request for e in first} == set(long_prompt)
        assert {e.request for e in second} == set(long_output)
        assert len(first) == pytest.approx(2000, rel=0.1)
        assert len(second) == pytest.approx(500, rel=0.2)


def test_split_by_shape_and_pair():
    reqs = [BenchRequest("x", p, o) for p, o in [(1000, 10), (10, 1000), (500, 20), (20, 500)]]
    prefill_heavy, decode_heavy = split_by_shape(reqs)
    assert all(r.prompt_tokens > r.output_tokens for r in prefill_heavy)
    assert all(r.prompt_tokens < r.output_tokens for r in decode_heavy)
    trace = pair([0.0, 1.0, 2.0, 3.0, 4.0], reqs[:2])
    assert [e.request for e in trace] == [reqs[0], reqs[1], reqs[0], reqs[1], reqs[0]]


def test_trace_round_trip_and_scaling(tmp_path):
    trace = [TraceEntry(1.0, BenchRequest("hello world", 2, 7)),
             TraceEntry(3.0, BenchRequest("a b c", 3, 4))]
    path = tmp_path / "t.jsonl"
    save_trace(trace, path, with_prompts=True)
    loaded = load_trace(path)
    assert [e.arrival_s for e in loaded] == [0.0, 2.0]  # shifted to start at 0
    assert [e.request for e in loaded] == [e.request for e in trace]
    assert [e.arrival_s for e in scale_rate(loaded, 2.0)] == [0.0, 1.0]
    csv_path = tmp_path / "azure.csv"
    csv_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                        "2023-11-16 18:15:46.6805900,374,44\n"
                        "2023-11-16 18:15:50.9951690,396,109\n")
    az = load_trace(csv_path)
    assert [(e.request.prompt_tokens, e.request.output_tokens) for e in az] == [(374, 44),
                                                                                 (396, 109)]
    assert az[1].arrival_s == pytest.approx(4.3146, abs=1e-3)
