"""What the gateway exports at /metrics: labels on latency, build info, restarts, controller."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fake_worker import create_fake_worker
from instance_manager.controller.base import FlipAction
from instance_manager.controller.loop import Decision
from instance_manager.controller.metrics import (
    ControllerMetrics,
    decision_metrics,
    target_prefill_workers,
)
from router.build_info import fulcrum_version
from router.cluster import Cluster, Role, WorkerState
from tests.servers import serve_in_thread
from tests.test_control_admin import make_app, tick_controller
from tests.test_gateway_fake import MODEL, _gateway


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    for n, lab, v in samples(text):
        if n == name and all(lab.get(k) == want for k, want in labels.items()):
            return v
    return None


@pytest.fixture()
def gateway() -> Iterator[tuple[str, Cluster, object]]:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        with serve_in_thread(_gateway(cluster)) as url:
            yield url, cluster, d_app


def test_latency_histograms_carry_route_model_mode_and_worker(gateway) -> None:
    url, cluster, d_app = gateway
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        list(r.iter_lines())
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
    cluster.set_state("p0", WorkerState.DEAD)  # no prefill pool: served locally
    assert httpx.post(url + "/v1/completions", json=body).status_code == 200
    assert httpx.post(url + "/v1/completions", json={**body, "model": "nope"}
                      ).status_code == 404
    text = httpx.get(url + "/metrics").text
    pd = {"route": "/v1/completions", "model": MODEL, "mode": "pd", "worker": "d0"}
    assert value(text, "fulcrum_time_to_first_token_seconds_count", **pd) == 1
    assert value(text, "fulcrum_time_per_output_token_seconds_count", **pd) == 1
    assert value(text, "fulcrum_e2e_request_latency_seconds_count", **pd) == 2
    assert value(text, "fulcrum_e2e_request_latency_seconds_count",
                 **{**pd, "mode": "local"}) == 1
    assert value(text, "fulcrum_e2e_request_latency_seconds_count", mode="error") == 1
    assert value(text, "fulcrum_requests_total", status="404") == 1


def test_build_info_kv_ratio_and_restarts(gateway) -> None:
    url, cluster, d_app = gateway
    cluster.set_process("d0", 100)
    cluster.set_process("d0", 101)  # a new pid: the manager restarted it
    d_app.state.stats.running = 25  # the fake reports KV usage running / 100
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and cluster.view("d0").kv_cache_usage != 0.25:
        time.sleep(0.05)  # the gateway polls worker gauges every 0.2 s here
    text = httpx.get(url + "/metrics").text
    assert value(text, "fulcrum_build_info", version=fulcrum_version()) == 1
    assert value(text, "fulcrum_worker_restarts_total", worker="d0") == 1
    assert value(text, "fulcrum_worker_restarts_total", worker="p0") == 0
    assert value(text, "fulcrum_worker_kv_cache_usage_ratio", worker="d0") == 0.25
    assert "fulcrum_worker_kv_cache_usage{" not in text


def _scrape(collector) -> str:  # noqa: ANN001
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_controller_exports_targets_slo_and_load() -> None:
    app = make_app()
    metrics = ControllerMetrics(lambda: app.state.controller)
    before = _scrape(metrics)
    assert value(before, "fulcrum_controller_slo_target_seconds", metric="tpot") == 0.1
    assert value(before, "fulcrum_controller_ticks_total") == 0
    assert value(before, "fulcrum_controller_target_workers", role="prefill") is None
    assert "# TYPE fulcrum_controller_target_workers gauge" in before
    tick_controller(app, ticks=2)
    after = _scrape(metrics)
    assert value(after, "fulcrum_controller_ticks_total") == 2
    assert value(after, "fulcrum_controller_info", policy="arrow", mode="act") == 1
    load = value(after, "fulcrum_controller_pool_load_ratio", role="prefill")
    assert load == app.state.controller.decisions[-1].numbers["prefill_load"]
    target_p = value(after, "fulcrum_controller_target_workers", role="prefill")
    target_d = value(after, "fulcrum_controller_target_workers", role="decode")
    assert target_p is not None and target_p + target_d == 4
    assert _scrape(ControllerMetrics(lambda: None)) == ""


def _decision(numbers: dict, actions: tuple = ()) -> Decision:
    return Decision(1, 0.0, "p", "act", "", numbers, actions)


def test_target_comes_from_the_policy_or_from_its_actions() -> None:
    assert target_prefill_workers(_decision({"target_prefill_workers": 3,
                                             "prefill_workers": 1})) == 3
    assert target_prefill_workers(_decision({"target_prefill": 2})) == 2
    flip = FlipAction("d0", Role.PREFILL, "pressure")
    assert target_prefill_workers(_decision({"prefill_workers": 1}, (flip,))) == 2
    assert target_prefill_workers(_decision({"prefill_workers": 1})) == 1
    assert target_prefill_workers(_decision({})) is None


def test_dopd_forecast_is_exported() -> None:
    numbers = {"prefill_workers": 1, "decode_workers": 3, "prefill_share_now": 0.4,
               "prefill_share_forecast": 0.55, "target_prefill_workers": 2}
    fams = {f.name: f for f in decision_metrics(_decision(numbers))}
    share = {s.labels["kind"]: s.value for s in fams["fulcrum_controller_prefill_share_ratio"]
             .samples}
    assert share == {"observed": 0.4, "forecast": 0.55}
    pools = {s.labels["role"]: s.value for s in fams["fulcrum_controller_target_workers"].samples}
    assert pools == {"prefill": 2, "decode": 2}
