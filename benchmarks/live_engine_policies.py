"""ARES decode placement and the SLAI engine scheduler against their plain counterparts, live.

    flock /tmp/fulcrum-vllm.lock python -m benchmarks.live_engine_policies      # ~25 min
    python -m benchmarks.live_engine_policies --experiments slai --seconds 30 --seeds 0

Two A/B experiments on real vLLM CPU workers (the tiny model), ShareGPT prompts with Poisson
arrivals, output lengths from the dataset enforced by the engine and hidden from the router
(`max_tokens` with `ignore_eos`; the gateway's policies see the client cap, 4096):

* `slai`: aggregated serving on 2 workers (no KV connector): vLLM's FCFS scheduler against
  the SLAI scheduler class (decodes by time-between-tokens deadline, waiting prefills
  shortest-first with aging), loaded into every worker with `--scheduler-cls`.
* `ares`: 1 prefill and 3 decode workers: least-loaded decode placement against ARES (decode
  placement on current + predicted remaining tokens, and every 2 s a running stream moved off
  the most loaded decoder when the predicted gain beats the migration's cost).

Each variant gets a fresh `fulcrum up`; on it every (rate, seed) trace runs in turn, in the
same order for both variants, so a rate's two variants see identical requests at identical
times. Per run: goodput (requests meeting TTFT, TPOT and p99 time-between-tokens SLOs per
request), TTFT and TPOT percentiles, p99 of the inter-token gaps, failures, and (ares) the
streams the gateway moved. Ratios are the B variant over the A variant per (rate, seed), then
mean / min / max over seeds. Writes benchmarks/results/live_engine_policies.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.arrivals import pair, poisson_times
from benchmarks.bench import Endpoint, run_trace
from benchmarks.dataset import BenchRequest, load_sharegpt, make_token_counter, sample_requests
from benchmarks.live_cluster import UpCluster
from benchmarks.live_phase import spread
from benchmarks.metrics import SLO, summarize

RESULTS = Path(__file__).parent / "results"
MODEL = "tiny-llama"
CLIENT_CAP = 4096
SLAI_SCHEDULER = "instance_manager.engine_plugins.slai_scheduler.SLAIAsyncScheduler"


@dataclass(frozen=True)
class Experiment:
    """Two `fulcrum up` configurations compared on the same traces: `baseline` first."""

    workers: int
    baseline: tuple[str, tuple[str, ...]]
    candidate: tuple[str, tuple[str, ...]]
    what: str


EXPERIMENTS: dict[str, Experiment] = {
    "slai": Experiment(
        2, ("fcfs", ("--kv-connector", "none")),
        ("slai", ("--kv-connector", "none", "--worker-arg=--scheduler-cls",
                  f"--worker-arg={SLAI_SCHEDULER}")),
        "aggregated, 2 workers: vLLM's FCFS scheduler vs the SLAI scheduler class"),
    "ares": Experiment(
        4, ("least-loaded", ("--prefill-workers", "1", "--policy", "least-loaded")),
        ("ares", ("--prefill-workers", "1", "--policy", "ares")),
        "1 prefill + 3 decode workers: least-loaded decode placement vs ARES (placement on "
        "predicted remaining tokens, rebalancing by stream migration every 2 s)"),
}
KEEP = ("completed", "failed", "request_throughput", "request_goodput", "slo_attainment",
        "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms",
        "p99_tpot_ms", "median_itl_ms", "p99_itl_ms", "median_e2el_ms")
# metric -> True where higher is better (the ratios say candidate / baseline either way)
COMPARED = {"request_goodput": True, "slo_attainment": True, "median_ttft_ms": False,
            "p99_ttft_ms": False, "p99_tpot_ms": False, "p99_itl_ms": False}
_MIGRATIONS = re.compile(r"^fulcrum_stream_migrations_total\s+([0-9.e+]+)", re.M)
_KV_MIGRATIONS = re.compile(r"^fulcrum_stream_kv_migrations_total\s+([0-9.e+]+)", re.M)
_RESCUES = re.compile(r'^fulcrum_pd_leg_failures_total\{(?=[^}]*action="rescued")[^}]*\}'
                      r"\s+([0-9.e+]+)", re.M)


def sharegpt_pool(num: int, seed: int) -> list[BenchRequest]:
    """`num` ShareGPT requests counted with the tiny model's own tokenizer."""
    from instance_manager.models import resolve_model

    counter = make_token_counter(resolve_model("tiny"))
    return sample_requests(load_sharegpt(), counter, num, seed)


