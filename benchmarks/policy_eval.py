"""Adaptive policies against their round-1 versions and static/aggregated baselines.

    python -m benchmarks.policy_eval --seeds 0,1,2 --out benchmarks/results/policy_eval.json

(or one process per seed, `--seeds N --out part_N.json`, then `--merge part_*.json`)

Simulator (`benchmarks.sim`), 8 workers, every P/D system starting at 4P4D. Traces: the
phase trace with minute-long phases (long prompts 3000 in / 60 out, then long outputs
150 in / 700 out, two cycles) and ShareGPT with Poisson arrivals. For each system, seed and
trace a rate grid plus bisection finds the highest rate with >= 90% SLO attainment (TTFT
and mean TPOT). "best static" is, per seed, the best of the static splits run here
(chosen after the fact). Systems:

* `arrow` / `arrow-r1`: Arrow routing + controller, now (inline flips on predicted misses,
  slot/KV queueing in the decode prediction, several flips) and with the round-1 knobs;
* `dopd` / `dopd-r1`: DOPD-match routing + the DOPD controller, now (need-based target,
  jump, 1-2 s decisions) and round 1 (work share, one flip per 10 s, old sub-pool rule);
* `dopd-no-warmup`: `dopd` deciding on the first finished requests (`warmup_s=0`);
* `static-kPnD`, `aggregated` (token budget 8192 and 512).

DOPD's throughput constants and Arrow's prefill throughput come from the performance model
(`instance_manager.controller.calibrate`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.arrivals import Phase, Trace, pair, phase_mix, poisson_times, synthetic_pool
from benchmarks.dataset import approx_token_count, load_sharegpt, sample_requests
from benchmarks.metrics import SLO
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import roofline
from benchmarks.sim.simulator import SimConfig, Simulator
from benchmarks.sweep import sweep_rates
from instance_manager.controller.arrow import ROUND1_KNOBS as ARROW_R1
from instance_manager.controller.arrow import ArrowConfig, ArrowController
from instance_manager.controller.calibrate import arrow_knobs, dopd_knobs
from instance_manager.controller.dopd import ROUND1_KNOBS as DOPD_R1
from instance_manager.controller.dopd import DOPDConfig, DOPDController
from router.policies.arrow import ArrowRouting, ArrowTargets
from router.policies.dopd_match import ROUND1_MATCH, DOPDMatchConfig, DOPDMatchPolicy
from router.policy import LeastLoadedPolicy

WORKERS = 8


@dataclass(frozen=True)
class System:
    name: str
    prefill: int
    decode: int
    routing: Callable[[], object]
    control: Callable[[], object | None] = lambda: None
    engine: EngineConfig = field(default_factory=EngineConfig)


def systems(dopd: dict, arrow: dict, slo: SLO, statics: Sequence[int]) -> list[System]:
    tpot = (slo.tpot_ms or 100.0) / 1000
    ttft = (slo.ttft_ms or 1000.0) / 1000
    half = WORKERS // 2
    out = [System("aggregated", 0, WORKERS, LeastLoadedPolicy),
           System("aggregated-512", 0, WORKERS, LeastLoadedPolicy,
                  engine=EngineConfig(token_budget=512))]
    out += [System(f"static-{p}P{WORKERS - p}D", p, WORKERS - p, LeastLoadedPolicy)
            for p in statics]
    out += [
        System("arrow-r1", half, half,
               lambda: ArrowRouting(ArrowTargets(ttft_s=ttft, tpot_s=tpot, decode_slots=0,
                                                 kv_full=2.0)),
               lambda: ArrowController(ArrowConfig(**ARROW_R1))),
        System("arrow", half, half, lambda: ArrowRouting(ArrowTargets(ttft_s=ttft, tpot_s=tpot)),
               lambda: ArrowController(ArrowConfig(**arrow))),
        System("dopd-r1", half, half, lambda: DOPDMatchPolicy(ROUND1_MATCH),
               lambda: DOPDController(DOPDConfig(**{**dopd, **DOPD_R1}))),
        System("dopd", half, half, lambda: DOPDMatchPolicy(DOPDMatchConfig()),
               lambda: DOPDController(DOPDConfig(**dopd))),
        System("dopd-no-warmup", half, half, lambda: DOPDMatchPolicy(DOPDMatchConfig()),
               lambda: DOPDController(DOPDConfig(**{**dopd, "warmup_s": 0.0}))),
    ]
    return out


def workloads(phase_s: float, poisson_s: float, seed: int) -> dict[str, Callable[[float], Trace]]:
    prompt_heavy = synthetic_pool(200, 3000, 60, seed=seed)
    output_heavy = synthetic_pool(200, 150, 700, seed=seed + 1)
    sharegpt = sample_requests(load_sharegpt(), approx_token_count, 5000, seed)

    def phases(rate: float) -> Trace:
        return phase_mix([Phase(phase_s, rate, prompt_heavy, "long-prompt"),
                          Phase(phase_s, rate, output_heavy, "long-output")], cycles=2,
                         seed=seed)

    def poisson(rate: float) -> Trace:
        return pair(poisson_times(int(rate * poisson_s), rate, seed), sharegpt)

    return {"phase-60s": phases, "sharegpt-poisson": poisson}


RATES = {"phase-60s": (24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128),
         "sharegpt-poisson": (192, 256, 320, 384, 448, 512, 576, 640, 768)}


def run(seeds: Sequence[int], phase_s: float, poisson_s: float, slo: SLO, refine: int,
        flip_rewarm_s: float, only: set[str] | None, statics: Sequence[int],
        traces: set[str] | None, migration: str = "recompute") -> dict:
    perf = roofline("llama-3.1-8b", "h100")
    dopd = dopd_knobs(perf, (slo.tpot_ms or 100.0) / 1000, EngineConfig().max_num_seqs)
    arrow = arrow_knobs(perf, (slo.tpot_ms or 100.0) / 1000, EngineConfig().max_num_seqs)
    chosen = [s for s in systems(dopd, arrow, slo, statics) if not only or s.name in only]
    out: dict = {"perf": perf.describe(), "slo": slo.as_dict(), "workers": WORKERS,
                 "phase_s": phase_s, "poisson_s": poisson_s, "seeds": list(seeds),
                 "flip_rewarm_s": flip_rewarm_s, "migration": migration, "refine": refine,
                 "dopd_knobs": dopd, "arrow_knobs": arrow,
                 "arrow_round1_knobs": ARROW_R1, "dopd_round1_knobs": DOPD_R1,
                 "workloads": {}}
    for seed in seeds:
        for wname, make_trace in workloads(phase_s, poisson_s, seed).items():
            if traces and wname not in traces:
                continue
            per = out["workloads"].setdefault(wname, {})
            for sysdef in chosen:
                t0 = time.process_time()

                def evaluate(rate: float, sysdef: System = sysdef,
                             make_trace: Callable[[float], Trace] = make_trace) -> dict:
                    cfg = SimConfig(prefill=sysdef.prefill, decode=sysdef.decode, slo=slo,
                                    engine=sysdef.engine, flip_rewarm_s=flip_rewarm_s,
                                    migration=migration)
                    res = Simulator(cfg, perf, sysdef.routing(), sysdef.control()).run(
                        make_trace(rate))
                    return res.metrics(slo, (50, 90, 99))

                sweep = sweep_rates(evaluate, RATES[wname], 0.9, refine)
                at_max = next((p for r, p in sweep.points if r == sweep.max_rate), {})
                per.setdefault(sysdef.name, {"seeds": {}})["seeds"][str(seed)] = {
                    "max_rate": sweep.max_rate, "flips_at_max": at_max.get("flips"),
                    "cpu_s": round(time.process_time() - t0, 1)}
                print(f"[{wname} seed {seed}] {sysdef.name:<16} {sweep.max_rate} "
                      f"({time.process_time() - t0:.0f} cpu-s)", file=sys.stderr, flush=True)
    for per in out["workloads"].values():
        summarize(per, seeds)
    return out


def summarize(per: dict, seeds: Sequence[int]) -> None:
    """Mean/min/max over seeds, best static per seed, and ratios per seed."""
    best_static = {}
    for s in map(str, seeds):
        rates = {k: v["seeds"][s]["max_rate"] or 0 for k, v in per.items()
                 if k.startswith("static") and s in v["seeds"]}
        if rates:
            best_static[s] = max(rates.values())
    if best_static:
        per["_best_static"] = {"seeds": {s: {"max_rate": r} for s, r in best_static.items()}}
    for name, v in per.items():
        rates = [x["max_rate"] or 0 for x in v["seeds"].values()]
        if not rates:
            continue
        v["mean"] = round(statistics.mean(rates), 1)
        v["min"], v["max"] = min(rates), max(rates)
        for base in ("_best_static", "static-4P4D", "aggregated", "aggregated-512",
                     "arrow-r1", "dopd-r1"):
            if base not in per or base == name:
                continue
            ratios = [(v["seeds"][s]["max_rate"] or 0) / per[base]["seeds"][s]["max_rate"]
                      for s in v["seeds"] if s in per[base]["seeds"]
                      and per[base]["seeds"][s]["max_rate"]]
            if ratios:
                v[f"vs_{base.strip('_')}"] = {"mean": round(statistics.mean(ratios), 3),
                                              "min": round(min(ratios), 3),
                                              "max": round(max(ratios), 3)}


def merge(parts: list[dict]) -> dict:
    """One result from runs over disjoint seeds (same systems and settings)."""
    out = {k: v for k, v in parts[0].items() if k not in ("workloads", "seeds")}
    out["seeds"] = sorted({s for p in parts for s in p["seeds"]})
    out["workloads"] = {}
    for part in parts:
        for wname, per in part["workloads"].items():
            into = out["workloads"].setdefault(wname, {})
            for name, v in per.items():
                if name.startswith("_"):
                    continue
                into.setdefault(name, {"seeds": {}})["seeds"].update(v["seeds"])
    for per in out["workloads"].values():
        summarize(per, out["seeds"])
    return out


def table(results: dict) -> str:
    lines = []
    for wname, per in results["workloads"].items():
        lines.append(f"== {wname}: max req/s at 90% attainment, mean [min-max] over seeds")
        for name, v in per.items():
            ratios = " ".join(f"{k}={r['mean']}" for k, r in v.items()
                              if k.startswith("vs_"))
            lines.append(f"  {name:<16} {v['mean']:>7} [{v['min']}-{v['max']}]  {ratios}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy_eval",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--phase-s", type=float, default=60.0)
    parser.add_argument("--poisson-s", type=float, default=60.0)
    parser.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:40"])
    parser.add_argument("--refine", type=int, default=3)
    parser.add_argument("--flip-rewarm", type=float, default=2.0)
    parser.add_argument("--migration", choices=("recompute", "kv"), default="recompute",
                        help="how a simulated ARES move continues: recompute or pull the KV")
    parser.add_argument("--statics", default="3,4,5")
    parser.add_argument("--only", default=None, help="comma-separated system names")
    parser.add_argument("--traces", default=None, help="comma-separated trace names")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/policy_eval.json"))
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="combine result files of separate runs (e.g. one per seed)")
    args = parser.parse_args(argv)
    if args.merge:
        res = merge([json.loads(p.read_text()) for p in args.merge])
        args.out.write_text(json.dumps(res, indent=2, default=str))
        print(table(res))
        return 0
    res = run([int(s) for s in args.seeds.split(",")], args.phase_s, args.poisson_s,
              SLO.parse(args.goodput), args.refine, args.flip_rewarm,
              set(args.only.split(",")) if args.only else None,
              [int(p) for p in args.statics.split(",")],
              set(args.traces.split(",")) if args.traces else None, args.migration)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
