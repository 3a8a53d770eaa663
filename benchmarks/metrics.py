"""Latency metrics with the same definitions and JSON keys as `vllm bench serve`.

Per request: TTFT = first content chunk - send time; ITL = gaps between successive
chunks; E2EL = end - send; TPOT = (E2EL - TTFT)/(output_tokens - 1) when more than one
token came back (vLLM counts TPOT as 0 for goodput otherwise). Reported in ms as
`mean_*`, `median_*`, `std_*` and `p{N}_*` (vLLM's percentile naming: `p99`, `p99.9`).

Goodput follows vLLM: a completed request is good when every given SLO holds
(`value <= slo`); `request_goodput = good / duration`. Ours on top: `slo_attainment`
= good / all requests (failed requests count as misses), and per-metric attainment.

`tbt:MS` (ours, beside vLLM's mean `tpot`) judges each request's own p99 time between
tokens, nearest rank: a request meets it when at most floor(1% of its gaps) gaps exceed
MS, so under 100 gaps none may. A request with one output token has no gap and meets it.
Mean TPOT hides a 90 ms stall among 700 fast tokens; this does not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (90.0, 99.0)
METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")
SLO_KEYS = ("ttft", "tpot", "tbt", "e2el")


@dataclass(frozen=True)
class SLO:
    """Latency targets in milliseconds; None means not judged."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None
    tbt_ms: float | None = None  # per-request p99 time between tokens (see module doc)

    @property
    def empty(self) -> bool:
        return (self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None
                and self.tbt_ms is None)

    def as_dict(self) -> dict[str, float]:
        out = {"ttft": self.ttft_ms, "tpot": self.tpot_ms, "tbt": self.tbt_ms,
               "e2el": self.e2el_ms}
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def parse(cls, items: Iterable[str]) -> SLO:
        """From vLLM's `--goodput` syntax plus `tbt`: ["ttft:300", "tpot:50", "tbt:100"]."""
        values: dict[str, float] = {}
        for item in items:
            key, _, val = item.partition(":")
            if key not in SLO_KEYS or not val:
                raise ValueError(f"bad SLO {item!r}; use ttft:MS, tpot:MS, tbt:MS or e2el:MS")
            values[f"{key}_ms"] = float(val)
        return cls(**values)


def tbt_allowance(gaps: int) -> int:
    """How many of a request's `gaps` may exceed the tbt target (nearest-rank p99)."""
    return gaps // 100


def meets_tbt(gaps_s: Sequence[float], target_ms: float) -> bool:
    """Whether one request's p99 time between tokens (nearest rank) is <= target."""
    limit = target_ms / 1000.0
    slow = sum(1 for g in gaps_s if g > limit)
    return slow <= tbt_allowance(len(gaps_s))