def build_trace(rate: float, seconds: float, seed: int) -> list:
    n = max(1, round(rate * seconds))
    return pair(poisson_times(n, rate, seed), sharegpt_pool(n, seed))


def migrations(cluster: UpCluster) -> tuple[float, float, float]:
    """(streams moved, of which rescued off a failed or stalled worker, moves that took
    their KV along) so far, from the gateway's Prometheus counters: the moves not rescued
    are planned ones (ARES's rebalancing)."""
    text = httpx.get(cluster.url + "/metrics", timeout=30).text
    found = [pattern.search(text) for pattern in (_MIGRATIONS, _RESCUES, _KV_MIGRATIONS)]
    return tuple(float(m.group(1)) if m else 0.0 for m in found)  # type: ignore[return-value]


def run_variant(name: str, workers: int, options: tuple[str, ...], traces: dict, slo: SLO,
                log_dir: Path) -> dict[str, dict]:
    """One fresh cluster; every trace in turn. Returns {"rate/seed": run summary}."""
    cluster = UpCluster(log_dir / name, workers,
                        ["--max-model-len", "2048", "--kv-cache-gib", "1",
                         "--slo-ttft-ms", f"{slo.ttft_ms:g}", "--slo-tpot-ms",
                         f"{slo.tpot_ms:g}", *options])
    runs = {}
    try:
        cluster.wait_ready()
        endpoint = Endpoint(cluster.url, MODEL, engine_lengths=True,
                            client_max_tokens=CLIENT_CAP, timeout_s=300)
        first = next(iter(traces.values()))
        asyncio.run(run_trace(first[:4], endpoint, progress=False))  # warm-up
        for key, trace in traces.items():
            moved_before = migrations(cluster)
            timelines, duration = asyncio.run(run_trace(trace, endpoint, progress=False))
            summary = summarize(timelines, duration, slo)
            errors = sorted({t.error[:120] for t in timelines if not t.success and t.error})
            moved_after = migrations(cluster)
            runs[key] = {**{k: summary.get(k) for k in KEEP}, "errors": errors[:10],
                         "migrations": moved_after[0] - moved_before[0],
                         "rescues": moved_after[1] - moved_before[1],
                         "kv_moves": moved_after[2] - moved_before[2]}
            r = runs[key]
            print(f"  {name} {key}: goodput {r['request_goodput']:.2f} req/s, median TTFT "
                  f"{r['median_ttft_ms']:.0f} ms, p99 TPOT {r['p99_tpot_ms']:.0f} ms, "
                  f"failed {r['failed']}, moved {r['migrations']:g} (rescued "
                  f"{r['rescues']:g})", file=sys.stderr, flush=True)
    finally:
        cluster.stop()
    return runs


