"""`fulcrum sim` end to end, and control policies plugged in by name."""

from __future__ import annotations

import json

from benchmarks.arrivals import pair, poisson_times
from benchmarks.dataset import synthetic_requests
from benchmarks.sim.cli import main
from benchmarks.sim.perf import roofline
from benchmarks.sim.policies import make_control, make_routing
from benchmarks.sim.simulator import SimConfig, Simulator
from core.workers import Role


def test_sim_cli_single_run_and_sweep(tmp_path):
    out = tmp_path / "one.json"
    assert main(["--dataset", "random", "--input-len", "256", "--output-len", "64",
                 "--num-prompts", "400", "--request-rate", "20", "--prefill", "1",
                 "--decode", "2", "--result-json", str(out),
                 "--plot-prefix", str(tmp_path / "p")]) == 0
    one = json.loads(out.read_text())
    assert one["completed"] == 400 and one["perf_model"] == "roofline-llama-3.1-8b-h100-tp1"
    assert (tmp_path / "p.roles.png").exists()
    sweep_out = tmp_path / "sweep.json"
    assert main(["--dataset", "random", "--input-len", "256", "--output-len", "64",
                 "--num-prompts", "300", "--prefill", "0", "--decode", "1",
                 "--sweep-rates", "5,20,80,320", "--sweep-refine", "2",
                 "--result-json", str(sweep_out)]) == 0
    sweep = json.loads(sweep_out.read_text())["sweep"]
    assert sweep["max_rate"] is not None and sweep["max_rate"] >= 5
    assert all("slo_attainment" in p for p in sweep["points"])


def test_registered_static_control_policy_moves_toward_its_ratio():
    control = make_control("static", {"prefill": "1", "decode": "3"})
    trace = pair(poisson_times(600, 20.0, 1), synthetic_requests(600, 200, 50, seed=1))
    sim = Simulator(SimConfig(prefill=3, decode=1, control_interval_s=0.5),
                    roofline("llama-3.1-8b", "h100"), make_routing("least-loaded"), control)
    res = sim.run(trace)
    assert res.flips and all(f[2] == Role.DECODE.value for f in res.flips)
    assert res.roles[-1][1:] == (1, 3)
    assert (res.finish_count == 1).all()


def test_sim_cli_slai_lowers_median_ttft_of_a_mixed_overload(tmp_path):
    """Shortest-first admission: under a queue, the median (short) request waits less."""
    results = {}
    for name, extra in (("fcfs", []), ("slai", ["--slai"])):
        out = tmp_path / f"{name}.json"
        assert main(["--dataset", "random", "--input-len", "4000", "--range-ratio", "0.95",
                     "--output-len", "8", "--num-prompts", "400", "--request-rate", "60",
                     "--prefill", "0", "--decode", "1", "--result-json", str(out),
                     *extra]) == 0
        results[name] = json.loads(out.read_text())
    assert results["slai"]["system"].endswith("/slai")
    assert results["slai"]["completed"] == results["fcfs"]["completed"] == 400
    assert results["slai"]["median_ttft_ms"] < 0.8 * results["fcfs"]["median_ttft_ms"]
