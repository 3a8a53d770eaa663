"""One trace generator for the harness and the simulator: dataset + arrival process.

`add_workload_args` puts the same options on `fulcrum bench` and `fulcrum sim`, and
`build_trace` turns them into a `Trace`, so a simulated run and a live run of the same
command line see identical requests at identical times.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from benchmarks.arrivals import (
    Trace,
    gamma_times,
    load_trace,
    pair,
    phase_mix,
    ramp_times,
    scale_rate,
    shifting_phases,
    split_by_shape,
)
from benchmarks.dataset import (
    BenchRequest,
    TokenCounter,
    load_sharegpt,
    make_token_counter,
    sample_requests,
    synthetic_requests,
)

DATASETS = ("sharegpt", "random", "trace")
ARRIVALS = ("poisson", "gamma", "ramp", "phases")


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that determines a trace."""

    dataset: str = "sharegpt"
    dataset_path: Path | None = None
    tokenizer: Path | None = None
    num_prompts: int = 1000
    seed: int = 0
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    output_len_override: int | None = None
    arrival: str = "poisson"
    request_rate: float = math.inf
    burstiness: float = 1.0
    ramp_start_rps: float = 1.0
    ramp_end_rps: float = 10.0
    ramp_strategy: str = "linear"
    phase_seconds: float = 60.0
    phase_cycles: int = 2
    trace_speedup: float = 1.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WorkloadSpec:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in vars(args).items() if k in names})


DEFAULT_CLIENT_MAX_TOKENS = 4096  # a large cap, as chat clients commonly send


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Dataset and arrival options shared by `bench` and `sim`."""
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset", "--dataset-name", dest="dataset", choices=DATASETS,
                   default="sharegpt",
                   help="sharegpt (default; packaged truncated copy unless --dataset-path), "
                        "random (synthetic lengths), or trace (JSONL/Azure CSV with timings)")
    g.add_argument("--dataset-path", type=Path, default=None,
                   help="ShareGPT JSON file, or the trace file for --dataset trace")
    g.add_argument("--tokenizer", type=Path, default=None,
                   help="HF model folder whose tokenizer counts tokens; without it a "
                        "chars/4 approximation is used")
    g.add_argument("--num-prompts", type=int, default=1000, help="requests in the trace")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of sampling and arrival times")
    g.add_argument("--input-len", type=int, default=1024, help="random: mean prompt tokens")
    g.add_argument("--output-len", type=int, default=128, help="random: mean output tokens")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in len*(1 -+ ratio)")
    g.add_argument("--output-len-override", type=int, default=None,
                   help="sharegpt: fix every output length (like --sharegpt-output-len)")
    c = parser.add_argument_group("what the client tells the router")
    c.add_argument("--length-oracle", action="store_true",
                   help="send each request's true output length as max_tokens (with "
                        "ignore_eos live): exact lengths, but the router sees them, which "
                        "real traffic does not give. Default: hidden lengths")
    c.add_argument("--engine-lengths", action="store_true",
                   help="live only: send the trace's output length to the engine (with "
                        "ignore_eos) but tell the gateway's policies the client cap "
                        "(header X-Fulcrum-Client-Cap): hidden lengths on a random-weight "
                        "model, which never stops on its own")
    c.add_argument("--client-max-tokens", type=int, default=DEFAULT_CLIENT_MAX_TOKENS,
                   help="hidden lengths: the cap every client sends (default "
                        f"{DEFAULT_CLIENT_MAX_TOKENS}); only the engine knows when a "
                        "request ends")
    a = parser.add_argument_group("arrivals")
    a.add_argument("--arrival", choices=ARRIVALS, default="poisson",
                   help="poisson/gamma at --request-rate, ramp from --ramp-start-rps to "
                        "--ramp-end-rps, or phases (long-prompt and long-output phases "
                        "alternating at --request-rate)")
    a.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s (inf: all at t=0, vLLM's default)")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape; 1 = Poisson, <1 burstier, inf = constant gaps")
    a.add_argument("--ramp-start-rps", type=float, default=1.0,
                   help="ramp: starting request rate")
    a.add_argument("--ramp-end-rps", type=float, default=10.0,
                   help="ramp: final request rate")
    a.add_argument("--ramp-strategy", choices=("linear", "exponential"), default="linear",
                   help="ramp: how the rate grows (vLLM's --ramp-up-strategy)")
    a.add_argument("--phase-seconds", type=float, default=60.0, help="phases: length of each")
    a.add_argument("--phase-cycles", type=int, default=2, help="phases: prompt+output cycles")
    a.add_argument("--trace-speedup", type=float, default=1.0,
                   help="trace: replay this many times faster")


def build_requests(spec: WorkloadSpec, counter: TokenCounter | None = None) -> list[BenchRequest]:
    """The request pool (no timing) for a spec."""
    if spec.dataset == "random":
        return synthetic_requests(spec.num_prompts, spec.input_len, spec.output_len, spec.seed,
                                  spec.range_ratio)
    if spec.dataset == "sharegpt":
        counter = counter or make_token_counter(spec.tokenizer)
        return sample_requests(load_sharegpt(spec.dataset_path), counter, spec.num_prompts,
                               spec.seed, fixed_output_tokens=spec.output_len_override)
    raise ValueError(f"dataset {spec.dataset!r} has no request pool")


def build_trace(spec: WorkloadSpec, requests: list[BenchRequest] | None = None) -> Trace:
    """The full trace for a spec (`requests` lets a rate sweep reuse one tokenized pool)."""
    if spec.dataset == "trace":
        if spec.dataset_path is None:
            raise ValueError("--dataset trace needs --dataset-path")
        trace = load_trace(spec.dataset_path)[: spec.num_prompts]
        return scale_rate(trace, spec.trace_speedup)
    pool = requests if requests is not None else build_requests(spec)
    n = spec.num_prompts
    if spec.arrival == "poisson":
        return pair(gamma_times(n, spec.request_rate, 1.0, spec.seed), pool)
    if spec.arrival == "gamma":
        return pair(gamma_times(n, spec.request_rate, spec.burstiness, spec.seed), pool)
    if spec.arrival == "ramp":
        return pair(ramp_times(n, spec.ramp_start_rps, spec.ramp_end_rps, spec.seed,
                               spec.ramp_strategy), pool)
    if spec.arrival == "phases":
        if math.isinf(spec.request_rate):
            raise ValueError("--arrival phases needs a finite --request-rate")
        prefill_heavy, decode_heavy = split_by_shape(pool)
        phases = shifting_phases(spec.request_rate, spec.phase_seconds, prefill_heavy,
                                 decode_heavy)
        return phase_mix(phases, spec.phase_cycles, spec.seed, spec.burstiness)
    raise ValueError(f"unknown arrival process {spec.arrival!r}")