def p99_gap_s(gaps_s: Sequence[float]) -> float:
    """One request's nearest-rank p99 gap (0 without gaps)."""
    if not gaps_s:
        return 0.0
    ordered = sorted(gaps_s)
    rank = -(-99 * len(ordered) // 100)  # ceil(0.99 n)
    return ordered[rank - 1]


@dataclass
class RequestTimeline:
    """What one request did, in absolute seconds on one clock."""

    start_s: float
    prompt_tokens: int
    output_tokens: int = 0
    success: bool = False
    first_token_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # every content chunk, 1st incl.
    end_s: float | None = None
    error: str = ""
    scheduled_s: float | None = None  # when the trace wanted it sent
    generated_text: str = ""

    @property
    def ttft_s(self) -> float:
        return (self.first_token_s - self.start_s) if self.first_token_s is not None else 0.0

    @property
    def latency_s(self) -> float:
        return (self.end_s - self.start_s) if self.end_s is not None else 0.0

    @property
    def itls_s(self) -> list[float]:
        t = self.chunk_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def _p_word(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def _stats(name: str, values: np.ndarray, percentiles: Sequence[float],
           weights: np.ndarray | None = None) -> dict[str, float]:
    if weights is not None and values.size and weights.sum() > 0:
        return _weighted_stats(name, values, weights, percentiles)
    v = values if values.size else np.zeros(1)
    out = {f"mean_{name}_ms": float(np.mean(v) * 1000),
           f"median_{name}_ms": float(np.median(v) * 1000),
           f"std_{name}_ms": float(np.std(v) * 1000)}
    for p in percentiles:
        out[f"p{_p_word(p)}_{name}_ms"] = float(np.percentile(v, p) * 1000)
    return out


def _weighted_stats(name: str, values: np.ndarray, weights: np.ndarray,
                    percentiles: Sequence[float]) -> dict[str, float]:
    """Stats of `values[i]` repeated `weights[i]` times (percentiles: inverted CDF)."""
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order].astype(float)
    cum = np.cumsum(w)
    total = cum[-1]
    mean = float(np.dot(v, w) / total)
    std = float(np.sqrt(max(0.0, np.dot((v - mean) ** 2, w) / total)))

    def q(p: float) -> float:
        idx = int(np.searchsorted(cum, p / 100.0 * total, side="left"))
        return float(v[min(idx, v.size - 1)])

    out = {f"mean_{name}_ms": mean * 1000, f"median_{name}_ms": q(50) * 1000,
           f"std_{name}_ms": std * 1000}
    for p in percentiles:
        out[f"p{_p_word(p)}_{name}_ms"] = q(p) * 1000
    return out


def summarize_arrays(*, duration_s: float, prompt_tokens: np.ndarray, output_tokens: np.ndarray,
                     success: np.ndarray, ttft_s: np.ndarray, latency_s: np.ndarray,
                     itls_s: np.ndarray | None = None, itl_weights: np.ndarray | None = None,
                     tbt_ok: np.ndarray | None = None, slo: SLO | None = None,
                     percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
    """The metric dict from per-request arrays (one entry per request, failed included).

    `itls_s` is every inter-chunk gap of every successful request, flattened (or, with
    `itl_weights`, distinct gap values each standing for that many gaps); when None ITL
    is taken as each request's TPOT, one per token gap. `tbt_ok` (per request) says
    whether its p99 gap met `slo.tbt_ms`; needed when that SLO is set.
    """
    slo = slo or SLO()
    ok = success.astype(bool)
    n_total = int(ok.size)
    completed = int(ok.sum())
    p_in = prompt_tokens[ok]
    out_len = output_tokens[ok]
    ttft = ttft_s[ok]
    lat = latency_s[ok]
    multi = out_len > 1
    tpot_all = np.zeros(completed)
    tpot_all[multi] = (lat[multi] - ttft[multi]) / (out_len[multi] - 1)
    tpots = tpot_all[multi]
    if itls_s is None:
        itls = np.repeat(tpots, (out_len[multi] - 1).astype(int)) if tpots.size else tpots
    else:
        itls = np.asarray(itls_s, dtype=float)

    good_mask = np.ones(completed, dtype=bool)
    per_metric: dict[str, float] = {}
    for name, values, target in (("ttft", ttft, slo.ttft_ms), ("tpot", tpot_all, slo.tpot_ms),
                                 ("tbt", None, slo.tbt_ms), ("e2el", lat, slo.e2el_ms)):
        if target is None:
            continue
        if values is None:
            if tbt_ok is None:
                raise ValueError("a tbt SLO needs per-request tbt_ok")
            met = np.asarray(tbt_ok, dtype=bool)[ok]
        else:
            met = values <= target / 1000.0
        good_mask &= met
        per_metric[f"{name}_slo_attainment"] = float(met.sum() / n_total) if n_total else 0.0
    good = int(good_mask.sum())
    dur = duration_s if duration_s > 0 else float("nan")
    total_out = int(out_len.sum())
    total_in = int(p_in.sum())

    result: dict = {
        "duration": duration_s,
        "completed": completed,
        "failed": n_total - completed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": completed / dur,
        "request_goodput": (good / dur) if not slo.empty else None,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    result.update(_stats("ttft", ttft, percentiles))
    result.update(_stats("tpot", tpots, percentiles))
    result.update(_stats("itl", itls, percentiles,
                         None if itls_s is None or itl_weights is None
                         else np.asarray(itl_weights)))
    result.update(_stats("e2el", lat, percentiles))
    result["slo"] = slo.as_dict()
    result["good_completed"] = good
    result["slo_attainment"] = (good / n_total if n_total else 0.0) if not slo.empty else None
    result.update(per_metric)
    return result


def summarize(timelines: Sequence[RequestTimeline], duration_s: float, slo: SLO | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict:
    """vLLM-compatible metrics (plus ours) from per-request timelines."""
    ok = np.array([t.success for t in timelines], dtype=bool)
    itls = [g for t in timelines if t.success for g in t.itls_s]
    tbt_ok = None
    if slo is not None and slo.tbt_ms is not None:
        tbt_ok = np.array([meets_tbt(t.itls_s, slo.tbt_ms) for t in timelines], dtype=bool)
    result = summarize_arrays(
        duration_s=duration_s,
        prompt_tokens=np.array([t.prompt_tokens for t in timelines], dtype=float),
        output_tokens=np.array([t.output_tokens for t in timelines], dtype=float),
        success=ok,
        ttft_s=np.array([t.ttft_s for t in timelines], dtype=float),
        latency_s=np.array([t.latency_s for t in timelines], dtype=float),
        itls_s=np.array(itls, dtype=float), tbt_ok=tbt_ok, slo=slo, percentiles=percentiles)
    p99_gaps = np.array([p99_gap_s(t.itls_s) for t in timelines if t.success and t.itls_s])
    result.update(_stats("request_p99_tbt", p99_gaps, percentiles))
    result.update(peak_rates(timelines))
    return result


def peak_rates(timelines: Sequence[RequestTimeline]) -> dict[str, float | int]:
    """vLLM's `max_output_tokens_per_s` and `max_concurrent_requests` (1 s buckets)."""
    done = [t for t in timelines if t.success and t.end_s is not None]
    if not done:
        return {"max_output_tokens_per_s": 0.0, "max_concurrent_requests": 0}
    t0 = min(t.start_s for t in done)
    span = int(np.ceil(max(t.end_s for t in done) - t0)) + 1  # type: ignore[operator]
    tokens = np.zeros(span)
    concurrent = np.zeros(span)
    for t in done:
        if t.chunk_times_s:
            idx = (np.asarray(t.chunk_times_s) - t0).astype(int)
            np.add.at(tokens, idx[(idx >= 0) & (idx < span)], 1)
        concurrent[int(t.start_s - t0): int(t.end_s - t0) + 1] += 1  # type: ignore[operator]
    return {"max_output_tokens_per_s": float(tokens.max()),
            "max_concurrent_requests": int(concurrent.max())}
