"""Side-by-side comparison in the simulator: every system on the same traces.

Systems: aggregated (vLLM-like, chunked prefill on every worker), static P/D at every
ratio (DistServe-like), and the adaptive systems in the repo: Arrow (SLO-aware routing +
SLO-pressure flips), DOPD (length-aware routing + throughput-balance flips) and ARES
(predicted-remaining-work decode placement, with DOPD's flips). "+slai" variants run
every engine with SLAI's waiting-queue order (shortest prompt first with aging, the same
`waiting_key` the vLLM scheduler plugin uses; see `benchmarks.sim.engine` for what of
SLAI the engine model can and cannot express). For each workload a rate sweep finds the
highest request rate that keeps >= 90% SLO attainment; ratios are relative to the best
static split (the oracle a static operator would pick per trace).

Flips are priced: a flipped worker takes no new work for `--flip-rewarm` seconds
(default 2 s; `--flip-mode drain` also waits for its in-flight work of the old role).

Knobs (written into the JSON under "knobs"):
* DOPD's throughput constants are calibrated from the performance model itself
  (`instance_manager.controller.calibrate.dopd_knobs`): the prefill cost curve is a
  quadratic fit of one-prompt iterations, and decode throughput is B*/tau(B*) at the
  largest batch B* whose step meets the TPOT target at a `--decode-context`
  tokens-per-sequence context (capped by max_num_seqs; KV room is applied by the policy
  at the context it sees).
* Arrow's cooldown is 10 s; Arrow's metrics window is the simulator's (10 s).

    python -m benchmarks.sim.compare --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from benchmarks.arrivals import Phase, Trace, pair, phase_mix, poisson_times, synthetic_pool
from benchmarks.dataset import approx_token_count, load_sharegpt, sample_requests
from benchmarks.metrics import SLO
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import PerfModel, roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, Simulator
from benchmarks.sweep import sweep_rates
from instance_manager.controller.calibrate import dopd_knobs as calibrated_dopd_knobs
from instance_manager.engine_plugins.slai_policy import SLAIConfig

DEFAULT_RATES = "2,4,8,16,24,32,48,64,96,128,192,256,384,512,768,1024"


@dataclass(frozen=True)
class System:
    name: str
    prefill: int
    decode: int
    routing: str = "least-loaded"
    control: str = "none"
    knobs: dict = field(default_factory=dict, hash=False)
    slai: bool = False  # engines order waiting prefills by SLAI's key


def dopd_knobs(perf: PerfModel, slo: SLO, engine: EngineConfig,
               decode_context: float) -> dict[str, float]:
    """DOPD's cost constants measured on the performance model (see module doc)."""
    return calibrated_dopd_knobs(perf, (slo.tpot_ms or 100.0) / 1000, engine.max_num_seqs,
                                 decode_context)


ARROW_KNOBS = {"cooldown_s": 10.0}


def systems(n: int, dopd: dict) -> list[System]:
    out = [System("aggregated", 0, n)]
    for p in range(1, n):
        out.append(System(f"static-{p}P{n - p}D", p, n - p))
    half = n // 2
    out += [System("arrow", half, n - half, "arrow", "arrow", ARROW_KNOBS),
            System("dopd", half, n - half, "dopd-match", "dopd", dopd),
            System("dopd+ares", half, n - half, "ares", "dopd", dopd),
            System("aggregated+slai", 0, n, slai=True),
            System("arrow+slai", half, n - half, "arrow", "arrow", ARROW_KNOBS, slai=True),
            System("dopd+ares+slai", half, n - half, "ares", "dopd", dopd, slai=True)]
    return out


