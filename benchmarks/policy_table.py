"""Each routing policy against least-loaded, in the simulator, on one fixed P/D split.

Every policy serves the same ShareGPT Poisson trace at the same request rates on the same
split (default 4P4D: 8 simulated H100s serving Llama-3.1-8B with the roofline performance
model) with no role flips (control "none"), so the differences come from routing alone.
Per policy and rate: p50/p90/p99 TTFT and TPOT, goodput, SLO attainment, and each of them
as a ratio to least-loaded's at the same rate (> 1 means more goodput/attainment, but
also more latency). The default rates, 400/432/464 req/s, bracket least-loaded's 4P4D knee
(its attainment holds at 432 req/s and falls to ~0.6 at 464).

The trace is `benchmarks.sim.compare`'s ShareGPT Poisson workload (same sampling and
seed), served by the same roofline performance model and simulator:

    python -m benchmarks.policy_table --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.arrivals import Trace
from benchmarks.metrics import SLO
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import PerfModel, roofline
from benchmarks.sim.policies import make_routing
from benchmarks.sim.simulator import SimConfig, Simulator
from benchmarks.sim.workloads import sharegpt_workload

POLICIES = ("least-loaded", "arrow", "dopd-match", "ares", "ares+kv")
KV_SUFFIX = "+kv"
"""`ares+kv`: ARES whose rebalancing moves a stream's KV (`SimConfig.migration="kv"`) instead
of recomputing its context on the target."""
BASELINE = "least-loaded"
RATIO_KEY = f"vs_{BASELINE}"
LATENCY_KEYS = tuple(f"p{p}_{m}_ms" for m in ("ttft", "tpot") for p in (50, 90, 99))
METRIC_KEYS = (*LATENCY_KEYS, "request_goodput", "slo_attainment")
EXTRA_KEYS = ("num_prompts", "completed", "failed", "request_throughput", "migrations")
DEFAULT_SLO = SLO(ttft_ms=1000, tpot_ms=40)


def rate_key(rate: float) -> str:
    """How a rate is spelled as a JSON key: 352.0 -> "352"."""
    return f"{rate:g}"


def sharegpt_trace_maker(poisson_s: float, seed: int) -> Callable[[float], Trace]:
    """The comparison's ShareGPT Poisson workload: rate -> trace (deterministic per rate)."""
    workload = sharegpt_workload("sharegpt-poisson", poisson_s, 1.0)
    return lambda rate: workload.make(rate, seed)


def simulate(policy: str, trace: Trace, perf: PerfModel, slo: SLO, prefill: int,
             decode: int) -> dict:
    """One run: a fresh routing policy on a fixed split, no control policy (no flips)."""
    name = policy.removesuffix(KV_SUFFIX)
    cfg = SimConfig(prefill=prefill, decode=decode, slo=slo, engine=EngineConfig(),
                    migration="kv" if name != policy else "recompute")
    result = Simulator(cfg, perf, make_routing(name), None).run(trace)
    metrics = result.metrics(slo, (50, 90, 99))
    if metrics["flips"]:
        raise RuntimeError(f"{policy}: {metrics['flips']} flips on a fixed split")
    return metrics


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when base is missing or zero."""
    if value is None or base is None or base == 0:
        return None
    return round(value / base, 4)


def build_table(runs: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """policy -> rate -> the chosen metrics plus their ratios to the baseline's."""
    table: dict[str, dict[str, dict]] = {}
    for policy, per_rate in runs.items():
        table[policy] = {}
        for rate, metrics in per_rate.items():
            base = runs[BASELINE][rate]
            row = {k: metrics.get(k) for k in (*EXTRA_KEYS, *METRIC_KEYS)}
            row[RATIO_KEY] = {k: ratio(metrics.get(k), base.get(k)) for k in METRIC_KEYS}
            row["sim_cpu_s"] = round(metrics.get("sim_cpu_s", 0.0), 2)
            table[policy][rate] = row
    return table


