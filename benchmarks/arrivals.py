"""Arrival processes and traces shared by the live harness and the simulator.

A trace is a list of `TraceEntry(arrival_s, request)` sorted by time, with the first
arrival at or after 0. The harness sends each request at its arrival time; the simulator
injects it at the same simulated time, so both see exactly the same traffic.

Processes (all seeded, all numpy-vectorised):
* `poisson_times`  exponential gaps, mean 1/rate (the `vllm bench serve` default);
* `gamma_times`    gamma gaps with shape = burstiness and mean 1/rate, as vLLM does:
                   coefficient of variation 1/sqrt(burstiness), so < 1 is burstier;
* `ramp_times`     Poisson whose rate moves linearly or exponentially from r0 to r1;
* `phase_mix`      phases alternating between request pools (e.g. long prompts, then
                   long outputs), each with its own rate and duration: the traffic that
                   breaks a static P/D ratio.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks.dataset import BenchRequest, synthetic_prompt


class TraceEntry(NamedTuple):
    """One request and the time (seconds from the start) at which it is sent."""

    arrival_s: float
    request: BenchRequest


Trace = list[TraceEntry]


def poisson_times(n: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times of a Poisson process; `rate=inf` sends everything at t=0."""
    return gamma_times(n, rate, 1.0, seed)


def gamma_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0,
                match_total: bool = False) -> np.ndarray:
    """Renewal process with gamma gaps: shape `burstiness`, scale 1/(rate*burstiness).

    `burstiness=inf` gives constant gaps. `match_total=True` rescales the times so the
    last arrival lands at n/rate, as `vllm bench serve` does.
    """
    if n <= 0:
        return np.zeros(0)
    if math.isinf(rate):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be positive")
    if math.isinf(burstiness):
        gaps = np.full(n, 1.0 / rate)
    else:
        rng = np.random.default_rng(seed)
        gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes out at once
    times = np.cumsum(gaps)
    if match_total and times[-1] > 0:
        times *= (n / rate) / times[-1]
    return times


