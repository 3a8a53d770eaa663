"""The simulator comparison: calibrated DOPD knobs, systems, and a tiny end-to-end run."""

from __future__ import annotations

import json

from benchmarks.metrics import SLO
from benchmarks.sim.compare import dopd_knobs, run, systems
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import roofline


def test_dopd_knobs_come_from_the_perf_model():
    perf = roofline("llama-3.1-8b", "h100")
    slo = SLO(ttft_ms=1000, tpot_ms=40)
    knobs = dopd_knobs(perf, slo, EngineConfig(), 1000.0)
    one_prompt = perf.iteration_time(2000, 2000 * 2000 / 2, 0, 0.0)
    fitted = (knobs["prefill_quadratic_s"] * 2000**2 + 2000 / knobs["prefill_tokens_per_s"]
              + knobs["prefill_overhead_s"])
    assert abs(fitted - one_prompt) / one_prompt < 0.05
    # the decode rate is reached at a batch whose step meets the TPOT target
    batch = None
    for b in range(1, 257):
        step = perf.iteration_time(0, 0.0, b, b * 1000.0)
        if abs(b / step - knobs["decode_tokens_per_s"]) < 1e-6:
            batch = b
    assert batch is not None and perf.iteration_time(0, 0.0, batch, batch * 1000.0) <= 0.04
    tighter = dopd_knobs(perf, SLO(ttft_ms=1000, tpot_ms=15), EngineConfig(), 1000.0)
    assert tighter["decode_tokens_per_s"] < knobs["decode_tokens_per_s"]


def test_systems_cover_every_static_split_and_the_adaptive_ones():
    names = [s.name for s in systems(4, {})]
    assert names == ["aggregated", "static-1P3D", "static-2P2D", "static-3P1D", "arrow",
                     "dopd", "dopd+ares", "aggregated+slai", "arrow+slai", "dopd+ares+slai"]
    assert [s.name for s in systems(4, {}) if s.slai] == names[-3:]


def test_tiny_comparison_writes_json_and_plots(tmp_path):
    res = run(tmp_path, workers=2, phase_s=1.5, poisson_s=1.5, rates=[2.0, 600.0],
              slo=SLO(ttft_ms=1000, tpot_ms=40), seed=0, refine=1, gpu="h100",
              model="llama-3.1-8b", flip_rewarm_s=1.0, flip_mode="relabel",
              decode_context=1000.0, only=["aggregated", "static-1P1D", "arrow"])
    saved = json.loads((tmp_path / "sim_comparison.json").read_text())
    assert saved["flip_rewarm_s"] == 1.0 and "dopd" in saved["knobs"]
    for wname in ("phase-shift", "sharegpt-poisson"):
        per = res["workloads"][wname]
        assert set(per) == {"aggregated", "static-1P1D", "arrow", "_best_static"}
        for name in ("aggregated", "static-1P1D", "arrow"):
            v = per[name]
            assert v["max_rate"] == 2.0 or v["max_rate"] > 2.0  # 2 req/s always attains
            assert v["bracketed"]  # 600 req/s on two workers never does
        assert (tmp_path / f"sim_{wname}_attainment.png").exists()