def workloads(phase_s: float, poisson_s: float, seed: int) -> dict:
    """name -> function(rate) -> Trace."""
    prompt_heavy = synthetic_pool(200, 3000, 60, seed=seed)
    output_heavy = synthetic_pool(200, 150, 700, seed=seed + 1)
    sharegpt = sample_requests(load_sharegpt(), approx_token_count, 5000, seed)

    def phases(rate: float) -> Trace:
        cycle = [Phase(phase_s, rate, prompt_heavy, "long-prompt"),
                 Phase(phase_s, rate, output_heavy, "long-output")]
        return phase_mix(cycle, cycles=2, seed=seed)

    def poisson(rate: float) -> Trace:
        return pair(poisson_times(int(rate * poisson_s), rate, seed), sharegpt)

    return {"phase-shift": phases, "sharegpt-poisson": poisson}


def run(out_dir: Path, workers: int, phase_s: float, poisson_s: float, rates: Sequence[float],
        slo: SLO, seed: int, refine: int, gpu: str, model: str, flip_rewarm_s: float,
        flip_mode: str, decode_context: float, only: Sequence[str] | None = None) -> dict:
    perf = roofline(model, gpu)
    engine = EngineConfig()
    slai_engine = EngineConfig(slai=SLAIConfig())
    dopd = dopd_knobs(perf, slo, engine, decode_context)
    chosen = [s for s in systems(workers, dopd) if not only or s.name in only]
    results: dict = {"perf": perf.describe(), "slo": slo.as_dict(), "workers": workers,
                     "phase_s": phase_s, "poisson_s": poisson_s, "seed": seed,
                     "flip_rewarm_s": flip_rewarm_s, "flip_mode": flip_mode,
                     "rates": list(rates), "refine": refine,
                     "knobs": {"arrow": ARROW_KNOBS, "dopd": dopd,
                               "slai": SLAIConfig().__dict__,
                               "decode_context_tokens": decode_context},
                     "workloads": {}}
    traces = workloads(phase_s, poisson_s, seed)
    bar = tqdm(total=len(traces) * len(chosen), desc="systems", unit="sweep", file=sys.stderr)
    for wname, make_trace in traces.items():
        per_system = {}
        for sysdef in chosen:
            bar.set_postfix_str(f"{wname}: {sysdef.name}")
            t0 = time.process_time()
            runs: dict[float, dict] = {}

            def evaluate(rate: float, sysdef: System = sysdef, runs: dict = runs,
                         make_trace=make_trace) -> dict:
                cfg = SimConfig(prefill=sysdef.prefill, decode=sysdef.decode, slo=slo,
                                engine=slai_engine if sysdef.slai else engine,
                                flip_mode=flip_mode, flip_rewarm_s=flip_rewarm_s)
                sim = Simulator(cfg, perf, make_routing(sysdef.routing),
                                make_control(sysdef.control, dict(sysdef.knobs)))
                res = sim.run(make_trace(rate))
                runs[rate] = {"roles": res.roles, "flips": res.flips}
                return res.metrics(slo, (50, 90, 99))

            try:
                sweep = sweep_rates(evaluate, rates, 0.9, refine)
                best = sweep.max_rate
                top = max(r for r, _ in sweep.points)
                per_system[sysdef.name] = {
                    "prefill": sysdef.prefill, "decode": sysdef.decode,
                    "routing": sysdef.routing, "control": sysdef.control,
                    "slai": sysdef.slai,
                    "max_rate": best,
                    "bracketed": any(not (p.get("slo_attainment") or 0) >= 0.9
                                     for _, p in sweep.points),
                    "sweep": sweep.as_dict()["points"],
                    "roles_at_max": runs[best]["roles"] if best else None,
                    "flips_at_max": runs[best]["flips"] if best else None,
                    "flips_at_top_rate": runs[top]["flips"],
                    "sim_cpu_s": round(time.process_time() - t0, 2)}
            except Exception as exc:  # a policy still under construction must not stop the run
                per_system[sysdef.name] = {"error": repr(exc),
                                           "traceback": traceback.format_exc(limit=3)}
            v = per_system[sysdef.name]
            bar.write(f"[{wname}] {sysdef.name:<16} max {v.get('max_rate')} "
                      f"({v.get('sim_cpu_s')} cpu-s) {v.get('error', '')}", file=sys.stderr)
            bar.update(1)
        statics = {k: v["max_rate"] for k, v in per_system.items()
                   if k.startswith("static") and v.get("max_rate")}
        base = max(statics.values()) if statics else None
        agg = per_system.get("aggregated", {}).get("max_rate")
        for v in per_system.values():
            if base and v.get("max_rate"):
                v["rate_vs_best_static"] = round(v["max_rate"] / base, 3)
            if agg and v.get("max_rate"):
                v["rate_vs_aggregated"] = round(v["max_rate"] / agg, 3)
        per_system["_best_static"] = max(statics, key=statics.get) if statics else None
        results["workloads"][wname] = per_system
    bar.close()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sim_comparison.json").write_text(json.dumps(results, indent=2, default=str))
    plot(results, out_dir)
    return results


