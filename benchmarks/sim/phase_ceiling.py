"""Why aggregated serving at a small token budget beats every P/D schedule on a phase trace.

Each phase of a phase trace is run alone (same length, same warm-up exclusion as the
oracle's split search) for every static split and for aggregated serving at the given
token budgets, over a rate grid; the result is each system's max rate at >= 90% SLO
attainment per phase. No P/D schedule, however it moves workers, serves a phase better than
the best split for that phase alone, so `min over phases of (best split of that phase)`
bounds every P/D controller on the trace (flips free and instant; real flips only lower
it), the oracle schedule included. Where aggregated serving's own per-phase rates exceed
that bound in every phase, no P/D schedule can beat it on this engine model; the per-phase
numbers say which resource decides (a P/D split always keeps at least one worker out of
the pool that binds).

    python -m benchmarks.sim.phase_ceiling --out benchmarks/results/sim_phase_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.arrivals import Phase, phase_mix
from benchmarks.sim import compare
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_routing
from benchmarks.sim.simulator import SimConfig, Simulator


def phase_rates(setup: compare.Setup, wname: str, pool_name: str, prefill: int, budget: int,
                rates: Sequence[float], seed: int) -> list[dict]:
    """Attainment per rate of one system on one phase alone (prefill 0: aggregated)."""
    wl = compare._workload(wname, False)
    perf = roofline(setup.model, setup.gpu)
    phase_s = wl.schedule[1][0] - wl.schedule[0][0]
    out = []
    bad = 0
    for rate in rates:
        trace = phase_mix([Phase(phase_s, rate, wl.pools[pool_name])], seed=seed)
        cfg = SimConfig(prefill=prefill, decode=setup.workers - prefill, slo=setup.slo,
                        engine=EngineConfig(token_budget=budget), seed=seed)
        res = Simulator(cfg, perf, make_routing("least-loaded")).run(trace)
        m = res.metrics(setup.slo, (90,), warmup_s=min(10.0, phase_s / 3))
        out.append({"request_rate": rate, "slo_attainment": m["slo_attainment"],
                    "ttft_slo_attainment": m["ttft_slo_attainment"],
                    "tpot_slo_attainment": m["tpot_slo_attainment"],
                    "tbt_slo_attainment": m.get("tbt_slo_attainment")})
        bad = bad + 1 if (m["slo_attainment"] or 0) < 0.5 else 0
        if bad >= 2:
            break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.phase_ceiling",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", default="8b-h100")
    parser.add_argument("--workload", default="phase-1400")
    parser.add_argument("--budgets", default="512,1024")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rates", default="30,35,40,45,50,55,60,65,70,80,90")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/sim_phase_ceiling.json"))
    args = parser.parse_args(argv)
    cpu0 = time.process_time()
    setup = next(s for s in compare.setups(False) if s.name == args.setup)
    wl = compare._workload(args.workload, False)
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    systems = [(f"static-{p}P{setup.workers - p}D", p, compare.DEFAULT_BUDGET)
               for p in range(1, setup.workers)]
    systems += [(f"agg@{b}", 0, int(b)) for b in args.budgets.split(",")]
    result: dict = {}
    for pool_name in wl.pools:
        for name, prefill, budget in systems:
            per_seed = {}
            for seed in seeds:
                pts = phase_rates(setup, args.workload, pool_name, prefill, budget, rates, seed)
                per_seed[str(seed)] = {"max_rate": round(compare.max_rate(pts), 2),
                                       "points": pts}
            result.setdefault(pool_name, {})[name] = per_seed
            print(f"{pool_name:<13} {name:<12} " + " ".join(
                f"{v['max_rate']:6.1f}" for v in per_seed.values()), file=sys.stderr, flush=True)
    summary: dict = {}
    for seed in map(str, seeds):
        best = {p: max((n for n in result[p] if n.startswith("static-")),
                       key=lambda n, p=p: result[p][n][seed]["max_rate"]) for p in result}
        bound = min(result[p][best[p]][seed]["max_rate"] for p in result)
        aggs = {n: min(result[p][n][seed]["max_rate"] for p in result)
                for n in result[next(iter(result))] if n.startswith("agg@")}
        summary[seed] = {"best_split_per_phase": {p: [best[p], result[p][best[p]][seed][
            "max_rate"]] for p in result}, "pd_schedule_bound": bound,
            "aggregated_min_over_phases": aggs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "description": (__doc__ or "").strip().splitlines()[0],
        "command": " ".join(["python -m benchmarks.sim.phase_ceiling", *(argv or sys.argv[1:])]),
        "setup": setup.name, "slo": setup.slo.as_dict(), "workload": args.workload,
        "target_attainment": compare.TARGET, "seeds": seeds, "rates": rates,
        "summary": summary, "per_phase": result,
        "cpu_s": round(time.process_time() - cpu0, 1)}, indent=1))
    for seed, s in summary.items():
        print(f"seed {seed}: best split per phase {s['best_split_per_phase']}, P/D schedule "
              f"bound {s['pd_schedule_bound']:.1f}; aggregated (min over phases) "
              f"{s['aggregated_min_over_phases']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
