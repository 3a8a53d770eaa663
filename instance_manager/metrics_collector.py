"""Scrape every worker's vLLM `/metrics` and turn it into one `ControlSnapshot` per tick.

Percentiles are windowed: they come from the difference between the newest scrape's
histogram buckets and those of a scrape about `window_s` earlier, so old traffic ages out.
Counters become rates the same way. A worker's first scrape, and the first scrape after a
counter went backwards (the worker restarted), is only a baseline: warm-up traffic never
reaches a percentile.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core.exposition import filter_exposition
from core.slo import SLOTargets
from core.workers import ClusterSnapshot, Role, WorkerState
from instance_manager.controller.base import ControlSnapshot, WorkerMetrics

TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
PROMPT_LEN = "vllm:request_prompt_tokens"
OUTPUT_LEN = "vllm:request_generation_tokens"
HISTOGRAMS = (TTFT, ITL, PROMPT_LEN, OUTPUT_LEN)

PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
REQUESTS_FINISHED = "vllm:request_success_total"
COUNTERS = (PROMPT_TOKENS, GENERATION_TOKENS, REQUESTS_FINISHED)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
SUMMED_GAUGES = (RUNNING, WAITING)
AVERAGED_GAUGES = (KV_USAGE,)
_NAMES = HISTOGRAMS + COUNTERS + SUMMED_GAUGES + AVERAGED_GAUGES


@dataclass(frozen=True)
class Histogram:
    """A cumulative Prometheus histogram, summed over label sets (engines)."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]
    sum: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Histogram) -> Histogram | None:
        """The observations made since `earlier`; None if a bucket went backwards (reset)."""
        if self.bounds != earlier.bounds:
            return None
        diffs = tuple(a - b for a, b in zip(self.cumulative, earlier.cumulative, strict=True))
        if any(d < 0 for d in diffs) or self.count < earlier.count:
            return None
        return Histogram(self.bounds, diffs, self.sum - earlier.sum, self.count - earlier.count)

    @property
    def total(self) -> float:
        return self.cumulative[-1] if self.cumulative else 0.0

    def quantile(self, q: float) -> float | None:
        """Like PromQL `histogram_quantile`: linear inside the bucket holding rank q·total.

        None when the histogram is empty. A rank in the +Inf bucket returns the largest
        finite bound (the true value is only known to be above it).
        """
        total = self.total
        if total <= 0:
            return None
        rank = q * total
        lower_bound, lower_count = 0.0, 0.0
        for bound, cum in zip(self.bounds, self.cumulative, strict=True):
            if cum >= rank and cum > lower_count:
                if math.isinf(bound):
                    return lower_bound
                if lower_bound > bound:  # a negative first bucket: no interpolation
                    return bound
                return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                    cum - lower_count)
            lower_bound, lower_count = bound, cum
        return lower_bound

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None


@dataclass(frozen=True)
class EngineStats:
    """The numbers Fulcrum uses from one `/metrics` text."""

    histograms: Mapping[str, Histogram] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)
    gauges: Mapping[str, float] = field(default_factory=dict)


def _parse_bound(text: str) -> float:
    return math.inf if text in ("+Inf", "Inf", "inf") else float(text)


def parse_metrics(text: str) -> EngineStats:
    """Parse Prometheus exposition text into `EngineStats`.

    Values of the same metric with different labels (engines, finish reasons) are summed;
    KV-cache usage is averaged over engines. Raises ValueError on malformed text.
    """
    buckets: dict[str, dict[float, float]] = {}
    hist_sum: dict[str, float] = {}
    hist_count: dict[str, float] = {}
    counters: dict[str, float] = {}
    gauge_values: dict[str, list[float]] = {}
    wanted = filter_exposition(text, _NAMES)
    if text.strip() and not wanted.strip():
        raise ValueError("none of the vLLM metrics Fulcrum reads is on the page")
    for family in text_string_to_metric_families(wanted):
        for sample in family.samples:
            name, value = sample.name, float(sample.value)
            if name.endswith("_bucket") and name[: -len("_bucket")] in HISTOGRAMS:
                per_bound = buckets.setdefault(name[: -len("_bucket")], {})
                bound = _parse_bound(sample.labels["le"])
                per_bound[bound] = per_bound.get(bound, 0.0) + value
            elif name.endswith("_sum") and name[: -len("_sum")] in HISTOGRAMS:
                base = name[: -len("_sum")]
                hist_sum[base] = hist_sum.get(base, 0.0) + value
            elif name.endswith("_count") and name[: -len("_count")] in HISTOGRAMS:
                base = name[: -len("_count")]
                hist_count[base] = hist_count.get(base, 0.0) + value
            elif name in COUNTERS:
                counters[name] = counters.get(name, 0.0) + value
            elif name in SUMMED_GAUGES or name in AVERAGED_GAUGES:
                gauge_values.setdefault(name, []).append(value)
    histograms = {}
    for base, per_bound in buckets.items():
        bounds = tuple(sorted(per_bound))
        histograms[base] = Histogram(bounds, tuple(per_bound[b] for b in bounds),
                                     hist_sum.get(base, 0.0), hist_count.get(base, 0.0))
    gauges = {name: (sum(vals) / len(vals) if name in AVERAGED_GAUGES else sum(vals))
              for name, vals in gauge_values.items()}
    return EngineStats(histograms, counters, gauges)