def plot(results: dict, out_dir: Path) -> None:
    from benchmarks.plots import plot_goodput_vs_rate, plot_roles_over_time

    slo = SLO(**{f"{k}_ms": v for k, v in results["slo"].items()})
    perf = results["perf"]
    hw = (f"{results['workers']}x {perf['hardware'].get('name', '?').upper()}, "
          f"{perf['model'].get('name', '?')}")
    for wname, per_system in results["workloads"].items():
        series = {name: [(p["request_rate"], p) for p in v["sweep"]]
                  for name, v in per_system.items() if isinstance(v, dict) and "sweep" in v}
        title = f"{wname} trace, {hw}, flips re-warm {results['flip_rewarm_s']:g} s"
        plot_goodput_vs_rate(series, out_dir / f"sim_{wname}_attainment.png", title=title,
                             slo=slo)
        roles = {name: v["roles_at_max"] for name, v in per_system.items()
                 if isinstance(v, dict) and v.get("roles_at_max")
                 and len(v["roles_at_max"]) > 1}
        if roles:
            plot_roles_over_time(roles, out_dir / f"sim_{wname}_roles.png",
                                 title=f"Pools at each system's max rate: {wname} trace, {hw}")


def table(results: dict) -> str:
    lines = []
    for wname, per_system in results["workloads"].items():
        lines.append(f"== {wname} (best static: {per_system.get('_best_static')})")
        for name, v in per_system.items():
            if not isinstance(v, dict):
                continue
            lines.append(f"  {name:<16} max rate @90%: {v.get('max_rate')!s:<8} "
                         f"vs best static: {v.get('rate_vs_best_static')!s:<6} "
                         f"vs aggregated: {v.get('rate_vs_aggregated')!s:<6} "
                         f"flips@max: {len(v.get('flips_at_max') or [])} "
                         f"{v.get('error', '')}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sim.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=40.0,
                        help="length of one phase of the phase-shift trace (2 cycles)")
    parser.add_argument("--poisson-s", type=float, default=60.0,
                        help="simulated seconds of the ShareGPT Poisson trace")
    parser.add_argument("--rates", default=DEFAULT_RATES)
    parser.add_argument("--refine", type=int, default=3)
    parser.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:40"])
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flip-rewarm", type=float, default=2.0)
    parser.add_argument("--flip-mode", choices=("relabel", "drain"), default="relabel")
    parser.add_argument("--decode-context", type=float, default=1000.0,
                        help="tokens per sequence assumed when calibrating DOPD's decode rate")
    parser.add_argument("--only", default=None, help="comma-separated system names")
    args = parser.parse_args(argv)
    res = run(args.out, args.workers, args.phase_s, args.poisson_s,
              [float(r) for r in args.rates.split(",")], SLO.parse(args.goodput), args.seed,
              args.refine, args.gpu, args.model, args.flip_rewarm, args.flip_mode,
              args.decode_context, args.only.split(",") if args.only else None)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
