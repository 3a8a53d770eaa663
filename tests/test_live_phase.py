"""The live phase benchmark's bookkeeping: per-phase SLO misses, decision summaries, ratios."""

from __future__ import annotations

from benchmarks.live_phase import by_phase, ratios, summarize_decisions
from benchmarks.metrics import SLO, RequestTimeline


def timeline(prompt: int, ttft_s: float, tpot_s: float, out: int = 11,
             success: bool = True) -> RequestTimeline:
    end = ttft_s + tpot_s * (out - 1)
    return RequestTimeline(start_s=0.0, prompt_tokens=prompt, output_tokens=out,
                           success=success, first_token_s=ttft_s, end_s=end)


def test_by_phase_counts_each_half_of_the_slo_per_phase():
    slo = SLO(ttft_ms=1000, tpot_ms=100)
    runs = [timeline(512, 0.2, 0.01), timeline(512, 1.5, 0.01),  # one TTFT miss
            timeline(32, 0.1, 0.2), timeline(32, 0.1, 0.05),      # one TPOT miss
            timeline(32, 0.1, 0.05, success=False)]               # failed: not attained
    phases = by_phase(runs, slo)
    assert phases["long-prompt"]["requests"] == 2
    assert phases["long-prompt"]["ttft_missed"] == 1
    assert phases["long-prompt"]["tpot_missed"] == 0
    assert phases["long-prompt"]["attainment"] == 0.5
    assert phases["long-output"]["requests"] == 3
    assert phases["long-output"]["tpot_missed"] == 1
    assert phases["long-output"]["attainment"] == 1 / 3


def test_by_phase_splits_at_the_given_prompt_length():
    slo = SLO(ttft_ms=1000, tpot_ms=100)
    runs = [timeline(256, 0.2, 0.01), timeline(150, 0.2, 0.01), timeline(32, 0.1, 0.05)]
    assert by_phase(runs, slo)["long-prompt"]["requests"] == 1      # 200 tokens by default
    assert by_phase(runs, slo, split_prompt_tokens=144)["long-prompt"]["requests"] == 2


def test_phase_shapes_parse_as_prompt_by_output_tokens():
    from benchmarks.live_phase import build_trace, shape

    assert shape("256x8") == (256, 8)
    trace = build_trace(1.0, 10.0, 1, seed=0, long_prompt=(256, 8), long_output=(32, 48))
    prompts = [e.request.prompt_tokens for e in trace]
    assert max(prompts) <= 320 and min(prompts) >= 24          # 256 and 32, +-25%
    assert any(p > 144 for p in prompts) and any(p < 144 for p in prompts)


def test_decisions_split_into_moves_and_counted_holds():
    decisions = [{"tick": 1, "at": 101.0, "note": "hold: both pools have headroom", "actions": []},
                 {"tick": 2, "at": 102.0, "note": "hold: both pools have headroom; 8 req/s",
                  "actions": []},
                 {"tick": 3, "at": 103.5, "note": "flip 1 to prefill: pressure",
                  "numbers": {"prefill_workers": 2}, "actions": [{"worker": "w2"}]}]
    out = summarize_decisions(decisions, started=100.0)
    assert out["ticks"] == 3
    assert out["holds"] == {"both pools have headroom": 2}
    assert out["moves"] == [{"t": 3.5, "note": "flip 1 to prefill: pressure",
                             "numbers": {"prefill_workers": 2}}]


def test_ratios_use_the_best_static_split_and_skip_missing_baselines():
    runs = {"half": {"request_goodput": 2.0}, "static-3P1D": {"request_goodput": 4.0},
            "arrow": {"request_goodput": 5.0}}
    out = ratios(runs)
    assert out["arrow"]["half split"] == 2.5
    assert out["arrow"]["best static"] == 1.25
    assert out["arrow"]["aggregated"] is None


def test_append_adds_systems_to_an_earlier_run(tmp_path, monkeypatch):
    import json

    import benchmarks.live_phase as live_phase

    goodputs = {"half": 2.0, "static-3P1D-arrow-routing": 3.0}

    def fake_run(system, trace, slo, profile, log_dir, *model_and_split):
        return {"system": system, "request_goodput": goodputs[system], "slo_attainment": 0.5,
                "failed": 0, "flip_count": 0, "pools": [], "phases": {}}

    monkeypatch.setattr(live_phase, "run_system", fake_run)
    out = tmp_path / "live.json"
    common = ["--minutes", "2", "--phase-s", "30", "--out", str(out)]
    assert live_phase.main(["--systems", "half", *common]) == 0
    assert live_phase.main(["--systems", "static-3P1D-arrow-routing", "--append", *common]) == 0
    result = json.loads(out.read_text())
    assert set(result["goodput"]) == {"half", "static-3P1D-arrow-routing"}
    assert result["ratios_mean"]["half"]["best static"] == 2.0 / 3.0
    for other in (["--minutes", "4", "--phase-s", "30", "--out", str(out)],
                  ["--long-output", "32x48", *common], ["--model", "default", *common]):
        try:
            live_phase.main(["--systems", "half", "--append", *other])
        except SystemExit as e:  # argparse's error: another trace cannot be appended
            assert e.code == 2
        else:
            raise AssertionError(f"appending a run with other settings must fail: {other}")


