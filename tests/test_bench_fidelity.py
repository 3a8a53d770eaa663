"""The fidelity harness's arithmetic and its one-trace-for-both guarantee."""

from __future__ import annotations

import argparse
import json

from benchmarks import bench
from benchmarks.fidelity import relative_errors, resummarize, summarize_runs, workload_argv
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


def test_rounds_are_summarized_by_the_median_round_with_its_own_values() -> None:
    rounds = [relative_errors({"median_ttft_ms": real}, {"median_ttft_ms": sim})
              for real, sim in ((10.0, 11.0), (20.0, 16.0), (10.0, 10.5))]
    out = summarize_runs(rounds)["median_ttft_ms"]
    # the round with the median error (+5%), its live and simulated values together; the
    # separate medians (real 10, sim 11) would pair round 2's live with round 0's sim
    assert out["round"] == 2
    assert (out["real"], out["sim"]) == (10.0, 10.5)
    assert abs(out["rel_error"] - 0.05) < 1e-12
    assert [round(e, 3) for e in out["rel_errors"]] == [0.1, -0.2, 0.05]
    assert [(r["real"], r["sim"]) for r in out["rounds"]] == [(10.0, 11.0), (20.0, 16.0),
                                                            (10.0, 10.5)]


def test_an_even_count_of_rounds_reports_the_lower_middle_round() -> None:
    rounds = [relative_errors({"p90_tpot_ms": 10.0}, {"p90_tpot_ms": sim})
              for sim in (13.0, 9.0, 12.0, 10.0)]
    out = summarize_runs(rounds)["p90_tpot_ms"]
    assert out["round"] == 3 and out["sim"] == 10.0  # of -10%, 0%, +20%, +30%: the 0%


def test_a_stored_result_is_resummarized_from_its_rounds(tmp_path) -> None:  # noqa: ANN001
    runs = [relative_errors({"median_tpot_ms": 2.0}, {"median_tpot_ms": sim})
            for sim in (1.8, 2.4, 2.1)]
    stored = {"setup": {"rounds": "old"}, "metrics": {"median_tpot_ms": {"real": 0}},
              "runs": runs}
    path = tmp_path / "fidelity.json"
    path.write_text(json.dumps(stored))
    out = resummarize(path)
    assert out["runs"] == runs
    assert out["metrics"]["median_tpot_ms"]["round"] == 2
    assert out["metrics"]["median_tpot_ms"]["sim"] == 2.1
    assert "3 rounds" in out["setup"]["rounds"]
