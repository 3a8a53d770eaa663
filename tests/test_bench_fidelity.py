"""The fidelity harness's arithmetic and its one-trace-for-both guarantee."""

from __future__ import annotations

import argparse

from benchmarks import bench
from benchmarks.fidelity import relative_errors, summarize_runs, workload_argv
from benchmarks.sim import cli as sim_cli
from benchmarks.workload import WorkloadSpec, build_requests, build_trace


def test_relative_errors_are_sim_over_real_minus_one() -> None:
    out = relative_errors({"median_ttft_ms": 50.0, "p90_ttft_ms": 0.0, "slo_attainment": 1.0},
                          {"median_ttft_ms": 55.0, "p90_ttft_ms": 3.0})
    assert abs(out["median_ttft_ms"]["rel_error"] - 0.1) < 1e-12
    assert out["p90_ttft_ms"]["rel_error"] is None  # no division by a zero measurement
    assert "slo_attainment" not in out  # only keys both sides have


def test_bench_and_sim_build_the_same_trace_from_the_shared_arguments() -> None:
    args = argparse.Namespace(input_len=64, output_len=8, num_prompts=20, request_rate=4.0,
                              seed=3, goodput=["ttft:500", "tpot:50"])
    argv = workload_argv(args)
    bench_parser, sim_parser = argparse.ArgumentParser(), argparse.ArgumentParser()
    bench.add_bench_args(bench_parser)
    sim_cli.add_sim_args(sim_parser)
    traces = []
    for parsed in (bench_parser.parse_args(["--base-url", "http://x", *argv]),
                   sim_parser.parse_args(argv)):
        spec = WorkloadSpec.from_args(parsed)
        traces.append(build_trace(spec, build_requests(spec)))
    (a, b) = traces
    assert len(a) == 20
    assert [(r.arrival_s, r.request.prompt_tokens, r.request.output_tokens) for r in a] == \
           [(r.arrival_s, r.request.prompt_tokens, r.request.output_tokens) for r in b]


def test_rounds_are_summarized_by_their_median() -> None:
    rounds = [relative_errors({"median_ttft_ms": real}, {"median_ttft_ms": sim})
              for real, sim in ((10.0, 11.0), (20.0, 16.0), (10.0, 10.5))]
    out = summarize_runs(rounds)["median_ttft_ms"]
    assert out["real"] == 10.0 and out["sim"] == 11.0
    assert [round(e, 3) for e in out["rel_errors"]] == [0.1, -0.2, 0.05]
    assert abs(out["rel_error"] - 0.05) < 1e-12  # the median round, not the mean