def test_append_with_another_seed_keeps_the_earlier_seed_and_reports_the_spread(
        tmp_path, monkeypatch):
    import json

    import benchmarks.live_phase as live_phase

    goodputs = {(0, "half"): 2.0, (0, "arrow"): 3.0, (0, "static-1P3D"): 1.0,
                (1, "half"): 4.0, (1, "arrow"): 5.0}
    seen_seed = {}

    def fake_trace(rate, phase_s, cycles, seed, *shapes):
        seen_seed["now"] = seed
        return [seed]

    def fake_run(system, trace, slo, profile, log_dir, *model_and_split):
        return {"system": system, "request_goodput": goodputs[(trace[0], system)],
                "slo_attainment": 0.5, "failed": 0, "flip_count": 0, "pools": [],
                "phases": {}}

    monkeypatch.setattr(live_phase, "build_trace", fake_trace)
    monkeypatch.setattr(live_phase, "run_system", fake_run)
    monkeypatch.setattr(live_phase, "profile_worker", lambda cluster, out, model="tiny": out)
    monkeypatch.setattr(live_phase, "UpCluster", _NoCluster)
    monkeypatch.setattr(live_phase, "plot", lambda result, path: None)
    out = tmp_path / "live.json"
    common = ["--minutes", "2", "--phase-s", "30", "--out", str(out)]
    assert live_phase.main(["--systems", "half,arrow,static-1P3D", "--seeds", "0",
                            *common]) == 0
    assert live_phase.main(["--systems", "half,arrow", "--seeds", "1", "--append",
                            *common]) == 0
    result = json.loads(out.read_text())
    assert [s["seed"] for s in result["seeds"]] == [0, 1]
    assert result["seeds"][0]["requests"] == 1
    assert result["goodput"]["half"] == {"mean": 3.0, "min": 2.0, "max": 4.0, "seeds": 2}
    assert result["goodput"]["static-1P3D"]["seeds"] == 1
    assert result["ratios_mean"]["arrow"]["half split"] == (1.5 + 1.25) / 2


