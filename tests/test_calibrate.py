"""Control-policy knobs derived from a performance model or a `fulcrum profile` file."""

import argparse
import json

import pytest

from benchmarks.metrics import SLO
from benchmarks.sim.cli import control_knobs
from benchmarks.sim.perf import FittedModel, roofline
from instance_manager.controller.calibrate import (
    arrow_knobs,
    dopd_knobs,
    dopd_knobs_from_profile,
    knobs_from_profile,
)
from instance_manager.controller.registry import make_control_policy


def fitted() -> FittedModel:
    # prefill 1e-4 s/token + 10 ms; a step is 5 ms + 1 ms per sequence
    return FittedModel((0.0, 1e-4, 0.01), (0.005, 1e-3, 0.0), kv_capacity=50_000)


def test_dopd_knobs_follow_the_model():
    knobs = dopd_knobs(fitted(), tpot_s=0.045, max_num_seqs=256, decode_context=100)
    assert knobs["prefill_tokens_per_s"] == pytest.approx(10_000, rel=1e-3)
    assert knobs["prefill_overhead_s"] == pytest.approx(0.01, abs=1e-4)
    # the largest batch whose step meets 45 ms is 40 (5 + 40 ms)
    assert knobs["decode_step_s"] == pytest.approx(0.045)
    assert knobs["decode_tokens_per_s"] == pytest.approx(40 / 0.045)
    assert knobs["kv_tokens_per_worker"] == 50_000
    slower = dopd_knobs(fitted(), tpot_s=0.025, decode_context=100)
    assert slower["decode_tokens_per_s"] < knobs["decode_tokens_per_s"]
    make_control_policy("dopd", **knobs)  # every derived knob is a real knob


def test_roofline_gives_an_h100_its_own_constants():
    knobs = dopd_knobs(roofline("llama-3.1-8b", "h100"), tpot_s=0.04)
    default = make_control_policy("dopd").config
    assert knobs["prefill_tokens_per_s"] > 5 * default.prefill_tokens_per_s
    assert knobs["decode_step_s"] <= 0.04
    assert arrow_knobs(roofline("llama-3.1-8b", "h100"), 0.04)["prefill_tokens_per_s"] > 10_000


def test_profile_file_and_sim_cli(tmp_path):
    points = {"name": "p", "prefill": [[n, 0.01 + 1e-4 * n] for n in (16, 128, 512, 1024)],
              "decode": [[b, b * 100, 0.005 + 1e-3 * b] for b in (1, 2, 4, 8, 16)],
              "kv_capacity_tokens": 50_000}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(points))
    knobs = dopd_knobs_from_profile(path, tpot_s=0.045)
    assert knobs["prefill_tokens_per_s"] == pytest.approx(10_000, rel=0.01)
    assert knobs["decode_tokens_per_s"] == pytest.approx(40 / 0.045, rel=0.01)
    args = argparse.Namespace(control_policy="dopd", control_knob=["hysteresis=0.5"],
                              max_num_seqs=256)
    derived = control_knobs(args, fitted(), SLO.parse(["tpot:45"]))
    assert derived["decode_tokens_per_s"] == pytest.approx(40 / 0.045, rel=0.01)
    assert derived["hysteresis"] == "0.5"  # the user's knob wins
    none = argparse.Namespace(control_policy="static", control_knob=[], max_num_seqs=256)
    assert control_knobs(none, fitted(), SLO.parse(["tpot:45"])) == {}
    # Arrow's decode slots: the largest batch whose step meets TPOT (a step of
    # 5 ms + 1 ms per sequence meets 45 ms up to 40), capped by max_num_seqs
    arrow = argparse.Namespace(control_policy="arrow", control_knob=[], max_num_seqs=64)
    assert control_knobs(arrow, fitted(), SLO.parse(["tpot:45"]))["decode_slots"] == 40
    arrow.max_num_seqs = 16
    assert control_knobs(arrow, fitted(), SLO.parse(["tpot:45"]))["decode_slots"] == 16


def test_arrow_slots_from_a_profile_are_counted_at_the_profiled_context(tmp_path):
    # a step of 50 ms + 50 us per token of context, measured at 160 tokens per sequence:
    # the fit cannot tell a per-sequence cost from a per-token one, so slots are counted
    # at the context it saw (26 sequences meet 260 ms), not at a longer assumed one (4)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({
        "prefill": [[n, 0.01 + 1e-4 * n] for n in (16, 128, 512)],
        "decode": [[b, b * 160, 0.05 + 5e-5 * b * 160] for b in (1, 4, 16)],
        "kv_capacity_tokens": 50_000}))
    assert knobs_from_profile("arrow", path, tpot_s=0.26)["decode_slots"] == 26
    assert knobs_from_profile("dopd", path, tpot_s=0.26)["decode_step_s"] == pytest.approx(
        0.05 + 5e-5 * 26 * 160, rel=1e-3)


def test_fulcrum_up_derives_dopd_knobs_from_a_profile(tmp_path):
    from deploy.cli import _control_config

    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"prefill": [[n, 1e-4 * n] for n in (16, 128, 512, 1024)],
                                "decode": [[b, b * 100, 0.005 + 1e-3 * b] for b in (1, 4, 16)],
                                "kv_capacity_tokens": 50_000}))
    args = argparse.Namespace(control_knob=["decode_tokens_per_s=123"], control_policy="dopd",
                              control_profile=path, slo_ttft_ms=1000.0, slo_tpot_ms=45.0,
                              control_interval=2.0, control_window=20.0, advisory=True,
                              flip_mode="relabel")
    knobs = dict(_control_config(args).knobs)
    assert float(knobs["prefill_tokens_per_s"]) == pytest.approx(10_000, rel=0.01)
    assert knobs["decode_tokens_per_s"] == "123"
    make_control_policy("dopd", **knobs)
