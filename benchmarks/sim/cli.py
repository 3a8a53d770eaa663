"""`fulcrum sim`: simulate a P/D cluster on the harness's traces with Fulcrum's policies.

    python -m benchmarks.sim --gpu h100 --model llama-3.1-8b --prefill 2 --decode 6 \
        --policy least-loaded --request-rate 40 --num-prompts 20000 \
        --goodput ttft:1000 tpot:100

Performance model: a roofline (`--perf roofline`, H100/H200 x Llama-3.1-8B/70B) or a
fitted one (`--perf fitted --fitted-model FILE`, from `fulcrum profile`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from benchmarks.metrics import SLO
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import HARDWARE, MODELS, FittedModel, PerfModel, roofline
from benchmarks.sim.policies import make_control, make_routing, parse_knobs
from benchmarks.sim.simulator import SimConfig, SimResult, Simulator
from benchmarks.sweep import sweep_rates
from benchmarks.workload import WorkloadSpec, add_workload_args, build_requests, build_trace
from deploy import options
from instance_manager.controller.calibrate import derived_knobs
from instance_manager.engine_plugins.slai_policy import SLAIConfig


def add_sim_args(parser: argparse.ArgumentParser) -> None:
    """All `fulcrum sim` options (the workload options are the harness's)."""
    c = parser.add_argument_group("cluster")
    c.add_argument("--prefill", type=int, default=1, help="workers starting in the prefill pool")
    c.add_argument("--decode", type=int, default=1,
                   help="workers starting in the decode pool (--prefill 0: aggregated)")
    options.add_policy(c)
    options.add_control_policy(c)
    c.add_argument("--control-interval", type=float, default=1.0, help="seconds between ticks")
    c.add_argument("--window", type=float, default=10.0, help="metrics window (s)")
    c.add_argument("--flip-mode", choices=("relabel", "drain"), default="relabel",
                   help="relabel at once, or wait for the old role's work to drain")
    c.add_argument("--flip-rewarm", type=float, default=0.0,
                   help="seconds a flipped worker is unroutable after the flip")
    c.add_argument("--migration", choices=("recompute", "kv"), default="recompute",
                   help="how an ARES move continues on the target: re-prefill the context, "
                        "or pull its KV over the link (priced by the link model)")
    c.add_argument("--max-num-seqs", type=int, default=1024,
                   help="most sequences an engine runs at once (vLLM's --max-num-seqs; "
                        "its default on H100/H200 is 1024)")
    c.add_argument("--token-budget", type=int, default=8192,
                   help="max_num_batched_tokens per iteration (chunked prefill)")
    c.add_argument("--slai", action="store_true",
                   help="engines admit waiting prefills in SLAI's order (shortest first, aged)")
    c.add_argument("--slai-aging", type=float, default=None, metavar="TOKENS_PER_S",
                   help="SLAI aging: prompt tokens a waiting request gains per second waited")
    p = parser.add_argument_group("performance model")
    p.add_argument("--perf", choices=("roofline", "fitted"), default="roofline",
                   help="performance model: a roofline, or one fitted by `fulcrum profile`")
    p.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b",
                   help="model of the roofline")
    p.add_argument("--gpu", choices=sorted(HARDWARE), default="h100",
                   help="accelerator of the roofline")
    p.add_argument("--tp", type=int, default=None, help="GPUs per worker (default by model)")
    p.add_argument("--fitted-model", type=Path, default=None,
                   help="JSON from `fulcrum profile` (points or fitted coefficients)")
    add_workload_args(parser)
    s = parser.add_argument_group("SLOs and results")
    options.add_slo_goodput(s, default=("ttft:1000", "tpot:100"))
    s.add_argument("--metric-percentiles", default="50,90,99",
                   help="comma-separated latency percentiles to report")
    s.add_argument("--sweep-rates", default=None,
                   help="comma-separated rates: highest keeping --target-attainment")
    s.add_argument("--sweep-refine", type=int, default=4,
                   help="bisection steps after the grid")
    s.add_argument("--target-attainment", type=float, default=0.9,
                   help="SLO attainment (0-1) a sweep point must reach to pass")
    s.add_argument("--result-json", type=Path, default=None, help="write the result here")
    s.add_argument("--plot-prefix", type=Path, default=None,
                   help="write PNG plots with this path prefix")