def counters_went_back(now: EngineStats, before: EngineStats) -> bool:
    """True if any counter or histogram decreased: the worker restarted in between."""
    for name, value in now.counters.items():
        if value < before.counters.get(name, 0.0):
            return True
    for name, hist in now.histograms.items():
        old = before.histograms.get(name)
        if old is not None and hist.minus(old) is None:
            return True
    return False


@dataclass(frozen=True)
class WindowDelta:
    """What happened on one worker between two scrapes `seconds` apart."""

    seconds: float
    histograms: Mapping[str, Histogram]
    counters: Mapping[str, float]


def window_delta(newest: EngineStats, oldest: EngineStats, seconds: float) -> WindowDelta:
    """Histogram and counter increases from `oldest` to `newest` (no reset in between)."""
    hists = {}
    for name, hist in newest.histograms.items():
        old = oldest.histograms.get(name)
        diff = hist if old is None else hist.minus(old)
        if diff is not None:
            hists[name] = diff
    counts = {name: max(0.0, value - oldest.counters.get(name, 0.0))
              for name, value in newest.counters.items()}
    return WindowDelta(seconds, hists, counts)


def worker_metrics(name: str, newest: EngineStats, delta: WindowDelta | None) -> WorkerMetrics:
    """Gauges from the newest scrape; percentiles and rates from the window (if any)."""
    gauges = newest.gauges
    base = dict(name=name, num_running=int(gauges.get(RUNNING, 0)),
                num_waiting=int(gauges.get(WAITING, 0)),
                kv_cache_usage=float(gauges.get(KV_USAGE, 0.0)))
    if delta is None or delta.seconds <= 0:
        return WorkerMetrics(**base)
    ttft, itl = delta.histograms.get(TTFT), delta.histograms.get(ITL)

    def rate(counter: str) -> float:
        return delta.counters.get(counter, 0.0) / delta.seconds

    return WorkerMetrics(
        **base,
        ttft_p50_s=ttft.quantile(0.5) if ttft else None,
        ttft_p90_s=ttft.quantile(0.9) if ttft else None,
        itl_p50_s=itl.quantile(0.5) if itl else None,
        itl_p90_s=itl.quantile(0.9) if itl else None,
        ttft_samples=int(ttft.total) if ttft else 0,
        itl_samples=int(itl.total) if itl else 0,
        prompt_tokens_per_s=rate(PROMPT_TOKENS),
        generation_tokens_per_s=rate(GENERATION_TOKENS),
        requests_finished_per_s=rate(REQUESTS_FINISHED),
    )


def mean_length(deltas: Iterable[WindowDelta], histogram: str) -> float | None:
    """Mean request length over several workers' windows (None when no request finished)."""
    total, count = 0.0, 0.0
    for delta in deltas:
        hist = delta.histograms.get(histogram)
        if hist is not None:
            total, count = total + hist.sum, count + hist.count
    return total / count if count > 0 else None


@dataclass(frozen=True)
class _Scrape:
    at: float
    stats: EngineStats


