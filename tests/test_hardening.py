"""Hostile input, overload, hung workers and authentication, against fake workers.

Every refusal must be an OpenAI-shaped error with the right status, counted in the
gateway's metrics, and the gateway must keep serving afterwards. The hung-worker
behaviour is also proven on real vLLM workers in tests/test_vllm_chaos.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from benchmarks.fake_worker import create_fake_worker
from core.workers import Role, WorkerState
from router.admission import AdmissionConfig
from router.app import GatewayConfig, create_app
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from router.health import BreakerState, HealthConfig, HealthMonitor
from router.limits import client_request_id
from router.security import AuthConfig, host_name, load_api_keys
from tests.servers import serve_in_thread

MODEL = "fake-model"
FAST_HEALTH = HealthConfig(interval_s=0.1, timeout_s=0.3, failures=2, successes=2)


@dataclass
class Rig:
    url: str
    cluster: Cluster
    prefill: object
    decode: object
    app: object

    def post(self, path: str, body: object, **kw) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=20, **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics").text


@contextmanager
def rig(**cfg) -> Iterator[Rig]:
    dispatch = cfg.pop("dispatch", DispatchConfig(connect_timeout_s=1.0, prefill_timeout_s=5.0,
                                                  stream_idle_timeout_s=5.0,
                                                  request_timeout_s=10.0))
    cfg.setdefault("health", HealthConfig(interval_s=0))  # probes off unless a test wants them
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        app = create_app(GatewayConfig(served_models=(MODEL,), dispatch=dispatch,
                                       stats_interval_s=0.2, **cfg), cluster)
        with serve_in_thread(app) as g_url:
            yield Rig(g_url, cluster, p_app, d_app, app)


def _openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text[:300]
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert len(resp.content) < 2000  # never an echo of the input
    return err


def _completion(**extra) -> dict:
    return {"model": MODEL, "prompt": "one two three", "max_tokens": 3, **extra}


def _raw_request(url: str, request: bytes) -> bytes:
    """Send bytes as they are (headers httpx would refuse to encode); return the reply."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    return reply


# -- 1. the admin API ------------------------------------------------------------------
def test_admin_refuses_rebound_hosts_browser_origins_and_non_json_posts() -> None:
    with rig() as r:
        drain = {"worker": "d0", "force": True}
        err = _openai_error(r.post("/admin/drain", drain,
                                   headers={"Host": "rebind.attacker.example"}), 403)
        assert err["code"] == "admin_host_refused"
        err = _openai_error(r.post("/admin/drain", drain,
                                   headers={"Origin": "http://127.0.0.1:9"}), 403)
        assert err["code"] == "admin_origin_refused"
        err = _openai_error(httpx.post(r.url + "/admin/drain", content=json.dumps(drain),
                                       headers={"Content-Type": "text/plain"}), 415)
        assert err["code"] == "unsupported_media_type"
        assert httpx.get(r.url + "/admin/workers", headers={"Host": "evil.example"}
                         ).status_code == 403
        # nothing was drained by any of that; loopback names still work
        assert r.cluster.view("d0").state == WorkerState.READY
        for host in ("127.0.0.1", "localhost", f"localhost:{r.url.rsplit(':', 1)[1]}"):
            assert httpx.get(r.url + "/admin/workers", headers={"Host": host}
                             ).status_code == 200
        assert r.post("/v1/completions", _completion()).status_code == 200


def test_admin_with_a_token_accepts_any_host_but_never_an_origin() -> None:
    with rig(admin_token="s3cret") as r:
        auth = {"Authorization": "Bearer s3cret"}
        assert httpx.get(r.url + "/admin/workers", headers={**auth, "Host": "gw.internal"}
                         ).status_code == 200
        _openai_error(httpx.get(r.url + "/admin/workers", headers={"Host": "gw.internal"}),
                      401)
        _openai_error(httpx.get(r.url + "/admin/workers",
                                headers={**auth, "Origin": "https://x.example"}), 403)


def test_host_names_without_ports() -> None:
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1"
    assert host_name("LOCALHOST") == "localhost"
    assert host_name("localhost.attacker.example:80") == "localhost.attacker.example"