def compare(baseline: dict[str, dict], candidate: dict[str, dict],
            rates: list[float]) -> dict[str, dict[str, dict[str, float]]]:
    """Per rate and metric: candidate / baseline, mean / min / max over the seeds."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for rate in rates:
        keys = [k for k in baseline if k.startswith(f"{rate:g}/") and k in candidate]
        per_metric = {}
        for metric in COMPARED:
            ratios = [candidate[k][metric] / baseline[k][metric] for k in keys
                      if baseline[k].get(metric) and candidate[k].get(metric) is not None]
            if ratios:
                per_metric[metric] = spread(ratios)
        out[f"{rate:g}"] = per_metric
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["experiments"])
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        exp = result["experiments"][name]
        rates = exp["rates"]
        latency = "median_ttft_ms" if name == "slai" else "p99_tpot_ms"
        for col, metric in enumerate(("request_goodput", latency)):
            ax = axes[row][col]
            for i, variant in enumerate(exp["variants"]):
                runs = exp["runs"][variant]
                values = [[runs[k][metric] for k in runs if k.startswith(f"{r:g}/")]
                          for r in rates]
                means = [statistics.mean(v) if v else 0.0 for v in values]
                lo = [m - min(v) if v else 0.0 for m, v in zip(means, values, strict=True)]
                hi = [max(v) - m if v else 0.0 for m, v in zip(means, values, strict=True)]
                xs = [j + (i - 0.5) * 0.38 for j in range(len(rates))]
                ax.bar(xs, means, width=0.36, yerr=[lo, hi], capsize=3, label=variant)
            ax.set_xticks(range(len(rates)), [f"{r:g} req/s" for r in rates])
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{name}: {metric.replace('_', ' ')}", fontsize=9)
            ax.legend(fontsize=8)
    slo = result["setup"]["slo"]
    fig.suptitle(f"live, tiny-model vLLM CPU workers, ShareGPT Poisson; SLO TTFT "
                 f"{slo['ttft']:g} ms, TPOT {slo['tpot']:g} ms, p99 TBT {slo['tbt']:g} ms "
                 f"(bars: mean of seeds, whiskers: min-max)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--experiments", default="slai,ares")
    parser.add_argument("--slai-rates", default="1,2", help="requests/s (2 workers)")
    parser.add_argument("--ares-rates", default="2,4", help="requests/s (1P3D)")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each trace")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0)
    parser.add_argument("--slo-tbt-ms", type=float, default=200.0,
                        help="per-request p99 time between tokens")
    parser.add_argument("--out", type=Path, default=RESULTS / "live_engine_policies.json")
    args = parser.parse_args(argv)
    names = [n for n in args.experiments.split(",") if n]
    unknown = set(names) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiments {sorted(unknown)}; known: {', '.join(EXPERIMENTS)}")
    slo = SLO(ttft_ms=args.slo_ttft_ms, tpot_ms=args.slo_tpot_ms, tbt_ms=args.slo_tbt_ms)
    seeds = [int(s) for s in args.seeds.split(",")]
    log_dir = Path(".fulcrum/live_engine_policies")
    experiments = {}
    for name in names:
        exp = EXPERIMENTS[name]
        rates = [float(r) for r in getattr(args, f"{name}_rates").split(",")]
        traces = {f"{rate:g}/{seed}": build_trace(rate, args.seconds, seed)
                  for rate in rates for seed in seeds}
        runs = {}
        for variant, options in (exp.baseline, exp.candidate):
            print(f"{name}: {variant}", file=sys.stderr, flush=True)
            runs[variant] = run_variant(variant, exp.workers, options, traces, slo,
                                        log_dir / name)
            partial = args.out.with_suffix(".partial.json")
            partial.write_text(json.dumps({"experiments": experiments, name: runs},
                                          indent=1) + "\n")
        experiments[name] = {
            "what": exp.what, "workers": exp.workers, "rates": rates,
            "variants": [exp.baseline[0], exp.candidate[0]],
            "requests": {k: len(t) for k, t in traces.items()},
            "ratios": compare(runs[exp.baseline[0]], runs[exp.candidate[0]], rates),
            "runs": runs}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
        "load_average_after": list(os.getloadavg()),
        "setup": {"model": "tiny random Llama (tests' model), vLLM CPU",
                  "dataset": "ShareGPT (first two turns), Poisson arrivals",
                  "seconds": args.seconds, "seeds": seeds,
                  "lengths": f"hidden from the router (engine-enforced, client cap "
                             f"{CLIENT_CAP})", "slo": slo.as_dict()},
        "experiments": experiments,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({n: e["ratios"] for n, e in experiments.items()}, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
