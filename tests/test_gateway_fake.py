"""Gateway behaviour against fake workers: dispatch, failures, bad input, metrics.

These run in seconds. The same behaviours on real vLLM workers are in
tests/test_vllm_*.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from benchmarks.fake_worker import create_fake_worker
from core.workers import Role, WorkerState
from deploy.gateway_app import build_gateway
from router.app import GatewayConfig
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from tests.servers import eventually, free_port, serve_in_thread

MODEL = "fake-model"


@dataclass
class Rig:
    url: str
    cluster: Cluster
    prefill: object  # the fake prefill worker's FastAPI app
    decode: object

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0,
                             timeout=30)


def _gateway(cluster: Cluster, **cfg) -> object:
    dispatch = DispatchConfig(connect_timeout_s=1.0, prefill_timeout_s=5.0,
                              stream_idle_timeout_s=5.0, request_timeout_s=10.0)
    return build_gateway(GatewayConfig(served_models=(MODEL,), dispatch=dispatch,
                                       stats_interval_s=0.2, **cfg), cluster)


@pytest.fixture()
def rig() -> Iterator[Rig]:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        with serve_in_thread(_gateway(cluster)) as g_url:
            yield Rig(g_url, cluster, p_app, d_app)


def _in_flight_zero(cluster: Cluster) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(w.in_flight == 0 for w in cluster.snapshot().workers):
            return True
        time.sleep(0.05)
    return False


def test_pd_completion_runs_both_legs_with_one_request_id(rig: Rig) -> None:
    out = rig.client().completions.create(model=MODEL, prompt="hello there world",
                                          max_tokens=5)
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == 3
    p, d = rig.prefill.state.stats, rig.decode.state.stats
    assert p.prefill_legs == 1 and d.remote_decodes == 1 and d.local_requests == 0
    prefill_body, decode_body = p.bodies[0], d.bodies[0]
    assert prefill_body["max_tokens"] == 1 and prefill_body["stream"] is False
    assert prefill_body["kv_transfer_params"]["do_remote_decode"] is True
    assert decode_body["max_tokens"] == 5
    assert decode_body["kv_transfer_params"]["remote_engine_id"] == "P"
    assert p.request_ids == d.request_ids
    assert _in_flight_zero(rig.cluster)


def test_streaming_chat_with_usage_through_openai_client(rig: Rig) -> None:
    stream = rig.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " t0 t1 t2 t3"
    assert chunks[-1].usage.completion_tokens == 4
    assert "stream_options" not in rig.prefill.state.stats.bodies[0]
    assert rig.decode.state.stats.bodies[0]["stream_options"] == {"include_usage": True}


def test_prefill_failure_falls_back_to_local_prefill(rig: Rig) -> None:
    rig.prefill.state.behaviour.fail_prefill_status = 500
    out = rig.client().completions.create(model=MODEL, prompt="abc", max_tokens=3)
    assert out.choices[0].text == " t0 t1 t2"
    d = rig.decode.state.stats
    assert d.local_requests == 1 and d.remote_decodes == 0
    metrics = httpx.get(rig.url + "/metrics").text
    assert 'fulcrum_pd_leg_failures_total{action="local_prefill",leg="prefill"} 1.0' in metrics


def test_failed_kv_load_is_retried_with_local_prefill(rig: Rig) -> None:
    rig.decode.state.behaviour.fail_kv_load_status = 500
    out = rig.client().completions.create(model=MODEL, prompt="abc", max_tokens=2)
    assert out.usage.completion_tokens == 2
    d = rig.decode.state.stats
    assert d.remote_decodes == 1 and d.local_requests == 1


def test_dead_decode_worker_is_skipped() -> None:
    p_app = create_fake_worker("P", MODEL)
    with serve_in_thread(p_app) as p_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("dead", f"http://127.0.0.1:{free_port()}", Role.DECODE, WorkerState.READY)
        with serve_in_thread(_gateway(cluster)) as g_url:
            client = openai.OpenAI(base_url=g_url + "/v1", api_key="x", max_retries=0)
            out = client.completions.create(model=MODEL, prompt="abc", max_tokens=2)
    assert out.usage.completion_tokens == 2
    assert p_app.state.stats.local_requests == 1  # the prefill worker decoded it itself


def test_worker_dying_mid_stream_moves_the_stream_to_another_worker(rig: Rig) -> None:
    rig.decode.state.behaviour.die_after_tokens = 3
    stream = rig.client().completions.create(model=MODEL, prompt="abc", max_tokens=10,
                                             stream=True)
    got = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(got) == "".join(f" t{i}" for i in range(10))  # continued on p0
    assert rig.prefill.state.stats.local_requests == 1
    assert _in_flight_zero(rig.cluster)


def test_worker_dying_mid_stream_with_nowhere_to_go_gives_an_error_event(rig: Rig) -> None:
    rig.decode.state.behaviour.die_after_tokens = 3
    rig.cluster.set_healthy("p0", False)  # no other worker can take the stream
    stream = rig.client().completions.create(model=MODEL, prompt="abc", max_tokens=10,
                                             stream=True)
    got = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in stream:
            got.append(chunk.choices[0].text)
    assert got == [" t0", " t1", " t2"]
    assert _in_flight_zero(rig.cluster)


def test_client_disconnect_aborts_the_worker_request(rig: Rig) -> None:
    rig.decode.state.behaviour.token_delay_s = 0.05
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 1000, "stream": True}
    with httpx.stream("POST", rig.url + "/v1/completions", json=body, timeout=10) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data:")
    deadline = time.monotonic() + 5
    while rig.decode.state.stats.aborted == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rig.decode.state.stats.aborted == 1
    assert _in_flight_zero(rig.cluster)


@pytest.mark.parametrize(("payload", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": MODEL}).encode(), 400, "prompt"),
    (json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": MODEL, "prompt": "x", "temperature": -1}).encode(), 400,
     "temperature"),
    (json.dumps({"model": MODEL, "prompt": "word " * 5000}).encode(), 400, None),
])
def test_bad_input_gets_openai_style_4xx(rig: Rig, payload: bytes, status: int,
                                         param: str | None) -> None:
    resp = httpx.post(rig.url + "/v1/completions", content=payload,
                      headers={"content-type": "application/json"})
    assert resp.status_code == status
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    assert _in_flight_zero(rig.cluster)


def test_chat_without_messages_is_rejected(rig: Rig) -> None:
    resp = httpx.post(rig.url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"


def test_no_ready_worker_is_503(rig: Rig) -> None:
    for name in rig.cluster.names():
        rig.cluster.set_state(name, WorkerState.DEAD)
    resp = httpx.post(rig.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_ready_worker"
    assert httpx.get(rig.url + "/health").status_code == 503


def test_models_health_and_metrics(rig: Rig) -> None:
    assert [m["id"] for m in httpx.get(rig.url + "/v1/models").json()["data"]] == [MODEL]
    assert httpx.get(rig.url + "/health").json()["ready_workers"] == 2
    rig.client().completions.create(model=MODEL, prompt="x", max_tokens=2, stream=False)
    text = httpx.get(rig.url + "/metrics").text
    assert 'fulcrum_requests_total{route="/v1/completions",status="200"} 1.0' in text
    assert 'fulcrum_worker_role{role="prefill",state="ready",worker="p0"} 1.0' in text
    assert 'fulcrum_dispatch_total{mode="pd"} 1.0' in text


def test_admin_token_is_enforced() -> None:
    cluster = Cluster()
    with serve_in_thread(_gateway(cluster, admin_token="s3cret")) as url:
        assert httpx.get(url + "/admin/workers").status_code == 401
        ok = httpx.get(url + "/admin/workers", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["workers"] == []
    with serve_in_thread(_gateway(cluster, admin_open=False)) as url:
        assert httpx.get(url + "/admin/workers").status_code == 403


@pytest.mark.parametrize("stream", [False, True])
def test_gateway_feeds_learning_policies_and_leaks_no_state(stream: bool) -> None:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        for policy_name in ("arrow", "ares"):
            cluster = Cluster()
            cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
            cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
            app = _gateway(cluster, policy=policy_name)
            with serve_in_thread(app) as g_url:
                client = openai.OpenAI(base_url=g_url + "/v1", api_key="x", max_retries=0)
                for i in range(4):
                    out = client.completions.create(model=MODEL, prompt="a b c " * (i + 1),
                                                    max_tokens=40, stream=stream)
                    if stream:
                        list(out)
                policy = app.state.dispatcher.policy
                if policy_name == "arrow":
                    assert policy.models.prefill("p0").samples == 4
                    if stream:
                        assert policy.models.decode("d0").samples == 4
                else:
                    d_app.state.behaviour.token_delay_s = 0.02
                    live = client.completions.create(model=MODEL, prompt="x y", max_tokens=40,
                                                     stream=True)
                    next(iter(live))
                    assert sum(len(v) for v in policy.residents().values()) == 1
                    list(live)
                    d_app.state.behaviour.token_delay_s = 0.0
                    assert _in_flight_zero(cluster)
                    assert policy.residents() == {}  # every finished request forgotten


def test_stream_without_usage_hides_it_but_gateway_still_counts_tokens(rig: Rig) -> None:
    body = {"model": MODEL, "prompt": "a b", "max_tokens": 7, "stream": True}
    with httpx.stream("POST", rig.url + "/v1/completions", json=body, timeout=10) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    assert not any('"usage"' in e for e in events)
    assert rig.decode.state.stats.bodies[-1]["stream_options"] == {"include_usage": True}
    text = httpx.get(rig.url + "/metrics").text
    assert "fulcrum_completion_tokens_total 7.0" in text


def test_request_mix_windows_recent_requests() -> None:
    from router.request_mix import RequestMix

    now = [0.0]
    mix = RequestMix(horizon_s=100, clock=lambda: now[0])
    assert mix.means(10) == (None, None, 0)
    mix.record(1000, 2)
    now[0] = 20.0
    mix.record(10, 200)
    mix.record(30, 100)
    assert mix.means(10) == (20.0, 150.0, 2)
    assert mix.means(60) == (1040 / 3, 302 / 3, 3)
    now[0] = 500.0
    assert mix.means(1000) == (None, None, 0)  # past the horizon, forgotten


def test_leg_latencies_window_per_worker() -> None:
    from router.request_mix import LegLatencies

    now = [0.0]
    legs = LegLatencies(horizon_s=100, clock=lambda: now[0])
    assert legs.quantiles(10) == {}
    legs.record("p0", 5.0)
    now[0] = 20.0
    for s in (0.1, 0.2, 0.3):
        legs.record("p0", s)
    legs.record("p1", 0.4)
    assert legs.quantiles(10, q=0.5) == {"p0": (0.2, 3), "p1": (0.4, 1)}
    assert legs.quantiles(60, q=1.0)["p0"] == (5.0, 4)
    now[0] = 500.0
    assert legs.quantiles(1000) == {}  # past the horizon, forgotten


def test_gateway_times_each_prefill_leg_from_the_request_s_arrival() -> None:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    p_app.state.behaviour.prefill_delay_s = 0.05
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        app = _gateway(cluster)
        with serve_in_thread(app) as g_url:
            client = openai.OpenAI(base_url=g_url + "/v1", api_key="x", max_retries=0)
            for stream in (False, True, False):
                out = client.completions.create(model=MODEL, prompt="a b c", max_tokens=4,
                                                stream=stream)
                if stream:
                    list(out)
            legs = app.state.request_mix.prefill_legs
            p90, n = legs.quantiles(60)["p0"]
            assert n == 3 and 0.05 <= p90 < 5.0
            p_app.state.behaviour.fail_prefill_status = 500  # decoded locally: no leg
            client.completions.create(model=MODEL, prompt="a b c", max_tokens=4)
            assert legs.quantiles(60)["p0"][1] == 3 and "d0" not in legs.quantiles(60)


def test_live_stream_migrates_to_another_worker_without_a_break() -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    d0.state.behaviour.token_delay_s = 0.15  # the stream outlasts five admin calls on a busy host
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.DECODE, WorkerState.DRAINING)  # not picked at first
        with serve_in_thread(_gateway(cluster)) as url:
            body = {"model": MODEL, "prompt": "one two three", "max_tokens": 30,
                    "stream": True, "stream_options": {"include_usage": True}}
            texts, usage, ids = [], None, set()
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20,
                              headers={"X-Request-Id": "mig-1"}) as resp:
                assert resp.headers["x-request-id"] == "mig-1"  # the client's, echoed
                sid = resp.headers["x-fulcrum-request-id"]  # the gateway's own key
                for line in resp.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    ids.add(chunk["id"])
                    assert "token_ids" not in str(chunk)  # the client did not ask for ids
                    if chunk["choices"]:
                        texts.append(chunk["choices"][0]["text"])
                    usage = chunk.get("usage") or usage
                    if len(texts) == 5:
                        listed = httpx.get(url + "/admin/streams").json()["streams"]
                        assert listed[0]["request_id"] == sid and listed[0]["migratable"]
                        assert listed[0]["client_request_id"] == "mig-1"
                        assert httpx.post(url + "/admin/migrate", json={
                            "request_id": "mig-1", "to": "d1"}).status_code == 404
                        assert listed[0]["why_not_migratable"] is None
                        bad = httpx.post(url + "/admin/migrate",
                                         json={"request_id": sid, "to": "d1"})
                        assert bad.status_code == 409  # d1 is draining, not ready
                        cluster.set_state("d1", WorkerState.READY)
                        moved = httpx.post(url + "/admin/migrate",
                                           json={"request_id": sid, "to": "d1"})
                        assert moved.status_code == 200, moved.text
            assert "".join(texts) == "".join(f" t{i}" for i in range(30))
            assert len(ids) == 1  # one stream id from start to end
            assert usage == {"prompt_tokens": 3, "completion_tokens": 30, "total_tokens": 33}
            assert eventually(lambda: d0.state.stats.aborted == 1)  # it notices the close
            continued = d1.state.stats.bodies[-1]
            assert continued["prompt"][:3] == [0, 1, 2] and continued["max_tokens"] < 30
            assert httpx.post(url + "/admin/migrate", json={"request_id": sid, "to": "d0"}
                              ).status_code == 404
            assert 'fulcrum_stream_migrations_total 1.0' in httpx.get(url + "/metrics").text
            assert _in_flight_zero(cluster)


def test_planned_migration_moves_the_stream_after_the_asked_tokens() -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    d0.state.behaviour.token_delay_s = 0.04  # the stream must outlast the move on a busy host
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.PREFILL, WorkerState.READY)  # a target, not a decoder
        with serve_in_thread(_gateway(cluster)) as url:
            planned = httpx.post(url + "/admin/migrate", json={
                "request_id": "plan-1", "to": "d1", "after_tokens": 7, "planned": True})
            assert planned.status_code == 200 and planned.json()["planned"] is True
            assert httpx.post(url + "/admin/migrate", json={
                "request_id": "plan-2", "to": "nope", "planned": True}).status_code == 409
            body = {"model": MODEL, "prompt": "one two", "max_tokens": 20, "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20,
                              headers={"X-Request-Id": "plan-1"}) as resp:
                text = "".join(json.loads(line[6:])["choices"][0]["text"]
                               for line in resp.iter_lines()
                               if line.startswith("data: {") and '"choices":[{' in line)
            assert text == "".join(f" t{i}" for i in range(20))
            continued = d1.state.stats.bodies[-1]
            moved_after = 20 - continued["max_tokens"]
            assert 7 <= moved_after < 20  # not before the asked point, and before the end
            assert continued["prompt"] == [0, 1] + [1000 + i for i in range(moved_after)]
            assert eventually(lambda: d0.state.stats.aborted == 1)  # it notices the close
            assert 'fulcrum_stream_migrations_total 1.0' in httpx.get(url + "/metrics").text
            assert _in_flight_zero(cluster)


def test_ares_rebalancer_moves_a_stream_off_the_loaded_decoder() -> None:
    import concurrent.futures as cf

    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    d0.state.behaviour.token_delay_s = 0.04
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.DECODE, WorkerState.DRAINING)  # everything lands on d0
        app = _gateway(cluster, policy="ares", rebalance_interval_s=0.3)
        with serve_in_thread(app) as url:
            def stream(i: int) -> str:
                body = {"model": MODEL, "prompt": f"tell me a long story {i}",
                        "max_tokens": 300, "stream": True}
                with httpx.stream("POST", url + "/v1/completions", json=body,
                                  timeout=60) as resp:
                    return "".join(json.loads(line[6:])["choices"][0]["text"]
                                   for line in resp.iter_lines()
                                   if line.startswith("data: {"))

            with cf.ThreadPoolExecutor(3) as pool:
                futures = [pool.submit(stream, i) for i in range(3)]
                time.sleep(1.0)
                cluster.set_state("d1", WorkerState.READY)  # an idle decoder appears
                texts = [f.result() for f in futures]
        assert texts == ["".join(f" t{i}" for i in range(300))] * 3  # nothing lost or doubled
        assert d1.state.stats.request_ids, "the rebalancer moved nothing"
        assert eventually(lambda: d0.state.stats.aborted >= 1)  # it notices the close
        assert _in_flight_zero(cluster)


@pytest.mark.parametrize("want_ids", [False, True])
def test_chat_stream_migrates_as_a_completion_and_reads_as_one_chat_stream(
        want_ids: bool) -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    d0.state.behaviour.token_delay_s = 0.04
    d0.state.behaviour.held_back_tokens = (6, 7)  # mid-character: no move after these
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.PREFILL, WorkerState.READY)  # a target, not a decoder
        with serve_in_thread(_gateway(cluster)) as url:
            assert httpx.post(url + "/admin/migrate", json={
                "request_id": "chat-1", "to": "d1", "after_tokens": 7, "planned": True,
            }).status_code == 200
            body = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}],
                    "max_completion_tokens": 20, "stream": True, "min_tokens": 15,
                    "stream_options": {"include_usage": True}}
            if want_ids:
                body["return_token_ids"] = True
            chunks = []
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=20,
                              headers={"X-Request-Id": "chat-1"}) as resp:
                sid = resp.headers["x-fulcrum-request-id"]
                chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                          if line.startswith("data: {")]
            assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
            assert len({c["id"] for c in chunks}) == 1 and {c["model"] for c in chunks} == {MODEL}
            choices = [c["choices"][0] for c in chunks if c["choices"]]
            assert "".join(ch["delta"]["content"] for ch in choices) == \
                "".join(f" t{i}" for i in range(20))
            assert all("text" not in ch for ch in choices)
            assert [ch["finish_reason"] for ch in choices] == [None] * 19 + ["length"]
            assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 20,
                                           "total_tokens": 23}
            ids = [t for ch in choices for t in ch.get("token_ids") or []]
            prompt_ids = [c["prompt_token_ids"] for c in chunks if c.get("prompt_token_ids")]
            if want_ids:
                assert ids == [1000 + i for i in range(20)] and prompt_ids == [[0, 1, 2]]
            else:
                assert ids == [] and prompt_ids == []
            continued = d1.state.stats.bodies[-1]
            moved_after = 20 - continued["max_tokens"]
            assert 9 <= moved_after < 20  # asked after 7; tokens 7 and 8 ended mid-text
            assert continued["prompt"] == [0, 1, 2] + [1000 + i for i in range(moved_after)]
            assert "messages" not in continued and "max_completion_tokens" not in continued
            assert continued["min_tokens"] == 15 - moved_after
            assert d1.state.stats.request_ids[-1] == f"{sid}-m1"
            assert eventually(lambda: d0.state.stats.aborted == 1)  # it notices the close
            assert 'fulcrum_stream_migrations_total 1.0' in httpx.get(url + "/metrics").text
            assert _in_flight_zero(cluster)


@pytest.mark.parametrize(("extra", "blocker"), [
    ({}, None),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs, top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "text"}}, None),
    ({"n": 2}, "n > 1"),
    ({"seed": 7}, "seed"),
    ({"seed": 7, "temperature": 0}, None),
    ({"presence_penalty": 0.5, "frequency_penalty": 0.0}, "presence_penalty"),
    ({"max_completion_tokens": None}, "no max_tokens/max_completion_tokens"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "non-text message content"),
])
def test_which_chat_streams_can_migrate(extra: dict, blocker: str | None) -> None:
    from router.relay import migration_blocker
    from router.validation import parse_request

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "max_completion_tokens": 8, **extra}
    req = parse_request("/v1/chat/completions", json.dumps(body).encode(), (MODEL,))
    assert migration_blocker(req) == blocker


@pytest.mark.parametrize(("limits", "expected"), [
    ({"max_completion_tokens": None, "max_tokens": 5}, 5),
    ({"max_completion_tokens": 7, "max_tokens": 5}, 7),
    ({"max_tokens": 3}, 3),
    ({}, None),
])
def test_null_max_completion_tokens_falls_back_to_max_tokens(limits: dict,
                                                             expected: int | None) -> None:
    from router.validation import parse_request

    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **limits}
    req = parse_request("/v1/chat/completions", json.dumps(body).encode(), (MODEL,))
    assert req.max_tokens == expected


def test_a_stream_that_cannot_move_says_why_and_is_refused() -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    d0.state.behaviour.token_delay_s = 0.25  # the stream outlives two admin calls on a busy host
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.PREFILL, WorkerState.READY)
        with serve_in_thread(_gateway(cluster)) as url:
            body = {"model": MODEL, "prompt": "one two", "max_tokens": 10, "stream": True,
                    "echo": True}
            seen = 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20,
                              headers={"X-Request-Id": "echo-1"}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        seen += 1
                    if seen == 2 and line:  # once, at the second event
                        (listed,) = httpx.get(url + "/admin/streams").json()["streams"]
                        assert not listed["migratable"]
                        assert listed["why_not_migratable"] == "echo"
                        refused = httpx.post(url + "/admin/migrate",
                                             json={"request_id": listed["request_id"],
                                                   "to": "d1"})
                        assert refused.status_code == 409
                        assert "echo" in refused.json()["error"]["message"]
            assert seen >= 10  # the refused stream still finished on its own worker
            assert d0.state.stats.aborted == 0
            assert _in_flight_zero(cluster)


def test_engine_timings_the_gateway_asked_for_never_reach_the_client(rig: Rig) -> None:
    """Workers run with per-request metrics for the gateway's own use; clients see vLLM's
    usual bodies, streamed or not."""
    body = {"model": MODEL, "prompt": "one two three", "max_tokens": 4}
    plain = httpx.post(rig.url + "/v1/completions", json=body, timeout=10)
    assert plain.status_code == 200 and "usage" in plain.json()
    assert "metrics" not in plain.json()
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", rig.url + "/v1/completions", json=stream, timeout=10) as resp:
        chunks = [json.loads(line[6:]) for line in resp.iter_lines()
                  if line.startswith("data: {")]
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert not any("metrics" in c for c in chunks)