# -- 2. body size --------------------------------------------------------------------
def test_bodies_over_the_limit_get_413_declared_or_streamed() -> None:
    with rig(max_body_mb=0.05) as r:  # 52 KB
        big = _completion(prompt="x " * 40_000)
        err = _openai_error(r.post("/v1/completions", big), 413)
        assert err["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: read until the limit
            yield json.dumps(big).encode()

        err = _openai_error(httpx.post(r.url + "/v1/completions", content=chunks(),
                                       headers={"Content-Type": "application/json"},
                                       timeout=20), 413)
        _openai_error(httpx.post(r.url + "/admin/drain", content=json.dumps(big),
                                 headers={"Content-Type": "application/json"}), 413)
        assert r.prefill.state.stats.bodies == [] and r.decode.state.stats.bodies == []
        assert 'fulcrum_requests_total{route="/v1/completions",status="413"} 2.0' in r.metrics()
        assert r.post("/v1/completions", _completion()).status_code == 200


# -- 3. no 500s ------------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b'{"model": "fake-model", "prompt": "a", "temperature": NaN}',
    b'{"model": "fake-model", "prompt": "a", "temperature": Infinity}',
    b'{"model": "fake-model", "prompt": "a", "top_p": -Infinity}',
    b'{"model": "fake-model", "prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"model": "fake-model", "prompt": "a", "x": ' + b"[" * 100 + b"]" * 100 + b"}",
    b'{"model": "fake-model", "messages": [{"role": "user", "content": '
    + b'{"a": ' * 500 + b"1" + b"}" * 500 + b"}]}",
])
def test_hostile_json_gets_400_and_is_counted(raw: bytes) -> None:
    with rig() as r:
        route = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        resp = httpx.post(r.url + route, content=raw,
                          headers={"Content-Type": "application/json"})
        assert _openai_error(resp, 400)["code"] == "invalid_json"
        assert f'fulcrum_requests_total{{route="{route}",status="400"}} 1.0' in r.metrics()
        assert r.decode.state.stats.bodies == []
        assert r.post("/v1/completions", _completion()).status_code == 200


def test_request_ids_are_the_gateways_own_and_the_clients_is_echoed_safely() -> None:
    with rig() as r:
        body = json.dumps(_completion()).encode()
        reply = _raw_request(r.url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nX-Request-Id: caf\xc3\xa9\xff"
                             b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
                             b"Connection: close\r\n\r\n" + body)
        head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        assert head.startswith("http/1.1 200")
        assert "x-request-id: caf___\r\n" in head + "\r\n"
        huge = r.post("/v1/completions", _completion(), headers={"X-Request-Id": "a" * 1_000_000})
        assert huge.status_code == 200 and huge.headers["x-request-id"] == "a" * 128
        internal = {huge.headers["x-fulcrum-request-id"]}
        same = [r.post("/v1/completions", _completion(), headers={"X-Request-Id": "dup"})
                for _ in range(2)]
        internal |= {resp.headers["x-fulcrum-request-id"] for resp in same}
        assert all(resp.headers["x-request-id"] == "dup" for resp in same)
        assert len(internal) == 3  # three requests, three keys, whatever the clients said
        seen = set(r.decode.state.stats.request_ids)
        assert internal <= seen and all(len(rid) < 64 for rid in seen)


def test_two_live_streams_with_one_client_id_stay_apart() -> None:
    with rig() as r:
        r.decode.state.behaviour.token_delay_s = 0.05
        body = _completion(max_tokens=40, stream=True)
        with httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=20,
                          headers={"X-Request-Id": "same"}) as a, \
                httpx.stream("POST", r.url + "/v1/completions", json=body, timeout=20,
                             headers={"X-Request-Id": "same"}) as b:
            listed = httpx.get(r.url + "/admin/streams").json()["streams"]
            assert {s["request_id"] for s in listed} == {a.headers["x-fulcrum-request-id"],
                                                        b.headers["x-fulcrum-request-id"]}
            assert {s["client_request_id"] for s in listed} == {"same"}
            err = _openai_error(r.post("/admin/migrate", {"request_id": "same", "to": "p0"}),
                                404)
            assert err["code"] == "no_such_stream"
            a.read(), b.read()