class _NoCluster:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_ready(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_a_given_profile_is_used_without_profiling_a_worker(tmp_path, monkeypatch):
    import json

    import benchmarks.live_phase as live_phase

    given = tmp_path / "profile.json"
    seen: dict[str, object] = {}

    def fake_run(system, trace, slo, profile, log_dir, *model_and_split):
        seen[system] = profile
        return {"system": system, "request_goodput": 1.0, "slo_attainment": 0.5,
                "failed": 0, "flip_count": 0, "pools": [], "phases": {}}

    def no_cluster(*args, **kwargs):
        raise AssertionError("no worker is profiled when --profile is given")

    monkeypatch.setattr(live_phase, "run_system", fake_run)
    monkeypatch.setattr(live_phase, "UpCluster", no_cluster)
    monkeypatch.setattr(live_phase, "plot", lambda result, path: None)
    out = tmp_path / "live.json"
    assert live_phase.main(["--systems", "half,arrow", "--minutes", "2", "--phase-s", "30",
                            "--profile", str(given), "--out", str(out)]) == 0
    assert seen == {"half": given, "arrow": given}
    assert json.loads(out.read_text())["setup"]["profile"] == str(given)


def test_merge_joins_files_a_later_run_of_a_system_replacing_the_earlier(
        tmp_path, monkeypatch):
    import json

    import benchmarks.live_phase as live_phase

    goodputs = {"half": 2.0, "arrow": 3.0}

    def fake_run(system, trace, slo, profile, log_dir, *model_and_split):
        return {"system": system, "request_goodput": goodputs[system], "slo_attainment": 0.5,
                "failed": 0, "flip_count": 0, "pools": [], "phases": {}}

    monkeypatch.setattr(live_phase, "run_system", fake_run)
    monkeypatch.setattr(live_phase, "plot", lambda result, path: None)
    a, b, c, merged = (tmp_path / f"{n}.json" for n in "abcm")
    common = ["--minutes", "2", "--phase-s", "30", "--profile", str(tmp_path / "p.json")]
    assert live_phase.main(["--systems", "half,arrow", *common, "--out", str(a)]) == 0
    goodputs["arrow"] = 5.0  # the policy changed: its rerun goes to another file
    assert live_phase.main(["--systems", "arrow", *common, "--out", str(b)]) == 0
    assert live_phase.main(["--merge", str(a), str(b), "--out", str(merged)]) == 0
    result = json.loads(merged.read_text())
    (seed,) = result["seeds"]
    assert seed["runs"]["arrow"]["request_goodput"] == 5.0
    assert seed["runs"]["half"]["request_goodput"] == 2.0
    assert result["ratios_mean"]["arrow"]["half split"] == 2.5
    # files of another trace are not joined
    assert live_phase.main(["--systems", "arrow", "--minutes", "4", "--phase-s", "30",
                            "--profile", str(tmp_path / "p.json"), "--out", str(c)]) == 0
    try:
        live_phase.main(["--merge", str(a), str(c), "--out", str(merged)])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("merging runs of another trace must fail")


def test_a_rate_staircase_gives_each_cycle_its_own_rate():
    from benchmarks.live_phase import build_trace, rate_steps

    assert rate_steps("2,4,8") == (2.0, 4.0, 8.0)
    for bad in ("4,2", "2,2", ""):
        try:
            rate_steps(bad)
        except Exception as e:  # argparse turns this into a usage error
            assert "rising" in str(e)
        else:
            raise AssertionError(f"{bad!r} must be refused")
    trace = build_trace((2.0, 8.0), 50.0, 99, seed=3)  # cycles come from the steps
    first = sum(e.arrival_s < 100 for e in trace)
    second = sum(100 <= e.arrival_s < 200 for e in trace)
    assert max(e.arrival_s for e in trace) < 200
    assert 150 < first < 250 and 650 < second < 950          # 200 and 800 expected
    # each cycle still has both phases
    assert any(e.request.prompt_tokens > 200 for e in trace if e.arrival_s < 50)
    assert all(e.request.prompt_tokens <= 200 for e in trace if 150 <= e.arrival_s < 200)


def test_capacity_is_the_last_step_before_the_first_cycle_under_target():
    from types import SimpleNamespace

    from benchmarks.live_phase import by_cycle, capacity

    slo = SLO(ttft_ms=1000, tpot_ms=100)
    arrivals = [10, 20, 130, 140, 250, 260, 370, 380]
    ttfts = [0.1, 0.1, 0.1, 0.1, 0.1, 2.0, 0.1, 0.1]   # cycle 2 attains 50%
    trace = [SimpleNamespace(arrival_s=a) for a in arrivals]
    cycles = by_cycle(trace, [timeline(32, t, 0.01) for t in ttfts], slo, 120.0)
    assert [c["attainment"] for c in cycles] == [1.0, 1.0, 0.5, 1.0]
    assert cycles[0]["goodput"] == 2 / 120
    steps = (4.0, 5.0, 6.0, 7.0)
    assert capacity(cycles, steps) == 5.0        # cycle 3 recovering does not count
    assert capacity(cycles, steps, target=0.5) == 7.0
    assert capacity([{"cycle": 0, "attainment": 0.2}], steps) == 0.0


def test_a_staircase_run_reports_capacity_and_its_ratios(tmp_path, monkeypatch):
    import json

    import benchmarks.live_phase as live_phase

    attained = {"half": [1.0, 0.95, 0.6], "arrow": [1.0, 0.99, 0.92]}

    def fake_run(system, trace, slo, profile, log_dir, model, split, cycle_s):
        assert cycle_s == 60.0
        assert max(e.arrival_s for e in trace) < 3 * cycle_s
        return {"system": system, "request_goodput": 1.0, "slo_attainment": 0.9,
                "failed": 0, "flip_count": 0, "pools": [], "phases": {},
                "cycles": [{"cycle": i, "attainment": a} for i, a in
                           enumerate(attained[system])]}

    monkeypatch.setattr(live_phase, "run_system", fake_run)
    monkeypatch.setattr(live_phase, "profile_worker", lambda cluster, out, model="tiny": out)
    out = tmp_path / "stairs.json"
    assert live_phase.main(["--systems", "half,arrow", "--rate-steps", "4,6,9",
                            "--phase-s", "30", "--profile", str(tmp_path / "p.json"),
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["setup"]["rate"] == [4.0, 6.0, 9.0] and result["setup"]["minutes"] == 3.0
    assert result["capacity"]["half"]["mean"] == 6.0
    assert result["capacity"]["arrow"]["mean"] == 9.0
    assert result["capacity_ratios_mean"]["arrow"]["half split"] == 1.5
