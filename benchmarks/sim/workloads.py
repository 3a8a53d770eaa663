"""The comparison's traces: each a function (rate, seed) -> Trace, plus what an oracle may
know of it (its phase schedule) and how long its warm-up is.

* `phase-700` / `phase-1400`: minute-long phases alternating prompt-heavy requests
  (3000 in / 60 out) with output-heavy ones (150 in / 700 out, or 150 in / 1400 out, a mix
  no single split serves well), two cycles, Poisson arrivals at the same request rate.
* `sharegpt-poisson` / `sharegpt-gamma`: the packaged ShareGPT sample with Poisson
  arrivals, or gamma arrivals of shape 0.25 (coefficient of variation 2: bursts).
* `azure-day`: a day compressed into `day_s` seconds, synthesised with the published
  statistics of the Azure LLM inference trace 2023 (Patel et al., "Splitwise", ISCA 2024;
  `github.com/Azure/AzurePublicDataset`, AzureLLMInferenceDataset2023.md); nothing is
  downloaded. Two services: conversation (median prompt 1020 tokens, median output 129)
  and code (median prompt 1500, median output 13), from the Splitwise paper's trace
  characterisation (recalled, not re-read here). Output p90: conversation 398, code 49
  (as reported second-hand for the Azure traces by later papers). Prompt spread is an
  assumption (log-normal sigma 1.0 conversation, 0.8 code; no primary p90 found). The
  arrival rate follows a diurnal curve (trough at 0.4x, peak at 1.6x the mean), and the
  code share moves from 30% at night to 60% at the working-day peak (assumption: the
  public traces show a diurnal load; the exact curve here is illustrative).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from benchmarks.arrivals import (
    Phase,
    Trace,
    TraceEntry,
    gamma_times,
    pair,
    phase_mix,
    synthetic_pool,
)
from benchmarks.dataset import BenchRequest, approx_token_count, load_sharegpt, sample_requests


@dataclass
class Workload:
    name: str
    make: Callable[[float, int], Trace]
    warmup_s: float
    # (start s, pool name) per phase, for the oracle; empty: no schedule to know
    schedule: list[tuple[float, str]] = field(default_factory=list)
    pools: dict[str, tuple[BenchRequest, ...]] = field(default_factory=dict)
    description: str = ""

    def sample(self, seed: int = 0) -> list[BenchRequest]:
        """Requests representative of the whole trace (for capacity estimates)."""
        return [r for _, r in self.make(10.0, seed)]


def _phase_workload(name: str, out_long: int, phase_s: float, cycles: int) -> Workload:
    prompt_heavy = synthetic_pool(200, 3000, 60, seed=11)
    output_heavy = synthetic_pool(200, 150, out_long, seed=12)
    pools = {"prompt-heavy": prompt_heavy, "output-heavy": output_heavy}

    def make(rate: float, seed: int) -> Trace:
        cycle = [Phase(phase_s, rate, prompt_heavy, "prompt-heavy"),
                 Phase(phase_s, rate, output_heavy, "output-heavy")]
        return phase_mix(cycle, cycles=cycles, seed=seed)

    schedule = [(i * phase_s, "prompt-heavy" if i % 2 == 0 else "output-heavy")
                for i in range(2 * cycles)]
    return Workload(name, make, warmup_s=min(20.0, phase_s / 3), schedule=schedule,
                    pools=pools, description=f"{phase_s:g} s phases: 3000/60 then "
                    f"150/{out_long} (in/out tokens), {cycles} cycles, Poisson")


def sharegpt_workload(name: str, duration_s: float, burstiness: float) -> Workload:
    pool = sample_requests(load_sharegpt(), approx_token_count, 5000, 0)

    def make(rate: float, seed: int) -> Trace:
        n = max(1, int(rate * duration_s))
        return pair(gamma_times(n, rate, burstiness, seed), _shuffled(pool, seed))

    kind = "Poisson" if burstiness == 1.0 else f"gamma arrivals (shape {burstiness:g})"
    return Workload(name, make, warmup_s=min(20.0, duration_s / 6),
                    description=f"ShareGPT, {kind}, {duration_s:g} s")


def _shuffled(pool: list[BenchRequest], seed: int) -> list[BenchRequest]:
    order = np.random.default_rng(seed + 7919).permutation(len(pool))
    return [pool[i] for i in order]


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int,
               cap: int) -> np.ndarray:
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), 1, cap)


def _sigma_from_p90(median: float, p90: float) -> float:
    return math.log(p90 / median) / 1.2816  # z(0.9)


AZURE_CONV = {"prompt_median": 1020, "prompt_sigma": 1.0, "output_median": 129,
              "output_p90": 398}
AZURE_CODE = {"prompt_median": 1500, "prompt_sigma": 0.8, "output_median": 13,
              "output_p90": 49}


def _azure_workload(name: str, day_s: float) -> Workload:
    def make(rate: float, seed: int) -> Trace:
        rng = np.random.default_rng(seed + 104729)
        # non-homogeneous Poisson by thinning: rate(t) = mean * (1 + 0.6 sin(...)),
        # trough at 04:00 of the compressed day, peak at 16:00
        peak = 1.6 * rate
        n_max = int(peak * day_s + 6 * math.sqrt(peak * day_s) + 10)
        times = np.cumsum(rng.exponential(1.0 / peak, n_max))
        times = times[times < day_s]
        phase = 2 * math.pi * (times / day_s - 10 / 24)
        shape = 1 + 0.6 * np.sin(phase)
        keep = rng.uniform(size=times.size) < shape / 1.6
        times = times[keep]
        code_share = 0.45 + 0.15 * np.sin(phase[keep])
        is_code = rng.uniform(size=times.size) < code_share
        out = []
        n = times.size
        conv = _draw(rng, AZURE_CONV, n)
        code = _draw(rng, AZURE_CODE, n)
        for i, t in enumerate(times):
            p, o = code[i] if is_code[i] else conv[i]
            out.append(TraceEntry(float(t), BenchRequest("", int(p), int(o))))
        if out:
            t0 = out[0].arrival_s
            out = [TraceEntry(e.arrival_s - t0, e.request) for e in out]
        return out

    return Workload(name, make, warmup_s=min(20.0, day_s / 12),
                    description=f"Azure-2023-like day in {day_s:g} s: conversation + code, "
                    "diurnal rate 0.4-1.6x mean")


def _draw(rng: np.random.Generator, stats: dict, n: int) -> list[tuple[int, int]]:
    prompts = _lognormal(rng, stats["prompt_median"], stats["prompt_sigma"], n, 8000)
    sigma_out = _sigma_from_p90(stats["output_median"], stats["output_p90"])
    outputs = _lognormal(rng, stats["output_median"], sigma_out, n, 2000)
    return list(zip(prompts.tolist(), outputs.tolist(), strict=True))


def workloads(quick: bool = False) -> dict[str, Workload]:
    """Every trace of the comparison (`quick`: short versions for tests)."""
    phase_s = 6.0 if quick else 60.0
    other_s = 12.0 if quick else 60.0
    day_s = 24.0 if quick else 180.0
    out = [_phase_workload("phase-700", 700, phase_s, 2),
           _phase_workload("phase-1400", 1400, phase_s, 2),
           sharegpt_workload("sharegpt-poisson", other_s, 1.0),
           sharegpt_workload("sharegpt-gamma", other_s, 0.25),
           _azure_workload("azure-day", day_s)]
    return {w.name: w for w in out}