def test_client_request_id_sanitizing() -> None:
    assert client_request_id("abc-1_2.3") == "abc-1_2.3"
    assert client_request_id("a b\r\nc") == "a_b__c"
    assert client_request_id("") is None and client_request_id(None) is None
    assert len(client_request_id("é" * 1000)) == 128


def test_unknown_paths_and_methods_are_openai_shaped_and_redirects_stay_relative() -> None:
    with rig() as r:
        err = _openai_error(httpx.get(r.url + "/v1/nope"), 404)
        assert err["type"] == "not_found_error"
        _openai_error(httpx.get(r.url + "/v1/completions"), 405)
        moved = httpx.get(r.url + "/v1/models/?x=1", headers={"Host": "evil.example"})
        assert moved.status_code == 307 and moved.headers["location"] == "/v1/models?x=1"
        _openai_error(httpx.get(r.url + "/v1/nope/"), 404)


def test_long_inputs_are_not_echoed_in_errors() -> None:
    with rig() as r:
        err = _openai_error(r.post("/v1/completions", _completion(model="m" * 1_000_000)), 404)
        assert err["code"] == "model_not_found"
        _openai_error(r.post("/admin/migrate", {"request_id": "x" * 1_000_000, "to": "d0"}), 400)
        _openai_error(r.post("/admin/migrate", {"request_id": 1, "to": ["x" * 100_000]}), 400)


def test_an_unexpected_exception_is_an_openai_500_and_counted() -> None:
    with rig() as r:
        async def broken(*args, **kw):  # noqa: ANN002, ANN003
            raise RuntimeError("/secret/path/in/a/traceback")

        r.app.state.dispatcher.dispatch = broken
        err = _openai_error(r.post("/v1/completions", _completion()), 500)
        assert "/secret" not in json.dumps(err)
        assert 'fulcrum_requests_total{route="/v1/completions",status="500"} 1.0' in r.metrics()


# -- 4. admission control -------------------------------------------------------------------
def _hold_streams(r: Rig, n: int, max_tokens: int = 60) -> list:
    """Open `n` slow streams and return their open responses (close them to finish)."""
    clients = []
    for _ in range(n):
        client = httpx.Client(timeout=20)
        stream = client.stream("POST", r.url + "/v1/completions",
                               json=_completion(max_tokens=max_tokens, stream=True))
        resp = stream.__enter__()
        assert resp.status_code == 200
        clients.append((client, stream))
    return clients


def _release(clients: list) -> None:
    for client, stream in clients:
        stream.__exit__(None, None, None)
        client.close()


def test_gateway_wide_inflight_limit_answers_429_at_once() -> None:
    with rig(admission=AdmissionConfig(max_inflight=2, max_worker_queue=0)) as r:
        r.decode.state.behaviour.token_delay_s = 0.1
        held = _hold_streams(r, 2)
        try:
            resp = r.post("/v1/completions", _completion())
            err = _openai_error(resp, 429)
            assert err["code"] == "gateway_overloaded" and resp.headers["retry-after"] == "1"
            again = r.post("/v1/completions", _completion(), headers={"X-Request-Id": "mine"})
            assert _openai_error(again, 429) == err and again.headers["x-request-id"] == "mine"
            metrics = r.metrics()
            assert 'fulcrum_rejected_total{reason="gateway_full"} 2.0' in metrics
            assert 'fulcrum_requests_total{route="/v1/completions",status="429"} 2.0' in metrics
            assert "fulcrum_gateway_in_flight 2.0" in metrics
        finally:
            _release(held)
        deadline = time.monotonic() + 10
        while "fulcrum_gateway_in_flight 0.0" not in r.metrics():
            assert time.monotonic() < deadline, "stream slots were never given back"
            time.sleep(0.05)
        assert r.post("/v1/completions", _completion()).status_code == 200


def test_a_full_worker_queue_refuses_new_legs() -> None:
    with rig(admission=AdmissionConfig(max_inflight=0, max_worker_queue=1)) as r:
        r.decode.state.behaviour.token_delay_s = 0.1
        r.cluster.remove("p0")  # one worker: its queue is the whole capacity
        held = _hold_streams(r, 1)
        try:
            err = _openai_error(r.post("/v1/completions", _completion()), 429)
            assert err["code"] == "workers_overloaded"
            assert 'fulcrum_rejected_total{reason="workers_full"} 1.0' in r.metrics()
        finally:
            _release(held)
        assert r.post("/v1/completions", _completion()).status_code == 200


