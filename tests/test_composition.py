"""The gateway alone (`router.app.create_app`) and composed with the role controller
(`deploy.gateway_app.build_gateway`): the router serves, flips and drains by hand without
`instance_manager`; the composed gateway runs and exposes the controller."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from core.workers import Role, WorkerState
from deploy.gateway_app import build_gateway
from instance_manager.controller.loop import Controller
from router.app import GatewayConfig, create_app
from router.cluster import Cluster
from router.control_port import ControlConfig
from tests.servers import fake_pd_cluster, serve_in_thread

MODEL = "fake-model"


@pytest.fixture()
def cluster() -> Iterator[Cluster]:
    with fake_pd_cluster(MODEL) as cluster:
        yield cluster


def test_the_router_alone_serves_flips_and_drains_without_a_controller(
        cluster: Cluster) -> None:
    app = create_app(GatewayConfig(served_models=(MODEL,)), cluster)
    assert app.state.controller is None
    with serve_in_thread(app) as url:
        out = httpx.post(url + "/v1/completions",
                         json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        assert out.status_code == 200 and out.json()["choices"][0]["text"]
        refused = httpx.post(url + "/admin/flip", json={"worker": "p0", "to": "decode"})
        assert refused.status_code == 409  # it would empty the prefill pool
        flipped = httpx.post(url + "/admin/flip",
                             json={"worker": "p0", "to": "decode", "force": True})
        assert flipped.json()["outcome"] == "done"
        assert cluster.view("p0").role == Role.DECODE
        drained = httpx.post(url + "/admin/drain", json={"worker": "d0", "wait": True})
        assert drained.json()["drained"] is True
        assert cluster.view("d0").state == WorkerState.DRAINING
        policy = httpx.get(url + "/admin/policy")
        assert policy.status_code == 503 and policy.json()["error"]["code"] == "no_controller"
        control = httpx.get(url + "/admin/control").json()
        assert control["controller"] is None and {w["name"] for w in control["workers"]} == \
            {"p0", "d0"}
        text = httpx.get(url + "/metrics").text
        assert 'fulcrum_role_flips_total{from_role="prefill",outcome="done",to_role="decode"}' \
            in text
        assert "fulcrum_controller_" not in text


def test_the_router_alone_refuses_a_control_policy_it_cannot_run() -> None:
    config = GatewayConfig(served_models=(MODEL,), control=ControlConfig(policy="dopd"))
    with pytest.raises(ValueError, match="needs a controller"):
        create_app(config, Cluster())


def test_the_composed_gateway_runs_and_exposes_the_controller(cluster: Cluster) -> None:
    control = ControlConfig(policy="arrow", interval_s=3600.0, advisory=True)
    app = build_gateway(GatewayConfig(served_models=(MODEL,), control=control), cluster)
    assert isinstance(app.state.controller, Controller)
    assert app.state.controller.flips is app.state.flips
    with serve_in_thread(app) as url:
        policy = httpx.get(url + "/admin/policy").json()
        assert policy["name"] == "arrow" and policy["mode"] == "advisory"
        changed = httpx.put(url + "/admin/policy", json={"name": "dopd", "tpot_s": 0.07})
        assert changed.status_code == 200 and changed.json()["name"] == "dopd"
        assert app.state.dispatcher.driver.slo.tpot_s == 0.07  # routing defends it too
        bad = httpx.put(url + "/admin/policy", json={"name": "nope"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_policy"
        text = httpx.get(url + "/metrics").text
        assert "fulcrum_controller_slo_target_seconds" in text
