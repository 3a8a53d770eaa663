"""The routing-policy table: every policy on the same trace, ratios to least-loaded."""

from __future__ import annotations

import json

from benchmarks.policy_table import (
    BASELINE,
    METRIC_KEYS,
    POLICIES,
    RATIO_KEY,
    build_table,
    main,
    ratio,
)


def test_ratio_is_none_without_a_usable_base():
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(3.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None


def test_build_table_divides_by_the_baseline_at_the_same_rate():
    base = {k: 2.0 for k in METRIC_KEYS}
    other = {k: 3.0 for k in METRIC_KEYS}
    table = build_table({BASELINE: {"1": base, "2": other}, "arrow": {"1": other, "2": other}})
    assert set(table["arrow"]["1"][RATIO_KEY].values()) == {1.5}
    assert set(table["arrow"]["2"][RATIO_KEY].values()) == {1.0}
    assert set(table[BASELINE]["1"][RATIO_KEY].values()) == {1.0}


def test_tiny_run_writes_the_table_json_and_png(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--rates", "2,1000", "--prefill", "2", "--decode", "2",
                 "--poisson-s", "1.5"]) == 0
    saved = json.loads((tmp_path / "policy_table.json").read_text())
    assert (tmp_path / "policy_table.png").stat().st_size > 0
    cfg = saved["config"]
    assert (cfg["prefill"], cfg["decode"], cfg["control"]) == (2, 2, "none")
    assert cfg["rates"] == [2.0, 1000.0] and cfg["baseline"] == BASELINE
    table = saved["results"]
    assert list(table) == list(POLICIES)
    for policy, per_rate in table.items():
        assert list(per_rate) == ["2", "1000"]
        for rate, row in per_rate.items():
            # every policy served the same trace, to completion
            assert row["num_prompts"] == table[BASELINE][rate]["num_prompts"] > 0
            assert row["completed"] == row["num_prompts"]
            assert set(METRIC_KEYS) <= set(row) and set(row[RATIO_KEY]) == set(METRIC_KEYS)
            for key in METRIC_KEYS:
                assert row[key] is not None
                if policy == BASELINE and row[key]:
                    assert row[RATIO_KEY][key] == 1.0
    # 2 req/s never misses the SLOs; 1000 req/s on four simulated H100s does
    assert table[BASELINE]["2"]["slo_attainment"] == 1.0
    assert table[BASELINE]["1000"]["slo_attainment"] < 1.0
    printed = capsys.readouterr().out
    assert all(policy in printed for policy in POLICIES)
