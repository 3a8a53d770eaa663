"""The fair comparison: rate-grid metrics, baselines, systems from the registries, a quick run."""

from __future__ import annotations

import json

import pytest

from benchmarks.metrics import SLO
from benchmarks.sim.compare import (
    ADAPTIVE,
    control_knobs,
    max_rate,
    run,
    slai_capacity,
    systems,
    table,
)
from benchmarks.sim.engine import EngineConfig
from benchmarks.sim.perf import roofline
from instance_manager.controller.calibrate import arrow_knobs, dopd_knobs


def _pts(*pairs):
    return [{"request_rate": r, "slo_attainment": a, "median_ttft_ms": 100.0,
             "p99_itl_ms": 20.0} for r, a in pairs]


def test_max_rate_interpolates_the_crossing_and_takes_the_highest_passing_rate():
    assert max_rate(_pts((10, 1.0), (20, 0.95), (30, 0.85))) == pytest.approx(25.0)
    # not monotone: a later pass counts (attainment of adaptive systems wobbles)
    assert max_rate(_pts((10, 1.0), (20, 0.8), (30, 0.92), (40, 0.1))) == \
        pytest.approx(30 + 10 * 0.02 / 0.82)
    assert max_rate(_pts((10, 0.5))) == 0.0
    assert max_rate(_pts((10, 0.95), (20, 0.99))) == 20  # never crossed: the top of the grid


def test_slai_capacity_needs_median_ttft_and_pooled_tbt():
    pts = _pts((10, 1.0), (20, 1.0), (30, 1.0))
    pts[1]["median_ttft_ms"] = 600.0
    pts[2]["p99_itl_ms"] = 80.0
    assert slai_capacity(pts, SLO(tbt_ms=50)) == 10
    assert slai_capacity(pts, SLO()) == 30


def test_systems_cover_budgets_splits_oracle_and_registered_adaptive_policies():
    names = [s.name for s in systems(4, with_oracle=True)]
    assert names[:8] == ["agg@512", "agg@1024", "agg@2048", "agg@8192", "static-1P3D",
                         "static-2P2D", "static-3P1D", "oracle-schedule"]
    for name, *_ in ADAPTIVE:
        assert name in names
    flipping = [s for s in systems(4, True) if s.kind in ("adaptive", "oracle")]
    assert all((s.prefill, s.decode) == (2, 2) for s in flipping)  # the same start
    assert "oracle-schedule" not in [s.name for s in systems(4, with_oracle=False)]


def test_control_knobs_come_from_the_perf_model_and_only_accepted_ones_pass():
    perf = roofline("llama-3.1-8b", "h100")
    slo = SLO(ttft_ms=1000, tpot_ms=40)
    engine = EngineConfig()
    dopd = control_knobs("dopd", perf, slo, engine)
    expected = dopd_knobs(perf, 0.040, engine.max_num_seqs)
    assert dopd and all(dopd[k] == expected[k] for k in dopd)
    assert "adjustment_interval_s" not in dopd  # reaction knobs stay at their defaults
    arrow = control_knobs("arrow", perf, slo, engine)
    assert arrow["prefill_tokens_per_s"] == arrow_knobs(perf, 0.040, engine.max_num_seqs)[
        "prefill_tokens_per_s"]
    assert control_knobs("static", perf, slo, engine) == {}


def test_quick_comparison_writes_json_table_and_plots(tmp_path):
    out = run(tmp_path, quick=True, seeds=(0,), grid_points=3, processes=1)
    saved = json.loads((tmp_path / "sim_comparison_quick.json").read_text())
    assert saved["results"].keys() == {"8b-h100"}
    summ = saved["results"]["8b-h100"]["phase-1400"]
    b = summ["baselines"]
    assert b["agg-default"] == "agg@8192" and b["static-half"] == "static-2P2D"
    assert b["oracle"] == "oracle-schedule" and b["static-best"].startswith("static-")
    arrow = summ["systems"]["arrow"]
    assert set(arrow["ratios"]) >= {"agg-default", "agg-best", "static-half",
                                    "static-calibrated", "static-best", "oracle"}
    assert arrow["max_rate"]["n"] == 1
    assert "0s" in summ["flip_variants"]
    assert "oracle-schedule" not in saved["results"]["8b-h100"]["sharegpt-poisson"]["systems"]
    assert (tmp_path / "sim_8b-h100_phase-1400_attainment.png").exists()
    assert "| phase-1400 |" in table(out)


def test_only_some_systems_run_on_the_same_grid_and_merged_raw_files_later_win(tmp_path):
    from benchmarks.sim.compare import merge_raw, plan

    full, grids = plan(True, (0,), 100, 3)
    some, grids_some = plan(True, (0,), 100, 3, only_systems=["arrow", "static-2P2D"])
    assert grids_some == grids  # the grid does not depend on which systems run
    assert {t.system.name for t in some} == {"arrow", "static-2P2D"}
    assert len(some) < len(full)
    with pytest.raises(ValueError, match="unknown systems"):
        plan(True, (0,), 100, 3, only_systems=["arow"])
    first = {"grids": {"8b-h100/phase-1400": [1.0, 2.0]}, "results": [
        {"setup": "8b-h100", "workload": "phase-1400", "system": s, "seed": 0, "flip": "live",
         "points": [{"request_rate": 1.0, "slo_attainment": a}], "error": None, "roles": None,
         "cpu_s": 1.0} for s, a in (("arrow", 0.5), ("static-2P2D", 0.9))]}
    second = {"grids": {"8b-h100/phase-1400": [1.0, 2.0]}, "results": [
        dict(first["results"][0], points=[{"request_rate": 1.0, "slo_attainment": 0.95}])]}
    merged = merge_raw([first, second])
    by = {r["system"]: r["points"][0]["slo_attainment"] for r in merged["results"]}
    assert by == {"arrow": 0.95, "static-2P2D": 0.9}
    with pytest.raises(ValueError, match="rate grids differ"):
        merge_raw([first, dict(second, grids={"8b-h100/phase-1400": [1.0, 3.0]})])


def test_diagnose_runs_one_point_as_the_comparison_does_and_slices_it():
    from benchmarks.sim import diagnose
    from benchmarks.sim.compare import setups

    setup = setups(True)[0]
    sysdef = diagnose.find_system(setup, "dopd", True)
    res, log, m = diagnose.run_one(setup, "phase-1400", sysdef, 20.0, 0, quick=True)
    rows = diagnose.slices(res, setup, 3.0)
    assert sum(r["requests"] for r in rows) == res.arrival.size
    assert log is not None and log.ticks and all("note" in t for t in log.ticks)
    assert sum(t["moved"] for t in log.ticks) == len(res.flips)
    assert 0.0 <= m["slo_attainment"] <= 1.0