def ramp_times(n: int, start_rate: float, end_rate: float, seed: int = 0,
               strategy: str = "linear") -> np.ndarray:
    """Poisson arrivals whose rate moves from `start_rate` to `end_rate` across the n
    requests (request-indexed like vLLM's ramp-up), linearly or exponentially."""
    if n <= 0:
        return np.zeros(0)
    if start_rate <= 0 or end_rate <= 0:
        raise ValueError("ramp rates must be positive")
    frac = np.arange(n) / max(1, n - 1)
    if strategy == "linear":
        rates = start_rate + (end_rate - start_rate) * frac
    elif strategy == "exponential":
        rates = start_rate * (end_rate / start_rate) ** frac
    else:
        raise ValueError(f"unknown ramp strategy {strategy!r}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0, size=n) / rates
    gaps[0] = 0.0
    return np.cumsum(gaps)


def pair(times: Sequence[float] | np.ndarray, requests: Sequence[BenchRequest]) -> Trace:
    """Zip arrival times with requests (cycling through requests if there are fewer)."""
    if not requests:
        return []
    k = len(requests)
    return [TraceEntry(float(t), requests[i % k]) for i, t in enumerate(times)]


@dataclass(frozen=True)
class Phase:
    """A stretch of traffic: `duration_s` seconds of Poisson arrivals at `rate` req/s,
    with requests drawn uniformly from `pool`."""

    duration_s: float
    rate: float
    pool: tuple[BenchRequest, ...]
    name: str = ""


def phase_mix(phases: Sequence[Phase], cycles: int = 1, seed: int = 0,
              burstiness: float = 1.0) -> Trace:
    """Concatenate `phases` `cycles` times; each phase's arrivals are a gamma/Poisson
    process at its own rate, cut at its duration."""
    rng = np.random.default_rng(seed)
    out: Trace = []
    t0 = 0.0
    for _ in range(cycles):
        for ph in phases:
            if ph.rate > 0 and ph.pool:
                expected = ph.rate * ph.duration_s
                size = int(expected + 6 * math.sqrt(expected) + 10)
                if math.isinf(burstiness):
                    gaps = np.full(size, 1.0 / ph.rate)
                else:
                    gaps = rng.gamma(burstiness, 1.0 / (ph.rate * burstiness), size=size)
                times = np.cumsum(gaps)
                times = times[times < ph.duration_s]
                picks = rng.integers(0, len(ph.pool), size=len(times))
                out.extend(TraceEntry(t0 + float(t), ph.pool[int(i)])
                           for t, i in zip(times, picks, strict=True))
            t0 += ph.duration_s
    return out


def split_by_shape(requests: Sequence[BenchRequest]) -> tuple[tuple[BenchRequest, ...],
                                                              tuple[BenchRequest, ...]]:
    """Split requests into (prefill-heavy, decode-heavy) halves by prompt/output ratio."""
    ranked = sorted(requests, key=lambda r: r.prompt_tokens / max(1, r.output_tokens))
    half = len(ranked) // 2
    return tuple(ranked[half:]), tuple(ranked[:half])


def synthetic_pool(num: int, prompt_tokens: int, output_tokens: int, seed: int = 0,
                   spread: float = 0.25) -> tuple[BenchRequest, ...]:
    """Length-only requests around the given means (uniform +-spread), with filler text."""
    rng = np.random.default_rng(seed)
    ps = np.maximum(1, (prompt_tokens * rng.uniform(1 - spread, 1 + spread, num)).astype(int))
    os_ = np.maximum(1, (output_tokens * rng.uniform(1 - spread, 1 + spread, num)).astype(int))
    return tuple(BenchRequest(synthetic_prompt(int(p), seed + i), int(p), int(o))
                 for i, (p, o) in enumerate(zip(ps, os_, strict=True)))


def shifting_phases(rate: float, phase_s: float, prefill_pool: Sequence[BenchRequest],
                    decode_pool: Sequence[BenchRequest]) -> list[Phase]:
    """The standard two-phase mix: long prompts, then long outputs, same request rate."""
    return [Phase(phase_s, rate, tuple(prefill_pool), "long-prompt"),
            Phase(phase_s, rate, tuple(decode_pool), "long-output")]


def scale_rate(trace: Trace, factor: float) -> Trace:
    """Replay a trace `factor` times faster (Arrow's way of sweeping a real trace)."""
    return [TraceEntry(e.arrival_s / factor, e.request) for e in trace]


def save_trace(trace: Trace, path: Path, with_prompts: bool = False) -> None:
    """Write a trace as JSON lines: arrival_s, prompt_tokens, output_tokens[, prompt]."""
    with open(path, "w", encoding="utf-8") as f:
        for e in trace:
            row: dict = {"arrival_s": e.arrival_s, "prompt_tokens": e.request.prompt_tokens,
                         "output_tokens": e.request.output_tokens}
            if with_prompts:
                row["prompt"] = e.request.prompt
            f.write(json.dumps(row) + "\n")


def load_trace(path: Path) -> Trace:
    """Read a trace: our JSON lines, or a CSV with Azure-LLM-trace columns
    (TIMESTAMP, ContextTokens, GeneratedTokens). Missing prompts get filler text;
    times are shifted so the first arrival is at 0."""
    rows: list[tuple[float, int, int, str | None]] = []
    if Path(path).suffix == ".csv":
        import datetime as dt

        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                stamp = row["TIMESTAMP"]
                try:
                    t = float(stamp)
                except ValueError:
                    t = dt.datetime.fromisoformat(stamp[:26]).timestamp()
                rows.append((t, int(row["ContextTokens"]), int(row["GeneratedTokens"]), None))
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    rows.append((float(d["arrival_s"]), int(d["prompt_tokens"]),
                                 int(d["output_tokens"]), d.get("prompt")))
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    t0 = rows[0][0]
    return [TraceEntry(t - t0, BenchRequest(p if p is not None else synthetic_prompt(pt, i),
                                            pt, ot))
            for i, (t, pt, ot, p) in enumerate(rows)]