def run(out_dir: Path, rates: Sequence[float], policies: Sequence[str] = POLICIES,
        prefill: int = 4, decode: int = 4, poisson_s: float = 60.0, seed: int = 0,
        slo: SLO = DEFAULT_SLO, gpu: str = "h100",
        model: str = "llama-3.1-8b") -> dict:
    """Simulate every policy at every rate, write policy_table.json and .png, return it."""
    if BASELINE not in policies:
        policies = (BASELINE, *policies)
    perf = roofline(model, gpu)
    make_trace = sharegpt_trace_maker(poisson_s, seed)
    runs: dict[str, dict[str, dict]] = {p: {} for p in policies}
    for rate in rates:
        trace = make_trace(rate)
        for policy in policies:
            t0 = time.process_time()
            runs[policy][rate_key(rate)] = simulate(policy, trace, perf, slo, prefill, decode)
            print(f"rate {rate:g}: {policy:<13} {time.process_time() - t0:6.1f} cpu-s",
                  file=sys.stderr, flush=True)
    results = {"config": {"workload": "sharegpt-poisson", "prefill": prefill, "decode": decode,
                          "control": "none", "poisson_s": poisson_s, "seed": seed,
                          "rates": [float(r) for r in rates], "policies": list(policies),
                          "baseline": BASELINE, "slo": slo.as_dict(), "perf": perf.describe()},
               "results": build_table(runs)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "policy_table.json").write_text(json.dumps(results, indent=2))
    plot(results, out_dir / "policy_table.png")
    return results


PANELS = (("p90_ttft_ms", "p90 TTFT (ms)"), ("p99_ttft_ms", "p99 TTFT (ms)"),
          ("p90_tpot_ms", "p90 TPOT (ms)"), ("p99_tpot_ms", "p99 TPOT (ms)"),
          ("request_goodput", "goodput (req/s)"), ("slo_attainment", "SLO attainment"))


def plot(results: dict, path: Path) -> None:
    """Grouped bars: one panel per metric, one group per rate, one bar per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    table = results["results"]
    policies = list(table)
    rates = [rate_key(r) for r in results["config"]["rates"]]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    width = 0.8 / max(1, len(policies))
    x = np.arange(len(rates))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        for i, policy in enumerate(policies):
            values = [table[policy][r].get(key) or 0.0 for r in rates]
            ax.bar(x + (i - (len(policies) - 1) / 2) * width, values, width, label=policy)
        ax.set_xticks(x, [f"{r} req/s" for r in rates])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if "ttft" in key:  # spans orders of magnitude across the knee; TPOT barely moves
            ax.set_yscale("log")
    axes.flat[0].legend(fontsize=8)
    cfg = results["config"]
    fig.suptitle(f"Routing on a fixed {cfg['prefill']}P{cfg['decode']}D split, no flips "
                 f"({cfg['perf']['name']}, ShareGPT Poisson {cfg['poisson_s']:g} s, "
                 f"SLO {cfg['slo']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(results: dict) -> str:
    """A plain-text table: one line per rate and policy."""
    head = (f"{'rate':>6} {'policy':<13} {'TTFT p50/p90/p99 ms':>24} "
            f"{'TPOT p50/p90/p99 ms':>20} {'goodput':>8} {'attain':>7} "
            f"{'goodput/LL':>10} {'attain/LL':>9} {'p99TTFT/LL':>10}")
    lines = [head]
    table = results["results"]
    for rate in (rate_key(r) for r in results["config"]["rates"]):
        for policy, per_rate in table.items():
            row = per_rate[rate]
            ttft = "/".join(f"{row[f'p{p}_ttft_ms']:.0f}" for p in (50, 90, 99))
            tpot = "/".join(f"{row[f'p{p}_tpot_ms']:.1f}" for p in (50, 90, 99))
            rel = row[RATIO_KEY]
            lines.append(f"{rate:>6} {policy:<13} {ttft:>24} {tpot:>20} "
                         f"{row['request_goodput']:8.1f} {row['slo_attainment']:7.3f} "
                         f"{rel['request_goodput']!s:>10} {rel['slo_attainment']!s:>9} "
                         f"{rel['p99_ttft_ms']!s:>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.policy_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder for policy_table.json and policy_table.png")
    parser.add_argument("--rates", default="400,432,464", help="request rates (req/s)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"routing policies; {BASELINE} is always included")
    parser.add_argument("--prefill", type=int, default=4, help="prefill workers")
    parser.add_argument("--decode", type=int, default=4, help="decode workers")
    parser.add_argument("--poisson-s", type=float, default=60.0,
                        help="simulated seconds of the ShareGPT Poisson trace")
    parser.add_argument("--goodput", nargs="+", default=["ttft:1000", "tpot:40"],
                        help="SLOs in vLLM's --goodput syntax (ms)")
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = run(args.out, [float(r) for r in args.rates.split(",")],
                  tuple(args.policies.split(",")), args.prefill, args.decode, args.poisson_s,
                  args.seed, SLO.parse(args.goodput), args.gpu, args.model)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
