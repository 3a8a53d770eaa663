"""The simulator's results are pinned: deterministic runs of every system (aggregated,
static P/D, arrow, dopd, ares; ShareGPT and phase-shift traces; SLAI admission, drain flips,
re-warm draws, migrations) must reproduce the recorded fingerprints exactly (summary floats
to rounding: numpy's reductions differ in the last bits across versions), so speed work
on the event loop, engine planning or snapshots cannot move a number unnoticed.

A deliberate change of simulated behaviour (engine model, policy decisions) re-records them:
`python -m benchmarks.sim.identity --write tests/data/sim_identity.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.sim import identity

RECORDED = Path(__file__).parent / "data" / "sim_identity.json"
DATA = json.loads(RECORDED.read_text())


@pytest.mark.parametrize("case", [c.name for c in identity.CASES])
def test_run_matches_recorded_fingerprint(case: str) -> None:
    expected = {case: DATA["cases"][case]}
    actual = identity.fingerprints(DATA["num_requests"], [case])
    assert identity.differences(expected, actual) == []


def test_fingerprint_sees_a_changed_result() -> None:
    case = identity.CASES[0]
    res = identity.run_case(case, 300)
    before = identity.fingerprint(res, identity.SLO_8B)
    res.finish[7] += 1e-9  # one request finishing a nanosecond later
    after = identity.fingerprint(res, identity.SLO_8B)
    assert identity.differences({case.name: before}, {case.name: after})


def test_summary_floats_match_to_rounding_not_beyond() -> None:
    recorded = {"c": {"metrics": {"mean_itl_ms": 8.681102145104296, "failed": 0}}}
    last_bits = {"c": {"metrics": {"mean_itl_ms": 8.681102145104294, "failed": 0}}}
    moved = {"c": {"metrics": {"mean_itl_ms": 8.681102145104296 * (1 + 1e-9), "failed": 0}}}
    assert identity.differences(recorded, last_bits) == []
    assert identity.differences(recorded, moved) == [
        f"c: mean_itl_ms 8.681102145104296 -> {8.681102145104296 * (1 + 1e-9)!r}"]


def test_speed_runs_repeat_the_same_results() -> None:
    from benchmarks.sim_speed import SCENARIOS, measure_here

    arrow = next(s for s in SCENARIOS if s.name == "arrow-4P4D")
    got = measure_here(arrow, 400, 2)
    assert got["requests"] == 400 and len(got["runs"]) == 2
    first, second = got["runs"]
    assert first["digest"] == second["digest"] and first["completed"] == 400
    assert first["cpu_s"] > 0 and first["events"] >= 400
