"""Workers joining and leaving a live gateway (fake workers; the same on real vLLM is in
tests/test_vllm_registry.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from benchmarks.fake_worker import create_fake_worker
from core.workers import Role, WorkerState
from deploy import cli
from deploy.local_cluster import ClusterOptions, PortsBusy, check_ports_free, worker_specs
from deploy.options import EXIT_FAILED
from deploy.ports import kv_port_for
from router.app import GatewayConfig, create_app
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from router.worker_registry import JoinConfig, KVEndpoint, parse_kv_endpoint
from tests.servers import free_port, serve_in_thread

MODEL = "fake-model"


@dataclass
class Rig:
    url: str
    cluster: Cluster
    gateway: object

    def admin(self, method: str, path: str, **kw: object) -> httpx.Response:
        return httpx.request(method, self.url + path, timeout=30, **kw)

    def wait_state(self, name: str, state: WorkerState, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if name in self.cluster.names() and self.cluster.view(name).state == state:
                return
            time.sleep(0.02)
        raise AssertionError(f"{name} not {state}: {self.cluster.snapshot()}")


@pytest.fixture()
def rig() -> Iterator[Rig]:
    p_app = create_fake_worker("P", MODEL)
    with serve_in_thread(p_app) as p_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        dispatch = DispatchConfig(connect_timeout_s=1.0, prefill_timeout_s=5.0,
                                  stream_idle_timeout_s=5.0, request_timeout_s=20.0)
        app = create_app(GatewayConfig(served_models=(MODEL,), dispatch=dispatch,
                                       stats_interval_s=0.2), cluster)
        app.state.registry.config = JoinConfig(probe_interval_s=0.05, join_timeout_s=5,
                                               kv_grace_s=0.05)
        with serve_in_thread(app) as g_url:
            yield Rig(g_url, cluster, app)


def test_kv_endpoint_is_read_from_worker_metrics() -> None:
    text = ('# TYPE vllm:fulcrum_kv_endpoint_info gauge\n'
            'vllm:fulcrum_kv_endpoint_info{engine="0",host="10.1.2.3",port="9101"} 1.0\n'
            'vllm:num_requests_running{engine="0"} 0\n')
    assert parse_kv_endpoint(text) == KVEndpoint("10.1.2.3", 9101)
    assert parse_kv_endpoint('vllm:num_requests_running{engine="0"} 0\n') is None


def test_worker_added_at_runtime_joins_once_healthy_and_serves(rig: Rig) -> None:
    d_app = create_fake_worker("D", MODEL)
    d_app.state.behaviour.healthy = False
    d_app.state.behaviour.kv_endpoint = ("127.0.0.1", 9555)
    with serve_in_thread(d_app) as d_url:
        resp = rig.admin("POST", "/admin/workers", json={"url": d_url + "/", "role": "decode"})
        assert resp.status_code == 202, resp.text
        name = resp.json()["name"]
        assert name == "w0" and resp.json()["state"] == "starting"
        time.sleep(0.3)  # several probe intervals: unhealthy, so still starting, no traffic
        assert rig.cluster.view(name).state == WorkerState.STARTING
        d_app.state.behaviour.healthy = True
        rig.wait_state(name, WorkerState.READY, timeout_s=2)
        listing = rig.admin("GET", "/admin/registry").json()["workers"]
        row = next(w for w in listing if w["name"] == name)
        assert row["kv_endpoint"] == "127.0.0.1:9555" and row["source"] == "admin"
        out = httpx.post(rig.url + "/v1/completions", timeout=10, json={
            "model": MODEL, "prompt": "one two three", "max_tokens": 4}).json()
        assert out["usage"]["completion_tokens"] == 4
        assert d_app.state.stats.remote_decodes == 1  # P/D through the new worker


def test_add_with_wait_answers_once_ready(rig: Rig) -> None:
    d_app = create_fake_worker("D", MODEL)
    with serve_in_thread(d_app) as d_url:
        resp = rig.admin("POST", "/admin/workers",
                         json={"url": d_url, "role": "decode", "name": "d-extra", "wait": True})
        assert resp.status_code == 201 and resp.json()["state"] == "ready"
        assert rig.cluster.view("d-extra").state == WorkerState.READY


@pytest.mark.parametrize(("body", "status"), [
    ({"url": "not a url", "role": "decode"}, 400),
    ({"url": "ftp://h:1", "role": "decode"}, 400),
    ({"url": "http://127.0.0.1:99999", "role": "decode"}, 400),
    ({"url": "http://127.0.0.1:1", "role": "sideways"}, 400),
    ({"url": "http://127.0.0.1:1", "role": "decode", "name": "bad name!"}, 400),
    ({"url": "http://127.0.0.1:1", "role": "decode", "name": "p0"}, 409),
    ({"role": "decode"}, 400),
])
def test_bad_additions_get_openai_errors(rig: Rig, body: dict, status: int) -> None:
    resp = rig.admin("POST", "/admin/workers", json=body)
    assert resp.status_code == status, resp.text
    assert "message" in resp.json()["error"]
    assert rig.cluster.names() == ["p0"]


def test_same_url_twice_is_refused(rig: Rig) -> None:
    url = rig.cluster.view("p0").url
    resp = rig.admin("POST", "/admin/workers", json={"url": url, "role": "decode"})
    assert resp.status_code == 409 and "p0" in resp.json()["error"]["message"]


def test_a_worker_claiming_anothers_kv_endpoint_does_not_join(rig: Rig) -> None:
    a, b = create_fake_worker("A", MODEL), create_fake_worker("B", MODEL)
    a.state.behaviour.kv_endpoint = b.state.behaviour.kv_endpoint = ("127.0.0.1", 9777)
    with serve_in_thread(a) as a_url, serve_in_thread(b) as b_url:
        assert rig.admin("POST", "/admin/workers", json={
            "url": a_url, "role": "decode", "wait": True}).status_code == 201
        resp = rig.admin("POST", "/admin/workers", json={
            "url": b_url, "role": "decode", "wait": True})
        assert resp.status_code == 502
        assert "9777" in resp.json()["error"]["message"]
        name = next(n for n in rig.cluster.names() if rig.cluster.view(n).url == b_url)
        assert rig.cluster.view(name).state == WorkerState.DEAD  # never routed to
        assert rig.admin("DELETE", f"/admin/workers/{name}").status_code == 200
        assert name not in rig.cluster.names()


def test_a_worker_serving_another_model_does_not_join(rig: Rig) -> None:
    other = create_fake_worker("X", "another-model")
    with serve_in_thread(other) as url:
        resp = rig.admin("POST", "/admin/workers",
                         json={"url": url, "role": "decode", "wait": True})
    assert resp.status_code == 502 and "fake-model" in resp.json()["error"]["message"]


def test_remove_drains_first_and_loses_no_request(rig: Rig) -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    for app in (d0, d1):
        app.state.behaviour.token_delay_s = 0.03
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        for name, url in (("d0", d0_url), ("d1", d1_url)):
            assert rig.admin("POST", "/admin/workers", json={
                "url": url, "role": "decode", "name": name, "wait": True}).status_code == 201
        results: list[tuple[int, int]] = []

        def stream() -> None:
            tokens = 0
            with httpx.stream("POST", rig.url + "/v1/completions", timeout=30, json={
                    "model": MODEL, "prompt": "a b c", "max_tokens": 30,
                    "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        tokens += len(json.loads(line[6:])["choices"][0]["text"].split())
                results.append((resp.status_code, tokens))

        threads = [threading.Thread(target=stream) for _ in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while rig.cluster.view("d0").in_flight_decode == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        gone = rig.admin("DELETE", "/admin/workers/d0")
        for t in threads:
            t.join()
        assert gone.status_code == 200, gone.text
        assert gone.json()["in_flight_at_start"] >= 1  # it really had work to drain
        assert "d0" not in rig.cluster.names()
        assert len(results) == 6 and all(r == (200, 30) for r in results), results
        before = d0.state.stats.remote_decodes + d0.state.stats.local_requests
        for _ in range(3):  # new requests only go to the remaining decoder
            assert httpx.post(rig.url + "/v1/completions", timeout=10, json={
                "model": MODEL, "prompt": "x", "max_tokens": 2}).status_code == 200
        assert d0.state.stats.remote_decodes + d0.state.stats.local_requests == before


def test_remove_refuses_to_empty_a_pool_and_unknown_names(rig: Rig) -> None:
    resp = rig.admin("DELETE", "/admin/workers/p0")
    assert resp.status_code == 409 and "prefill pool" in resp.json()["error"]["message"]
    assert rig.cluster.view("p0").state == WorkerState.READY
    assert rig.admin("DELETE", "/admin/workers/nope").status_code == 404
    assert rig.admin("DELETE", "/admin/workers/p0", params={"force": "true"}
                     ).status_code == 200
    assert rig.cluster.names() == []


def test_cli_worker_add_list_remove(rig: Rig, capsys: pytest.CaptureFixture) -> None:
    d_app = create_fake_worker("D", MODEL)
    d_app.state.behaviour.kv_endpoint = ("127.0.0.1", 9321)
    with serve_in_thread(d_app) as d_url:
        assert cli.main(["worker", "add", d_url, "--role", "decode", "--name", "dd",
                         "--wait", "--url", rig.url]) == 0
        assert "dd: " in capsys.readouterr().out
        assert cli.main(["worker", "list", "--json", "--url", rig.url]) == 0
        rows = {w["name"]: w for w in json.loads(capsys.readouterr().out)["workers"]}
        assert rows["dd"]["kv_endpoint"] == "127.0.0.1:9321" and rows["dd"]["state"] == "ready"
        assert cli.main(["worker", "remove", "dd", "--url", rig.url]) == EXIT_FAILED  # last decoder
        assert "decode pool" in capsys.readouterr().err
        assert cli.main(["worker", "remove", "dd", "--force", "--url", rig.url]) == 0
        assert "dd removed" in capsys.readouterr().out
        assert cli.main(["worker", "remove", "dd", "--url", rig.url]) == EXIT_FAILED
        assert "404" in capsys.readouterr().err


def test_worker_args_derive_the_kv_port_and_advertise_the_host(
        capsys: pytest.CaptureFixture) -> None:
    port = free_port()
    assert cli.main(["worker-args", "--model", "tiny", "--port", str(port), "--host", "0.0.0.0",
                     "--advertise-host", "10.0.0.9", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    argv = out["argv"]
    assert argv[argv.index("--port") + 1] == str(port)
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_extra_config"]["port"] == kv_port_for(port) == out["kv_port"]
    assert kv["kv_connector_extra_config"]["host"] == "10.0.0.9"
    assert out["env"]["PYTHONPATH"]  # vLLM must import our connector module


def test_local_cluster_ports_derive_from_port_and_are_checked() -> None:
    opts = ClusterOptions(model="m", served_model_name="m", workers=2, port=free_port())
    specs = worker_specs(opts)
    kv_ports = [s.kv.kv_transfer_config["kv_connector_extra_config"]["port"] for s in specs]
    assert kv_ports == [kv_port_for(s.port) for s in specs]
    check_ports_free(opts, specs)  # nothing listens there
    with serve_in_thread(create_fake_worker()) as url:  # something now holds a worker port
        taken = int(url.rsplit(":", 1)[1])
        busy = ClusterOptions(model="m", served_model_name="m", workers=2,
                              port=taken - 2, worker_host="127.0.0.1")
        with pytest.raises(PortsBusy, match=str(taken)):
            check_ports_free(busy, worker_specs(busy))


def test_removing_an_owned_worker_stops_it_through_its_owner(rig: Rig) -> None:
    stopped: list[str] = []

    class Owner:
        async def stop_worker(self, name: str) -> None:
            stopped.append(name)

    d_app = create_fake_worker("D", MODEL)
    with serve_in_thread(d_app) as d_url:
        rig.cluster.add("own", d_url, Role.DECODE, WorkerState.READY)
        rig.gateway.state.registry.adopt("own", source="local", owner=Owner())
        resp = rig.admin("DELETE", "/admin/workers/own", params={"force": "true"})
        assert resp.status_code == 200 and stopped == ["own"]
