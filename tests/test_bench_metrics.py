"""Metric arithmetic on hand-built timelines."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.metrics import SLO, RequestTimeline, summarize, summarize_arrays


def _req(start, chunks, end, prompt=10, out=None):
    return RequestTimeline(start_s=start, prompt_tokens=prompt,
                           output_tokens=len(chunks) if out is None else out, success=True,
                           first_token_s=chunks[0], chunk_times_s=list(chunks), end_s=end)


@pytest.fixture
def timelines():
    return [
        _req(0.0, [0.1, 0.2, 0.3, 0.4, 0.5], 0.5),        # ttft 100 ms, tpot 100 ms
        _req(1.0, [1.3, 1.35, 1.4], 1.4, prompt=20),      # ttft 300 ms, tpot 50 ms
        _req(2.0, [2.2], 2.2, prompt=30),                 # one token: tpot not counted
        RequestTimeline(start_s=3.0, prompt_tokens=40, error="boom"),
    ]


def test_vllm_keys_and_values(timelines):
    r = summarize(timelines, duration_s=4.0)
    assert r["completed"] == 3 and r["failed"] == 1
    assert r["total_input_tokens"] == 60  # failed request's prompt is not counted
    assert r["total_output_tokens"] == 9
    assert r["request_throughput"] == pytest.approx(0.75)
    assert r["output_throughput"] == pytest.approx(2.25)
    assert r["total_token_throughput"] == pytest.approx(69 / 4)
    assert r["mean_ttft_ms"] == pytest.approx(200.0)
    assert r["median_ttft_ms"] == pytest.approx(200.0)
    assert r["std_ttft_ms"] == pytest.approx(np.std([0.1, 0.3, 0.2]) * 1000)
    assert r["mean_tpot_ms"] == pytest.approx(75.0)
    assert r["p99_tpot_ms"] == pytest.approx(99.5)
    itls = [0.1] * 4 + [0.05] * 2
    assert r["mean_itl_ms"] == pytest.approx(np.mean(itls) * 1000)
    assert r["p90_itl_ms"] == pytest.approx(np.percentile(itls, 90) * 1000)
    assert r["mean_e2el_ms"] == pytest.approx((500 + 400 + 200) / 3)
    assert r["request_goodput"] is None and r["slo_attainment"] is None
    for key in ("duration", "max_output_tokens_per_s", "max_concurrent_requests",
                "median_e2el_ms", "p99_e2el_ms", "p90_ttft_ms"):
        assert key in r
    assert r["max_output_tokens_per_s"] == 5.0


def test_goodput_and_attainment(timelines):
    r = summarize(timelines, duration_s=4.0, slo=SLO(ttft_ms=250, tpot_ms=80))
    # req0 fails TPOT (100 > 80), req1 fails TTFT, req2 passes (tpot counts as 0), req3 failed
    assert r["good_completed"] == 1
    assert r["request_goodput"] == pytest.approx(0.25)
    assert r["slo_attainment"] == pytest.approx(0.25)
    assert r["ttft_slo_attainment"] == pytest.approx(0.5)
    assert r["tpot_slo_attainment"] == pytest.approx(0.5)
    assert summarize(timelines, 4.0, SLO(e2el_ms=450))["slo_attainment"] == pytest.approx(0.5)


def test_slo_boundary_is_inclusive():
    r = summarize([_req(0.0, [0.25, 0.5], 0.5)], 1.0, SLO(ttft_ms=250))
    assert r["slo_attainment"] == 1.0


def test_custom_percentiles_use_vllm_naming(timelines):
    r = summarize(timelines, 4.0, percentiles=[50, 99.9])
    assert "p50_ttft_ms" in r and "p99.9_ttft_ms" in r and "p99_ttft_ms" not in r


def test_parse_goodput_syntax():
    assert SLO.parse(["ttft:300", "tpot:50"]) == SLO(ttft_ms=300, tpot_ms=50)
    with pytest.raises(ValueError):
        SLO.parse(["latency:3"])


def test_compact_arrays_expand_tpot_into_itls():
    r = summarize_arrays(duration_s=2.0, prompt_tokens=np.array([5.0, 5.0]),
                         output_tokens=np.array([3.0, 1.0]), success=np.array([True, True]),
                         ttft_s=np.array([0.1, 0.2]), latency_s=np.array([0.5, 0.2]))
    assert r["mean_tpot_ms"] == pytest.approx(200.0)
    assert r["mean_itl_ms"] == pytest.approx(200.0)
    assert r["completed"] == 2


def test_all_failed_gives_zeros_not_errors():
    r = summarize([RequestTimeline(start_s=0.0, prompt_tokens=3)], 1.0, SLO(ttft_ms=1))
    assert r["completed"] == 0 and r["mean_ttft_ms"] == 0.0 and r["slo_attainment"] == 0.0
