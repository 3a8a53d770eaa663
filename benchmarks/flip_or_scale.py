"""Flip-or-scale vs flip-only vs scale-only in the simulator, on a trace whose load doubles
for 10 minutes.

The cluster starts with `--workers` (half prefill) and may grow to `--max-workers`; a new
worker serves `--start-time` seconds after it is asked for (the start-up cost), and its
worker-seconds count from the ask. The base rate is `--base-fraction` of the starting
cluster's own capacity (its highest Poisson rate at 90% SLO attainment with a static split,
found first by a sweep), so the doubled phase needs more workers than the cluster has:
flipping alone cannot serve it, scaling alone pays start-ups for every imbalance.

Reported per system and seed (JSON): SLO attainment and goodput (requests within both SLOs
per second) over the whole trace and inside the doubled phase, worker-seconds, flips and
scale actions; and the ratios of flip-or-scale's goodput to the other two, side by side on
the same traces.

    python -m benchmarks.flip_or_scale --seeds 2 --out benchmarks/results
    # short bursts: 40 s doublings every 3 minutes, five times
    python -m benchmarks.flip_or_scale --seeds 2 --base-s 70 --double-s 40 --cycles 5 \
        --name flip_or_scale_bursts
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.arrivals import Phase, Trace, pair, phase_mix, poisson_times
from benchmarks.dataset import approx_token_count, load_sharegpt, sample_requests
from benchmarks.metrics import SLO
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, SimResult, Simulator
from benchmarks.sweep import sweep_rates

SYSTEMS = {
    "static": None,
    "flip-only": {"mode": "flip-only"},
    "scale-only": {"mode": "scale-only"},
    "flip-or-scale": {"mode": "flip-or-scale"},
}


def doubling_trace(pool: Sequence, base_rate: float, base_s: float, double_s: float,
                   seed: int, cycles: int = 1) -> Trace:
    """`base_s` at the base rate, `double_s` at twice that, `base_s` at the base rate;
    with `cycles` > 1 that pattern repeats (short bursts)."""
    return phase_mix([Phase(base_s, base_rate, tuple(pool), "base"),
                      Phase(double_s, 2 * base_rate, tuple(pool), "doubled"),
                      Phase(base_s, base_rate, tuple(pool), "base")], cycles=cycles,
                     seed=seed)


def good_mask(res: SimResult, slo: SLO) -> np.ndarray:
    """Requests that finished within the TTFT and TPOT targets (vLLM's goodput rule)."""
    ok = ~res.failed
    ttft = res.ttft
    out = np.maximum(res.output_tokens - 1, 1)
    tpot = np.where(res.output_tokens > 1, (res.latency - ttft) / out, 0.0)
    good = ok.copy()
    if slo.ttft_ms is not None:
        good &= ttft * 1000 <= slo.ttft_ms
    if slo.tpot_ms is not None:
        good &= tpot * 1000 <= slo.tpot_ms
    return good


def summarize(res: SimResult, slo: SLO, window: tuple[float, float], duration: float) -> dict:
    good = good_mask(res, slo)
    inside = (res.arrival >= window[0]) & (res.arrival < window[1])
    return {
        "requests": int(res.arrival.size),
        "slo_attainment": round(float(good.mean()), 4),
        "goodput_req_s": round(float(good.sum()) / duration, 3),
        "doubled_phase_attainment": round(float(good[inside].mean()), 4),
        "worker_seconds": round(res.worker_seconds, 1),
        "good_requests_per_worker_hour": round(3600 * float(good.sum()) / res.worker_seconds,
                                               1),
        "flips": len(res.flips), "scale_actions": len(res.scales),
        "scales": [(round(t, 1), d, w, why[:120]) for t, d, w, why in res.scales],
        "roles": res.roles[:: max(1, len(res.roles) // 200)],
    }


def capacity(perf, slo: SLO, prefill: int, decode: int, pool: Sequence,  # noqa: ANN001
             seed: int) -> float:
    """The highest Poisson rate a static split serves at 90% attainment (120 s traces)."""
    def evaluate(rate: float) -> dict:
        sim = Simulator(SimConfig(prefill=prefill, decode=decode, slo=slo), perf,
                        make_routing("least-loaded"))
        trace = pair(poisson_times(int(rate * 120), rate, seed), list(pool))
        return sim.run(trace).metrics(slo, (50, 90))

    rates = [8 * 2 ** (i / 2) for i in range(12)]
    return sweep_rates(evaluate, rates, 0.9, refine_steps=4).max_rate or rates[0]


def run(out_dir: Path, workers: int, max_workers: int, start_time_s: float, seeds: int,
        base_fraction: float, base_s: float, double_s: float, slo: SLO, gpu: str, model: str,
        hold_s: float, cycles: int = 1, name: str = "flip_or_scale") -> dict:
    perf = roofline(model, gpu)
    pool = sample_requests(load_sharegpt(), approx_token_count, 5000, 0)
    p = workers // 2
    cap = capacity(perf, slo, p, workers - p, pool, 0)
    base_rate = base_fraction * cap
    window = (base_s, base_s + double_s)  # the first doubled phase
    results: dict = {
        "gpu": gpu, "model": model, "slo": slo.as_dict(), "workers": workers,
        "max_workers": max_workers, "start_time_s": start_time_s, "hold_s": hold_s,
        "static_capacity_req_s": round(cap, 2), "base_rate_req_s": round(base_rate, 2),
        "phases_s": [base_s, double_s, base_s], "cycles": cycles, "seeds": {}}
    for seed in range(seeds):
        trace = doubling_trace(pool, base_rate, base_s, double_s, seed, cycles)
        duration = cycles * (2 * base_s + double_s)
        per: dict = {}
        for name, knobs in SYSTEMS.items():
            t0 = time.process_time()
            control = None if knobs is None else make_control("flip-or-scale", {
                **knobs, "start_time_s": str(start_time_s), "hold_s": str(hold_s),
                "min_workers": str(workers), "max_workers": str(max_workers)})
            cfg = SimConfig(prefill=p, decode=workers - p, slo=slo, flip_rewarm_s=2.0,
                            spare=max_workers - workers, start_time_s=start_time_s,
                            control_interval_s=2.0)
            res = Simulator(cfg, perf, make_routing("least-loaded"), control).run(trace)
            per[name] = summarize(res, slo, window, duration)
            per[name]["sim_cpu_s"] = round(time.process_time() - t0, 2)
            print(f"seed {seed} {name:<14} attainment {per[name]['slo_attainment']:.3f} "
                  f"goodput {per[name]['goodput_req_s']:.1f}/s worker-s "
                  f"{per[name]['worker_seconds']:.0f} flips {per[name]['flips']} scales "
                  f"{per[name]['scale_actions']}", file=sys.stderr, flush=True)
        fos = per["flip-or-scale"]["goodput_req_s"]
        per["ratios"] = {f"flip-or-scale/{k}": round(fos / per[k]["goodput_req_s"], 4)
                         for k in ("flip-only", "scale-only", "static")
                         if per[k]["goodput_req_s"]}
        results["seeds"][str(seed)] = per
    keys = results["seeds"]["0"]["ratios"].keys()
    results["ratios_median"] = {
        k: statistics.median(s["ratios"][k] for s in results["seeds"].values()) for k in keys}
    results["ratios_range"] = {
        k: [min(s["ratios"][k] for s in results["seeds"].values()),
            max(s["ratios"][k] for s in results["seeds"].values())] for k in keys}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flip_or_scale",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--start-time", type=float, default=60.0,
                        help="seconds from asking for a worker to its first request")
    parser.add_argument("--hold", type=float, default=120.0,
                        help="idle seconds before a worker is given back")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--base-fraction", type=float, default=0.6,
                        help="base rate as a fraction of the starting cluster's capacity")
    parser.add_argument("--base-s", type=float, default=300.0)
    parser.add_argument("--double-s", type=float, default=600.0)
    parser.add_argument("--cycles", type=int, default=1,
                        help="repeat base/doubled/base this many times")
    parser.add_argument("--name", default="flip_or_scale", help="JSON file name")
    parser.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:40"])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model", default="llama-3.1-8b")
    args = parser.parse_args(argv)
    res = run(args.out, args.workers, args.max_workers, args.start_time, args.seeds,
              args.base_fraction, args.base_s, args.double_s, SLO.parse(args.goodput),
              args.gpu, args.model, args.hold, args.cycles, args.name)
    print(json.dumps({k: res[k] for k in ("static_capacity_req_s", "base_rate_req_s",
                                           "ratios_median", "ratios_range")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