class _WorkerWindow:
    """The recent scrapes of one worker, trimmed to the window."""

    def __init__(self) -> None:
        self.scrapes: deque[_Scrape] = deque()

    def add(self, scrape: _Scrape, window_s: float) -> WindowDelta | None:
        if self.scrapes and counters_went_back(scrape.stats, self.scrapes[-1].stats):
            self.scrapes.clear()  # restart: start a new baseline, skip the warm-up
        self.scrapes.append(scrape)
        while len(self.scrapes) >= 3 and self.scrapes[1].at <= scrape.at - window_s:
            self.scrapes.popleft()
        if len(self.scrapes) < 2:
            return None
        oldest = self.scrapes[0]
        return window_delta(scrape.stats, oldest.stats, scrape.at - oldest.at)


class MetricsCollector:
    """Keeps every worker's recent scrapes and builds a `ControlSnapshot` per tick."""

    def __init__(self, *, window_s: float = 20.0, timeout_s: float = 2.0,
                 slo: SLOTargets | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.timeout_s = timeout_s
        self.slo = slo or SLOTargets()
        self._clock = clock
        self._windows: dict[str, _WorkerWindow] = {}
        self.errors: dict[str, str] = {}

    def observe(self, name: str, text: str, at: float | None = None) -> tuple[
            WorkerMetrics, WindowDelta | None]:
        """Feed one worker's `/metrics` text; returns its metrics and its window delta."""
        return self.observe_stats(name, parse_metrics(text), at)

    def observe_stats(self, name: str, stats: EngineStats, at: float | None = None) -> tuple[
            WorkerMetrics, WindowDelta | None]:
        """`observe` for a text already parsed (see `parse_metrics`)."""
        window = self._windows.setdefault(name, _WorkerWindow())
        delta = window.add(_Scrape(self._clock() if at is None else at, stats), self.window_s)
        return worker_metrics(name, stats, delta), delta

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the history of workers that left the cluster."""
        keep = set(keep)
        for name in [n for n in self._windows if n not in keep]:
            del self._windows[name]
            self.errors.pop(name, None)

    async def _fetch(self, client: httpx.AsyncClient, url: str) -> EngineStats:
        response = await client.get(url.rstrip("/") + "/metrics", timeout=self.timeout_s)
        response.raise_for_status()
        return await asyncio.to_thread(parse_metrics, response.text)  # off the event loop

    async def scrape_once(self, cluster: ClusterSnapshot,
                          client: httpx.AsyncClient) -> ControlSnapshot:
        """Scrape every live worker concurrently and return one immutable snapshot.

        Workers that fail to answer are left out of `metrics` (see `errors`).
        """
        self.forget(w.name for w in cluster.workers)
        live = [w for w in cluster.workers if w.state in (WorkerState.READY, WorkerState.DRAINING)]
        texts = await asyncio.gather(*(self._fetch(client, w.url) for w in live),
                                     return_exceptions=True)  # parsed, or the exception
        metrics: dict[str, WorkerMetrics] = {}
        deltas: dict[Role, list[WindowDelta]] = {Role.PREFILL: [], Role.DECODE: []}
        for worker, stats in zip(live, texts, strict=True):
            if isinstance(stats, ValueError):
                self.errors[worker.name] = f"unparsable /metrics: {stats}"
                continue
            if isinstance(stats, BaseException):
                self.errors[worker.name] = f"{type(stats).__name__}: {stats}"
                continue
            metrics[worker.name], delta = self.observe_stats(worker.name, stats)
            self.errors.pop(worker.name, None)
            if delta is not None:
                deltas[worker.role].append(delta)
        return ControlSnapshot(
            time=self._clock(), cluster=cluster, metrics=metrics, window_s=self.window_s,
            slo=self.slo,
            mean_prompt_tokens=snapshot_mean(deltas, PROMPT_LEN, prefer=Role.PREFILL),
            mean_output_tokens=snapshot_mean(deltas, OUTPUT_LEN, prefer=Role.DECODE),
        )


def snapshot_mean(deltas: Mapping[Role, list[WindowDelta]], histogram: str,
                  prefer: Role) -> float | None:
    """A request-length mean from the pool that sees the real value.

    Prefill legs run with max_tokens=1, so output lengths come from the decode pool and
    prompt lengths from the prefill pool; with that pool empty, all workers are used.
    """
    preferred = mean_length(deltas.get(prefer, []), histogram)
    if preferred is not None:
        return preferred
    return mean_length((d for pool in deltas.values() for d in pool), histogram)
