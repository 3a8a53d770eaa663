"""The migration-cost benchmark's arithmetic (the live runs are in `benchmarks/`)."""

from __future__ import annotations

import pytest

from benchmarks.migration_cost import counter, fit, stall_of


def test_stall_is_the_longest_gap_beyond_a_normal_one() -> None:
    # first token at 0 (the handoff), then one every 10 ms, with a 250 ms hole after
    # the 17th token: the move
    times = [0.0, 0.5] + [0.5 + 0.01 * i for i in range(1, 16)]
    times += [times[-1] + 0.25 + 0.01 * i for i in range(0, 20)]
    out = stall_of(times, after=16)
    assert out["stall_s"] == pytest.approx(0.24)
    assert out["gap_s"] == pytest.approx(0.01)
    assert out["at_token"] == 17  # the first token's own wait (0.5 s) does not count


def test_fit_recovers_fixed_and_per_token_parts() -> None:
    points = [(x, 0.02 + 1e-4 * x) for x in (100, 500, 1000)]
    line = fit(points)
    assert line is not None
    assert line["fixed_s"] == pytest.approx(0.02) and line["per_token_s"] == pytest.approx(1e-4)
    assert fit([(100, 0.1), (100, 0.2)]) is None  # one context: no slope


def test_counter_reads_an_exact_metric_name() -> None:
    text = ("fulcrum_stream_migrations_total 3.0\n"
            "fulcrum_stream_kv_migrations_total 2.0\n")
    assert counter(text, "fulcrum_stream_migrations_total") == 3.0
    assert counter(text, "fulcrum_stream_kv_migrations_total") == 2.0
    assert counter(text, "fulcrum_nothing_total") == 0.0