# -- 6. hung workers ------------------------------------------------------------------------
def test_breaker_opens_after_consecutive_failures_and_half_opens_on_success() -> None:
    cluster = Cluster()
    cluster.add("w", "http://x", Role.DECODE, WorkerState.READY)
    monitor = HealthMonitor(cluster, HealthConfig(failures=3, successes=2))
    monitor.report_failure("w", "a")
    monitor.report_success("w")  # not consecutive: resets
    monitor.report_failure("w", "a")
    monitor.report_failure("w", "b")
    assert cluster.view("w").routable
    monitor.report_failure("w", "c")
    assert not cluster.view("w").routable and monitor.breaker("w").state == BreakerState.OPEN
    monitor.report_success("w")
    assert cluster.view("w").routable and monitor.breaker("w").state == BreakerState.HALF_OPEN
    monitor.report_failure("w", "again")  # one failure while half-open re-opens it
    assert not cluster.view("w").routable
    monitor.report_success("w")
    monitor.report_success("w")
    assert monitor.breaker("w").state == BreakerState.CLOSED and cluster.view("w").routable
    assert monitor.breaker("w").trips == 2


def _wait_for(predicate, what: str, timeout_s: float = 15.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def test_a_hung_prefill_worker_is_taken_out_and_requests_keep_succeeding() -> None:
    slow_prefill = DispatchConfig(connect_timeout_s=1.0, prefill_timeout_s=600.0,
                                  stream_idle_timeout_s=5.0, request_timeout_s=10.0)
    with rig(health=FAST_HEALTH, dispatch=slow_prefill) as r:
        assert httpx.get(r.url + "/health").json()["status"] == "ok"
        r.prefill.state.behaviour.hang = True  # like SIGSTOP: accepts, never answers
        # A request already on the hung worker's prefill leg is abandoned when the breaker
        # opens (the leg's own timeout is 600 s; the client gives up after 20 s).
        out = r.post("/v1/completions", _completion())
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        _wait_for(lambda: not r.cluster.view("p0").routable, "p0 out of rotation")
        health = httpx.get(r.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["breakers"]["p0"]["breaker"] == "open"
        for _ in range(3):  # served whole by the decode worker meanwhile
            assert r.post("/v1/completions", _completion()).status_code == 200
        assert "fulcrum_worker_breaker_open{worker=\"p0\"} 1.0" in r.metrics()
        r.prefill.state.behaviour.hang = False  # SIGCONT
        _wait_for(lambda: r.cluster.view("p0").routable, "p0 back in rotation")
        legs = r.prefill.state.stats.prefill_legs
        assert r.post("/v1/completions", _completion()).status_code == 200
        assert r.prefill.state.stats.prefill_legs == legs + 1  # P/D again


def test_every_worker_hung_means_not_ready_but_alive() -> None:
    with rig(health=FAST_HEALTH) as r:
        r.prefill.state.behaviour.hang = r.decode.state.behaviour.hang = True
        _wait_for(lambda: not any(w.routable for w in r.cluster.snapshot().workers),
                  "both workers out")
        assert httpx.get(r.url + "/health").status_code == 503
        assert httpx.get(r.url + "/readyz").json()["status"] == "unavailable"
        assert httpx.get(r.url + "/livez").status_code == 200
        err = _openai_error(r.post("/v1/completions", _completion()), 503)
        assert err["code"] == "no_ready_worker"
        r.prefill.state.behaviour.hang = r.decode.state.behaviour.hang = False
        _wait_for(lambda: httpx.get(r.url + "/health").json()["status"] == "ok", "recovery")


def test_a_non_streamed_answer_is_bounded_by_one_deadline() -> None:
    quick = DispatchConfig(connect_timeout_s=1.0, prefill_timeout_s=5.0,
                           stream_idle_timeout_s=5.0, request_timeout_s=1.0, decode_attempts=1)
    with rig(dispatch=quick) as r:
        r.decode.state.behaviour.token_delay_s = 0.5  # 3 tokens: 1.5 s > 1 s
        err = _openai_error(r.post("/v1/completions", _completion()), 502)
        assert err["code"] == "upstream_unavailable"


# -- 7. API keys ---------------------------------------------------------------------------
def test_api_keys_guard_v1_and_can_be_forwarded(tmp_path) -> None:  # noqa: ANN001
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk2\n\nk3\n")
    auth = AuthConfig(api_keys=load_api_keys(["k1"], [str(keys)]), forward_authorization=True)
    assert auth.api_keys == ("k1", "k2", "k3")
    with rig(auth=auth) as r:
        err = _openai_error(r.post("/v1/completions", _completion()), 401)
        assert err["code"] == "invalid_api_key"
        _openai_error(r.post("/v1/completions", _completion(),
                             headers={"Authorization": "Bearer nope"}), 401)
        _openai_error(httpx.get(r.url + "/v1/models"), 401)
        ok = r.post("/v1/completions", _completion(), headers={"Authorization": "Bearer k3"})
        assert ok.status_code == 200
        assert r.decode.state.stats.authorizations == ["Bearer k3"]
        assert r.prefill.state.stats.authorizations == ["Bearer k3"]
        assert httpx.get(r.url + "/v1/models", headers={"Authorization": "Bearer k1"}
                         ).status_code == 200
        assert 'status="401"} 2.0' in r.metrics()


def test_a_configured_worker_key_reaches_workers_that_require_one() -> None:
    with rig(auth=AuthConfig(worker_api_key="wk")) as r:
        r.prefill.state.behaviour.api_key = r.decode.state.behaviour.api_key = "wk"
        out = r.post("/v1/completions", _completion(),
                     headers={"Authorization": "Bearer client-key"})
        assert out.status_code == 200
        assert r.decode.state.stats.authorizations == ["Bearer wk"]
        assert r.decode.state.stats.remote_decodes == 1  # the prefill leg got through too


# -- 8. small ones ---------------------------------------------------------------------------
def test_chat_chunks_carry_no_token_id_keys_unless_asked() -> None:
    with rig() as r:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5, "stream": True}
        with httpx.stream("POST", r.url + "/v1/chat/completions", json=body,
                          timeout=20) as resp:
            events = [line for line in resp.iter_lines() if line.startswith("data: {")]
        assert r.decode.state.stats.bodies[-1]["return_token_ids"] is True  # we asked
        assert len(events) == 5 and not any("token_ids" in e for e in events)


def test_dispatch_counts_pd_only_when_the_decode_used_the_kv() -> None:
    with rig() as r:
        assert r.post("/v1/completions", _completion()).status_code == 200
        r.decode.state.behaviour.fail_kv_load_status = 500
        assert r.post("/v1/completions", _completion()).status_code == 200
        metrics = r.metrics()
        assert 'fulcrum_dispatch_total{mode="pd"} 1.0' in metrics
        assert 'fulcrum_dispatch_total{mode="local"} 1.0' in metrics


def test_the_gateway_survives_a_burst_of_hostile_requests() -> None:
    hostile = [b"{", b"[]", b'{"model": 1}', b"\xff\xfe", b'{"model":"fake-model","prompt":'
               b'"a","max_tokens":-1}', b'{"model":"fake-model","prompt":"a","n":1e400}']
    with rig() as r, cf.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda raw: httpx.post(r.url + "/v1/completions", content=raw, timeout=20,
                                   headers={"Content-Type": "application/json"}).status_code,
            hostile * 5))
        assert set(statuses) == {400}
        assert r.post("/v1/completions", _completion()).status_code == 200


def test_a_slow_probe_does_not_count_while_the_worker_streams() -> None:
    import asyncio

    cluster = Cluster()
    cluster.add("w", "http://x", Role.DECODE, WorkerState.READY)
    monitor = HealthMonitor(cluster, HealthConfig(timeout_s=5.0, failures=1))

    class SlowClient:
        is_closed = False

        async def get(self, url: str, timeout: float) -> None:
            raise httpx.ReadTimeout("slow")

    monitor.saw_progress("w")  # a stream's bytes just arrived from it
    assert asyncio.run(monitor.probe("w", "http://x", SlowClient())) is False
    assert cluster.view("w").routable  # loaded, not hung
    monitor.last_progress["w"] -= 10  # nothing for a while: now the timeout counts
    asyncio.run(monitor.probe("w", "http://x", SlowClient()))
    assert not cluster.view("w").routable
