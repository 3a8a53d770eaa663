"""Side-by-side comparison in the simulator: every system on the same traces.

Systems: aggregated (vLLM-like, chunked prefill on every worker), static P/D at several
ratios (DistServe-like), and the adaptive policies that exist in the repo (Arrow, DOPD,
ARES decode placement). For each workload, a rate sweep finds the highest request rate
that keeps >= 90% SLO attainment; goodput ratios are relative to the best static split.
SLAI is an intra-engine iteration scheduler and is not modelled here.

    python -m benchmarks.sim.compare --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.arrivals import Phase, Trace, pair, phase_mix, poisson_times, synthetic_pool
from benchmarks.dataset import approx_token_count, load_sharegpt, sample_requests
from benchmarks.metrics import SLO
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, Simulator
from benchmarks.sweep import sweep_rates


@dataclass(frozen=True)
class System:
    name: str
    prefill: int
    decode: int
    routing: str = "least-loaded"
    control: str = "none"


def systems(n: int) -> list[System]:
    out = [System("aggregated", 0, n)]
    for p in sorted({n // 4, n // 2, (3 * n) // 4} - {0, n}):
        out.append(System(f"static-{p}P{n - p}D", p, n - p))
    out += [System("arrow", n // 2, n - n // 2, "arrow", "arrow"),
            System("dopd", n // 2, n - n // 2, "dopd-match", "dopd"),
            System("dopd+ares", n // 2, n - n // 2, "ares", "dopd")]
    return out


def workloads(duration_s: float, seed: int) -> dict:
    """name -> function(rate) -> Trace."""
    prompt_heavy = synthetic_pool(200, 3000, 60, seed=seed)
    output_heavy = synthetic_pool(200, 150, 700, seed=seed + 1)
    sharegpt = sample_requests(load_sharegpt(), approx_token_count, 5000, seed)

    def phases(rate: float) -> Trace:
        cycle = [Phase(duration_s / 4, rate, prompt_heavy, "long-prompt"),
                 Phase(duration_s / 4, rate, output_heavy, "long-output")]
        return phase_mix(cycle, cycles=2, seed=seed)

    def poisson(rate: float) -> Trace:
        return pair(poisson_times(int(rate * duration_s), rate, seed), sharegpt)

    return {"phase-shift": phases, "sharegpt-poisson": poisson}


def run(out_dir: Path, workers: int, duration_s: float, rates: Sequence[float], slo: SLO,
        seed: int, refine: int, gpu: str, model: str) -> dict:
    perf = roofline(model, gpu)
    results: dict = {"perf": perf.describe(), "slo": slo.as_dict(), "workers": workers,
                     "duration_s": duration_s, "seed": seed, "workloads": {}}
    for wname, make_trace in workloads(duration_s, seed).items():
        per_system = {}
        for sysdef in systems(workers):
            print(f"[{wname}] {sysdef.name}", file=sys.stderr, flush=True)
            roles: dict[float, list] = {}

            def evaluate(rate: float, sysdef: System = sysdef, roles: dict = roles,
                         make_trace=make_trace) -> dict:
                cfg = SimConfig(prefill=sysdef.prefill, decode=sysdef.decode, slo=slo)
                sim = Simulator(cfg, perf, make_routing(sysdef.routing),
                                make_control(sysdef.control))
                res = sim.run(make_trace(rate))
                roles[rate] = res.roles
                return res.metrics(slo, (50, 90, 99))

            try:
                sweep = sweep_rates(evaluate, rates, 0.9, refine)
                best = sweep.max_rate
                per_system[sysdef.name] = {**sysdef.__dict__, "max_rate": best,
                                           "sweep": sweep.as_dict()["points"],
                                           "roles_at_max": roles.get(best) if best else None}
            except Exception as exc:  # a policy still under construction must not stop the run
                per_system[sysdef.name] = {**sysdef.__dict__, "error": repr(exc),
                                           "traceback": traceback.format_exc(limit=3)}
        statics = [v["max_rate"] for k, v in per_system.items()
                   if k.startswith("static") and v.get("max_rate")]
        base = max(statics) if statics else None
        for v in per_system.values():
            if base and v.get("max_rate"):
                v["rate_vs_best_static"] = v["max_rate"] / base
        results["workloads"][wname] = per_system
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sim_comparison.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out_dir)
    return results


def plot(results: dict, out_dir: Path) -> None:
    from benchmarks.plots import plot_goodput_vs_rate, plot_roles_over_time

    for wname, per_system in results["workloads"].items():
        series = {name: [(p["request_rate"], p) for p in v["sweep"]]
                  for name, v in per_system.items() if "sweep" in v}
        plot_goodput_vs_rate(series, out_dir / f"sim_{wname}_attainment.png")
        roles = {name: v["roles_at_max"] for name, v in per_system.items()
                 if v.get("roles_at_max") and len(v["roles_at_max"]) > 1}
        if roles:
            plot_roles_over_time(roles, out_dir / f"sim_{wname}_roles.png")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="simulated seconds")
    parser.add_argument("--rates", default="4,8,16,32,64,128,256,512,1024")
    parser.add_argument("--refine", type=int, default=3)
    parser.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:40"])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args.out, args.workers, args.duration,
              [float(r) for r in args.rates.split(",")], SLO.parse(args.goodput), args.seed,
              args.refine, args.gpu, args.model)
    for wname, per_system in res["workloads"].items():
        print(f"== {wname}")
        for name, v in per_system.items():
            print(f"  {name:<18} max rate @90%: {v.get('max_rate')}  "
                  f"vs best static: {v.get('rate_vs_best_static')}  {v.get('error', '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
