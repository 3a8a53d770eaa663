"""How well does DOPD's forecast of its pool needs predict the traffic to come?

    python -m benchmarks.dopd_forecast --out benchmarks/results/dopd_forecast.json

The DOPD controller sizes the pools from the needs of the last `window` seconds (prefill
workers `λ·t_p(ISL)/ρ_P`, decode workers `λ·OSL/(cap_D·ρ_D)`, constants calibrated on the
Llama-3.1-8B/H100 performance model). Every `tick` seconds a forecaster turns the current
need into a prediction `h` seconds ahead; this script replays the arrivals of the phase
trace (60 s phases: 3000 in / 60 out, then 150 in / 700 out) and of ShareGPT with Poisson
arrivals and reports the mean absolute error, in workers, of

* `last_value`: the naive forecast (the window's need now);
* `holt_round1`: Holt's linear method with round-1 DOPD's constants (alpha 0.5, beta 0.3,
  extrapolation capped at 5 s between updates);
* `holt_tuned`: Holt with (alpha, beta) chosen on a separate seed of the same trace;

against two targets: the window's need at t+h (what the controller will see then) and the
traffic's need in the `bin` seconds ending at t+h (what the cluster will have to serve).
Output lengths are taken at arrival here (the forecast is judged, not the lag of learning
lengths at completion).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from benchmarks.arrivals import Trace
from benchmarks.policy_eval import workloads
from benchmarks.sim.perf import roofline
from instance_manager.controller.calibrate import dopd_knobs
from instance_manager.controller.dopd import DOPDConfig, DOPDController, HoltForecast

RATES = {"phase-60s": 60.0, "sharegpt-poisson": 400.0}


def need_series(trace: Trace, policy: DOPDController, span_s: float, tick_s: float,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tick times, prefill need, decode need) over trailing windows of `span_s`."""
    cfg = policy.config
    t = np.array([a for a, _ in trace])
    isl = np.array([r.prompt_tokens for _, r in trace], dtype=float)
    osl = np.array([r.output_tokens for _, r in trace], dtype=float)
    capacity = cfg.decode_tokens_per_s
    ticks = np.arange(span_s, t.max(), tick_s)
    need_p, need_d = [], []
    for now in ticks:
        lo, hi = np.searchsorted(t, now - span_s), np.searchsorted(t, now)
        n = hi - lo
        rate = n / span_s
        if n == 0:
            need_p.append(0.0)
            need_d.append(0.0)
            continue
        need_p.append(rate * policy.prefill_seconds(isl[lo:hi].mean())
                      / cfg.prefill_utilization)
        need_d.append(rate * osl[lo:hi].mean() / (capacity * cfg.decode_utilization))
    return ticks, np.array(need_p), np.array(need_d)


Forecaster = Callable[[], Callable[[float, float], float]]


def holt(alpha: float, beta: float, horizon_s: float) -> Forecaster:
    def make() -> Callable[[float, float], float]:
        model = HoltForecast(alpha, beta, max_extrapolation_s=5.0)
        return lambda value, now: model.update(value, now, horizon_s)
    return make


def last_value() -> Callable[[float, float], float]:
    return lambda value, now: value


def forecast_mae(ticks: np.ndarray, series: np.ndarray, target: np.ndarray,
                 make: Forecaster, steps: int) -> float:
    """MAE of forecasts made at tick i for target[i + steps]."""
    f = make()
    preds = np.array([f(v, now) for now, v in zip(ticks, series, strict=True)])
    if steps >= len(series):
        return float("nan")
    return float(np.mean(np.abs(preds[:-steps] - target[steps:])))


GRID = (0.2, 0.5, 0.8)
BETAS = (0.05, 0.1, 0.3)


def evaluate(make_trace: Callable[[float], Trace], tune_trace: Callable[[float], Trace],
             rate: float, policy: DOPDController, window_s: float, tick_s: float,
             bin_s: float, horizons: Sequence[float]) -> dict:
    ticks, need_p, need_d = need_series(make_trace(rate), policy, window_s, tick_s)
    _, inst_p, inst_d = need_series(make_trace(rate), policy, bin_s, tick_s)
    tticks, tune_p, tune_d = need_series(tune_trace(rate), policy, window_s, tick_s)
    out: dict = {}
    for h in horizons:
        steps = int(round(h / tick_s))
        row: dict = {}
        for pool, series, inst, tune in (("prefill", need_p, inst_p, tune_p),
                                         ("decode", need_d, inst_d, tune_d)):
            n = min(len(series), len(inst))
            series, inst = series[:n], inst[:n]
            tuned = min(itertools.product(GRID, BETAS), key=lambda ab: forecast_mae(
                tticks, tune, tune, holt(ab[0], ab[1], h), steps))
            forecasters = {"last_value": last_value, "holt_round1": holt(0.5, 0.3, h),
                           "holt_tuned": holt(tuned[0], tuned[1], h)}
            row[pool] = {
                "mean_need_workers": round(float(series.mean()), 3),
                "holt_tuned_alpha_beta": list(tuned),
                "mae_vs_future_window": {k: round(forecast_mae(ticks[:n], series, series, f,
                                                               steps), 4)
                                         for k, f in forecasters.items()},
                "mae_vs_future_traffic": {k: round(forecast_mae(ticks[:n], series, inst, f,
                                                                steps), 4)
                                          for k, f in forecasters.items()},
            }
        out[f"h={h:g}s"] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dopd_forecast",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune-seed", type=int, default=1)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--tick-s", type=float, default=1.0)
    parser.add_argument("--bin-s", type=float, default=2.0)
    parser.add_argument("--horizons", default="2,5,10")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dopd_forecast.json"))
    args = parser.parse_args(argv)
    perf = roofline("llama-3.1-8b", "h100")
    knobs = dopd_knobs(perf, 0.04)
    policy = DOPDController(DOPDConfig(**knobs))
    test, tune = workloads(60.0, 120.0, args.seed), workloads(60.0, 120.0, args.tune_seed)
    horizons = [float(h) for h in args.horizons.split(",")]
    result = {"seed": args.seed, "tune_seed": args.tune_seed, "window_s": args.window_s,
              "tick_s": args.tick_s, "bin_s": args.bin_s, "rates": RATES, "dopd_knobs": knobs,
              "traces": {}}
    for name, rate in RATES.items():
        result["traces"][name] = evaluate(test[name], tune[name], rate, policy, args.window_s,
                                          args.tick_s, args.bin_s, horizons)
        print(name, json.dumps(result["traces"][name], indent=1), file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
