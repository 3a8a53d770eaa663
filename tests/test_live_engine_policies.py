"""The live ARES / SLAI benchmark's bookkeeping: same traces for both variants, ratios."""

from __future__ import annotations

import json

import benchmarks.live_engine_policies as lep


def test_ratios_are_candidate_over_baseline_per_seed_then_spread():
    base = {"2/0": {"request_goodput": 2.0, "median_ttft_ms": 100.0},
            "2/1": {"request_goodput": 4.0, "median_ttft_ms": 200.0},
            "4/0": {"request_goodput": 1.0, "median_ttft_ms": 0.0}}
    cand = {"2/0": {"request_goodput": 3.0, "median_ttft_ms": 50.0},
            "2/1": {"request_goodput": 4.0, "median_ttft_ms": 100.0},
            "4/0": {"request_goodput": 2.0, "median_ttft_ms": 10.0}}
    out = lep.compare(base, cand, [2.0, 4.0])
    assert out["2"]["request_goodput"] == {"mean": 1.25, "min": 1.0, "max": 1.5, "seeds": 2}
    assert out["2"]["median_ttft_ms"]["mean"] == 0.5
    assert "median_ttft_ms" not in out["4"]  # a zero baseline gives no ratio
    assert out["4"]["request_goodput"]["mean"] == 2.0


def test_both_variants_run_the_same_traces_in_the_same_order(tmp_path, monkeypatch):
    seen: dict[str, list] = {}

    def fake_trace(rate, seconds, seed):
        return [(rate, seed)]

    def fake_variant(name, workers, options, traces, slo, log_dir):
        seen[name] = [(k, t) for k, t in traces.items()]
        good = 2.0 if name == "fcfs" else 3.0
        return {k: {"request_goodput": good, "slo_attainment": 0.5, "median_ttft_ms": 10.0,
                    "p99_ttft_ms": 20.0, "p99_tpot_ms": 5.0, "p99_itl_ms": 6.0}
                for k in traces}

    monkeypatch.setattr(lep, "build_trace", fake_trace)
    monkeypatch.setattr(lep, "run_variant", fake_variant)
    monkeypatch.setattr(lep, "plot", lambda result, path: None)
    out = tmp_path / "r.json"
    assert lep.main(["--experiments", "slai", "--slai-rates", "1,3", "--seeds", "0,5",
                     "--out", str(out)]) == 0
    assert seen["fcfs"] == seen["slai"]
    assert [k for k, _ in seen["fcfs"]] == ["1/0", "1/5", "3/0", "3/5"]
    result = json.loads(out.read_text())
    exp = result["experiments"]["slai"]
    assert exp["variants"] == ["fcfs", "slai"]
    assert exp["ratios"]["3"]["request_goodput"]["mean"] == 1.5
    assert result["setup"]["slo"]["tbt"] == 200.0


def test_the_slai_variant_loads_the_scheduler_class_and_ares_routes_with_ares():
    slai = lep.EXPERIMENTS["slai"]
    assert f"--worker-arg={lep.SLAI_SCHEDULER}" in slai.candidate[1]
    assert not any("scheduler" in o for o in slai.baseline[1])
    ares = lep.EXPERIMENTS["ares"]
    assert ares.candidate[1][-2:] == ("--policy", "ares")
    assert ares.baseline[1][-2:] == ("--policy", "least-loaded")


def test_migrations_reads_the_gateways_counter(monkeypatch):
    class Reply:
        text = ("# HELP x\nfulcrum_stream_migrations_total 7.0\nother 1\n"
                "fulcrum_stream_kv_migrations_total 4.0\n"
                'fulcrum_pd_leg_failures_total{action="retry",leg="decode"} 5.0\n'
                'fulcrum_pd_leg_failures_total{action="rescued",leg="decode"} 2.0\n')

    monkeypatch.setattr(lep.httpx, "get", lambda url, timeout: Reply())

    class Cluster:
        url = "http://gw"

    assert lep.migrations(Cluster()) == (7.0, 2.0, 4.0)