def make_perf(args: argparse.Namespace) -> PerfModel:
    if args.perf == "fitted":
        if args.fitted_model is None:
            raise SystemExit("--perf fitted needs --fitted-model FILE")
        return FittedModel.load(args.fitted_model)
    return roofline(args.model, args.gpu, args.tp)


def simulate(args: argparse.Namespace, trace, perf: PerfModel, slo: SLO) -> SimResult:
    """One run with fresh policy objects (policies carry state)."""
    slai = None
    if args.slai or args.slai_aging is not None:
        slai = SLAIConfig() if args.slai_aging is None else \
            SLAIConfig(aging_tokens_per_s=args.slai_aging)
    cfg = SimConfig(prefill=args.prefill, decode=args.decode,
                    engine=EngineConfig(args.max_num_seqs, args.token_budget, slai), slo=slo,
                    control_interval_s=args.control_interval, window_s=args.window,
                    flip_mode=args.flip_mode, flip_rewarm_s=args.flip_rewarm,
                    migration=args.migration, length_oracle=args.length_oracle,
                    client_max_tokens=args.client_max_tokens)
    return Simulator(cfg, perf, make_routing(args.policy),
                     make_control(args.control_policy, control_knobs(args, perf, slo))).run(trace)


def control_knobs(args: argparse.Namespace, perf: PerfModel, slo: SLO) -> dict:
    """The user's --control-knob values on top of the constants DOPD and Arrow derive from the
    performance model (so their throughputs describe the simulated hardware, not a default)."""
    knobs: dict = derived_knobs(args.control_policy, perf, (slo.tpot_ms or 100.0) / 1000,
                                args.max_num_seqs)
    knobs.update(parse_knobs(args.control_knob))
    return knobs


def run_sim(args: argparse.Namespace) -> dict:
    perf = make_perf(args)
    slo = SLO.parse(options.goodput_items(args))
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p]
    spec = WorkloadSpec.from_args(args)
    pool = build_requests(spec) if spec.dataset != "trace" else None
    slai = args.slai or args.slai_aging is not None
    header = {"system": f"{args.policy}/{args.control_policy}" + ("/slai" if slai else ""),
              "prefill": args.prefill,
              "decode": args.decode, "perf_model": getattr(perf, "name", "?"),
              "perf": perf.describe() if hasattr(perf, "describe") else None,
              "dataset": spec.dataset, "arrival": spec.arrival, "seed": spec.seed,
              "lengths": "oracle" if args.length_oracle else "hidden",
              "migration": args.migration,
              "client_max_tokens": None if args.length_oracle else args.client_max_tokens}
    last: dict[float, SimResult] = {}

    def evaluate(rate: float) -> dict:
        trace = build_trace(replace(spec, request_rate=rate), pool)
        res = simulate(args, trace, perf, slo)
        last[rate] = res
        return {"request_rate": rate, **res.metrics(slo, percentiles)}

    if args.sweep_rates:
        rates = [float(r) for r in args.sweep_rates.split(",") if r]
        sweep = sweep_rates(evaluate, rates, args.target_attainment, args.sweep_refine,
                            progress="sim sweep")
        result = {**header, "slo": slo.as_dict(), "sweep": sweep.as_dict()}
        print(f"max rate at >= {args.target_attainment:.0%} attainment: {sweep.max_rate}",
              file=sys.stderr)
    else:
        result = {**header, **evaluate(spec.request_rate)}
        for k in ("completed", "request_throughput", "median_ttft_ms", "p90_ttft_ms",
                  "median_tpot_ms", "p90_tpot_ms", "slo_attainment", "flips",
                  "sim_requests_per_cpu_s"):
            print(f"{k:<24} {result.get(k)}", file=sys.stderr)
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(result, indent=2, default=str))
    if args.plot_prefix and last:
        from benchmarks.plots import plot_roles_over_time

        rate, res = max(last.items())
        plot_roles_over_time({f"{rate:g} req/s": res.roles},
                             Path(f"{args.plot_prefix}.roles.png"),
                             title=f"{header['system']}, {spec.dataset}/{spec.arrival}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fulcrum sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sim_args(parser)
    run_sim(parser.parse_args(argv))
    return 0
