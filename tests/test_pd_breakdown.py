"""benchmarks.pd_breakdown's bookkeeping: engine timings placed on the client's clock, one
breakdown per target (never stacked segments that overlap), and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.pd_breakdown import (
    SEGMENTS_PD_CLIENT,
    SEGMENTS_PD_ENGINE,
    Sample,
    engine_marks,
    pick_table,
    plot,
    summarise,
)


def direct_sample(key: str, engine: bool = True) -> Sample:
    s = Sample(key, "pd_direct", prompt_tokens=500, output_tokens=64)
    s.marks.update(t0=10.0, p_reply=10.100, d_send=10.101, first=10.150, end=10.450)
    if engine:
        s.engine = {"prefill": {"queue_time_ms": 5.0, "time_to_first_token_ms": 70.0},
                    "decode": {"queue_time_ms": 20.0, "time_to_first_token_ms": 12.0}}
    engine_marks(s)
    return s


def test_engine_timings_are_placed_back_from_the_token_that_ended_them() -> None:
    s = direct_sample("bd-nixl-c1-r0-pd_direct-0")
    assert s.marks["ep_sched"] == pytest.approx(10.030)
    assert s.marks["ep_queued"] == pytest.approx(10.025)
    assert s.marks["e_sched"] == pytest.approx(10.138)
    assert s.marks["e_queued"] == pytest.approx(10.118)


def test_one_table_per_target_the_one_most_requests_fill() -> None:
    samples = [direct_sample(f"bd-nixl-c1-r{i}-pd_direct-0") for i in range(3)]
    assert pick_table("pd_direct", samples, traced=False) is SEGMENTS_PD_ENGINE
    samples += [direct_sample(f"bd-nixl-c1-r{i}-pd_direct-0", engine=False) for i in range(3, 7)]
    assert pick_table("pd_direct", samples, traced=False) is SEGMENTS_PD_CLIENT


def test_summary_stacks_one_breakdown_whose_segments_add_up() -> None:
    samples = [direct_sample(f"bd-nixl-c1-r{i}-pd_direct-0") for i in range(3)]
    samples.append(direct_sample("bd-nixl-c1-r3-pd_direct-0", engine=False))
    single = Sample("bd-nixl-c1-r0-single-0", "single", prompt_tokens=500, output_tokens=64)
    single.marks.update(t0=10.0, first=10.080, end=10.400)
    out = summarise([*samples, single], [], traced=False)
    entry = out["pd_direct"]
    assert list(entry["segments_ms"]) == [name for name, _, _ in SEGMENTS_PD_ENGINE]
    assert entry["segments_from"] == "3 of 4 requests"
    total = sum(q["median"] for q in entry["segments_ms"].values())
    assert total == pytest.approx(450.0, abs=0.01)  # t0 to end, nothing counted twice
    assert entry["e2e_ratio_vs_single"] == pytest.approx(450 / 400, abs=1e-3)
    assert entry["ttft_overhead_ms"] == pytest.approx(70.0, abs=0.01)


def test_plot_draws_every_connector(tmp_path: Path) -> None:
    samples = [direct_sample(f"bd-x-c1-r{i}-pd_direct-0") for i in range(2)]
    summary = summarise(samples, [], traced=False)
    result = {"config": {"model": "tiny", "dtype": "auto", "prompt_tokens": 500,
                         "max_tokens": 64},
              "runs": {"1 concurrent": {"fulcrum": summary, "nixl": summary}}}
    plot(result, tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 10_000
