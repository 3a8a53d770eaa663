"""Streams whose worker hangs, stalls or dies mid-stream continue on another worker.

Fake workers (the same behaviour on real vLLM workers under SIGSTOP is in
tests/test_vllm_chaos.py). The stream idle timeout is 300 s and every client gives up
after 20 s, so a stream that waited for the idle timeout fails these tests.
"""

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
from router.app import GatewayConfig, create_app
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from router.health import HealthConfig
from tests.servers import serve_in_thread

MODEL = "fake-model"
CLIENT_TIMEOUT_S = 20.0  # far below the 300 s idle timeout
WHOLE = "".join(f" t{i}" for i in range(10))


@dataclass
class Rig:
    url: str
    cluster: Cluster
    gateway: object
    prefill: object  # the fake prefill worker's app (the rescue target)
    decode: object


def _rig(health: HealthConfig, stall_factor: float) -> Iterator[Rig]:
    p_app, d_app = create_fake_worker("P", MODEL), create_fake_worker("D", MODEL)
    d_app.state.behaviour.token_delay_s = 0.01
    with serve_in_thread(p_app) as p_url, serve_in_thread(d_app) as d_url:
        cluster = Cluster()
        cluster.add("p0", p_url, Role.PREFILL, WorkerState.READY)
        cluster.add("d0", d_url, Role.DECODE, WorkerState.READY)
        dispatch = DispatchConfig(connect_timeout_s=1.0, prefill_timeout_s=5.0,
                                  stream_idle_timeout_s=300.0, request_timeout_s=300.0,
                                  stall_factor=stall_factor, stall_min_s=0.5)
        app = create_app(GatewayConfig(served_models=(MODEL,), dispatch=dispatch,
                                       health=health, stats_interval_s=0.2), cluster)
        try:
            with serve_in_thread(app) as g_url:
                yield Rig(g_url, cluster, app, p_app, d_app)
        finally:
            for worker in (p_app, d_app):  # let the stopped handlers end
                worker.state.behaviour.hang = False
                worker.state.behaviour.hang_before_done = False
                worker.state.behaviour.hang_before_usage = False
                worker.state.behaviour.stall_after_tokens = None
                worker.state.behaviour.stall_remote_decodes = False


@pytest.fixture()
def probed() -> Iterator[Rig]:
    """Fast probes, stall detection off: only the breaker moves streams."""
    yield from _rig(HealthConfig(interval_s=0.1, timeout_s=1.0), stall_factor=0)


@pytest.fixture()
def unprobed() -> Iterator[Rig]:
    """No probes: only stall detection moves streams."""
    yield from _rig(HealthConfig(interval_s=0), stall_factor=30)


def _stream(rig: Rig, body: dict, on_event=None) -> tuple[str, list[dict]]:  # noqa: ANN001
    """The streamed text and any error events; `on_event(n)` after the n-th chunk."""
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    text, errors, n = [], [], 0
    with httpx.stream("POST", rig.url + route, json={"model": MODEL, "stream": True, **body},
                      timeout=httpx.Timeout(CLIENT_TIMEOUT_S)) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                errors.append(chunk["error"])
            for choice in chunk.get("choices") or ():
                text.append(choice.get("text") or (choice.get("delta") or {}).get("content")
                            or "")
            n += 1
            if on_event is not None:
                on_event(n)
    return "".join(text), errors


def _in_flight_zero(cluster: Cluster) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if all(w.in_flight == 0 for w in cluster.snapshot().workers):
            return True
        time.sleep(0.05)
    return False


def _stop_after(rig: Rig, events: int):  # noqa: ANN202
    """SIGSTOP-like: the decode worker stops answering anything after `events` chunks."""
    def on_event(n: int) -> None:
        if n == events:
            rig.decode.state.behaviour.hang = True
    return on_event


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_on_a_hung_worker_moves_when_its_breaker_opens(probed: Rig,
                                                                chat: bool) -> None:
    probed.decode.state.behaviour.stall_after_tokens = 3
    body = ({"messages": [{"role": "user", "content": "abc"}], "max_tokens": 10} if chat
            else {"prompt": "abc", "max_tokens": 10})
    text, errors = _stream(probed, body, _stop_after(probed, 3))
    assert errors == []
    assert text == WHOLE  # the first tokens from d0, the rest from p0, none twice
    assert probed.gateway.state.health.summary()["d0"]["breaker"] == "open"
    assert probed.prefill.state.stats.local_requests == 1
    assert _in_flight_zero(probed.cluster)


def test_a_stalled_stream_moves_though_its_worker_answers_probes(unprobed: Rig) -> None:
    unprobed.decode.state.behaviour.stall_after_tokens = 4
    text, errors = _stream(unprobed, {"prompt": "abc", "max_tokens": 10})
    assert errors == [] and text == WHOLE
    assert unprobed.cluster.view("d0").healthy  # moved, but not taken out of rotation
    assert unprobed.prefill.state.stats.local_requests == 1
    assert _in_flight_zero(unprobed.cluster)


def test_a_stream_that_sent_nothing_yet_restarts_whole(probed: Rig) -> None:
    decode = probed.decode.state
    decode.behaviour.stall_after_tokens = 0

    def stop_once_streaming() -> None:  # headers sent, no token yet: then SIGSTOP
        deadline = time.monotonic() + 10
        while decode.stats.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        decode.behaviour.hang = True

    stopper = threading.Thread(target=stop_once_streaming)
    stopper.start()
    # presence_penalty makes it unmigratable; with nothing sent it can still start over
    text, errors = _stream(probed, {"prompt": "abc", "max_tokens": 10,
                                    "presence_penalty": 0.5})
    stopper.join()
    assert errors == [] and text == WHOLE
    assert probed.prefill.state.stats.local_requests == 1
    assert _in_flight_zero(probed.cluster)


def test_a_stream_waiting_for_kv_from_a_hung_prefill_worker_restarts(probed: Rig) -> None:
    decode = probed.decode.state
    decode.behaviour.stall_remote_decodes = True  # its KV pull from p0 never finishes

    def stop_the_prefill_worker() -> None:
        deadline = time.monotonic() + 10
        while decode.stats.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        probed.prefill.state.behaviour.hang = True

    stopper = threading.Thread(target=stop_the_prefill_worker)
    stopper.start()
    text, errors = _stream(probed, {"prompt": "abc", "max_tokens": 10})
    stopper.join()
    assert errors == [] and text == WHOLE
    assert decode.stats.remote_decodes == 1  # the first try waited for p0's KV
    assert decode.stats.local_requests == 1  # then d0 computed the prompt itself
    assert probed.gateway.state.health.summary()["p0"]["breaker"] == "open"


def test_a_worker_lost_after_the_last_token_ends_the_stream_cleanly(probed: Rig) -> None:
    # every token and the usage arrived; the worker hangs before [DONE]: nothing to move
    probed.decode.state.behaviour.hang_before_done = True
    body = {"prompt": "abc", "max_tokens": 10, "stream_options": {"include_usage": True}}
    text, errors = _stream(probed, body)
    assert errors == [] and text == WHOLE
    assert probed.gateway.state.health.summary()["d0"]["breaker"] == "open"
    assert probed.prefill.state.stats.local_requests == 0  # not resent anywhere
    assert _in_flight_zero(probed.cluster)


@pytest.mark.parametrize("chat", [False, True])
def test_a_worker_lost_before_its_usage_chunk_still_gives_the_client_usage(
        probed: Rig, chat: bool) -> None:
    # every token arrived, then the worker hangs: the usage the client asked for is
    # counted by the gateway and comes before [DONE]
    probed.decode.state.behaviour.hang_before_usage = True
    body = ({"messages": [{"role": "user", "content": "abc"}]} if chat
            else {"prompt": "abc"})
    body.update(model=MODEL, stream=True, max_tokens=10,
                stream_options={"include_usage": True})
    route = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", probed.url + route, json=body,
                      timeout=httpx.Timeout(CLIENT_TIMEOUT_S)) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    assert last["usage"]["prompt_tokens"] > 0
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 10
    assert last["object"] == ("chat.completion.chunk" if chat else "text_completion")
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert last["model"] == chunks[0]["model"] and last["created"] == chunks[0]["created"]
    assert probed.prefill.state.stats.local_requests == 0  # not resent anywhere
    assert _in_flight_zero(probed.cluster)


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_lost_inside_a_character_resumes_before_its_held_back_tokens(
        probed: Rig, chat: bool) -> None:
    # t2 and t3 end inside a multi-byte character: their text waits for the next token,
    # and the worker hangs before sending it. The client saw none of t2 and t3, so the
    # target makes them again after t0 t1.
    probed.decode.state.behaviour.held_back_tokens = (2, 3)
    probed.decode.state.behaviour.stall_after_tokens = 4
    body = ({"messages": [{"role": "user", "content": "abc"}], "max_tokens": 10} if chat
            else {"prompt": "abc", "max_tokens": 10})
    text, errors = _stream(probed, body, _stop_after(probed, 4))
    assert errors == []
    assert text == WHOLE  # nothing lost or doubled
    continued = probed.prefill.state.stats.bodies[-1]
    assert continued["prompt"] == [0, 1000, 1001] and continued["max_tokens"] == 8
    assert _in_flight_zero(probed.cluster)


@pytest.mark.parametrize("shown", [{"return_token_ids": True}, {"logprobs": 1},
                                   {"logprobs": 0}])
def test_held_back_tokens_the_client_saw_part_of_keep_the_stream_in_place(
        probed: Rig, shown: dict) -> None:
    # the client has the held-back tokens' ids or logprobs: making them again would
    # send those twice, so the stream ends with an error event at once
    probed.decode.state.behaviour.held_back_tokens = (2, 3)
    probed.decode.state.behaviour.stall_after_tokens = 4
    text, errors = _stream(probed, {"prompt": "abc", "max_tokens": 10, **shown},
                           _stop_after(probed, 4))
    assert text == " t0 t1"
    assert [e["code"] for e in errors] == ["upstream_stream_error"]
    assert "inside a UTF-8 character" in errors[0]["message"]
    assert probed.prefill.state.stats.local_requests == 0
    assert _in_flight_zero(probed.cluster)


def test_an_unmovable_stream_ends_with_an_error_event_at_once(probed: Rig) -> None:
    probed.decode.state.behaviour.stall_after_tokens = 3
    text, errors = _stream(probed, {"prompt": "abc", "max_tokens": 10,
                                    "presence_penalty": 0.5}, _stop_after(probed, 3))
    assert text == " t0 t1 t2"
    assert [e["code"] for e in errors] == ["upstream_stream_error"]
    assert "presence_penalty" in errors[0]["message"]
    assert _in_flight_zero(probed.cluster)


def test_with_no_other_worker_the_stream_ends_with_an_error_event(probed: Rig) -> None:
    probed.cluster.remove("p0")  # no other worker
    probed.decode.state.behaviour.stall_after_tokens = 3
    text, errors = _stream(probed, {"prompt": "abc", "max_tokens": 10},
                           _stop_after(probed, 3))
    assert text == " t0 t1 t2"
    assert [e["code"] for e in errors] == ["upstream_stream_error"]
    assert "no other ready worker" in errors[0]["message"]


def test_a_stream_waits_for_its_worker_to_come_back_when_none_other_is_there(
        probed: Rig) -> None:
    probed.cluster.remove("p0")
    health = probed.gateway.state.health
    decode = probed.decode.state.behaviour
    decode.stall_after_tokens = 3

    def resume_once_ejected() -> None:  # a load spike: out of rotation, then back
        deadline = time.monotonic() + 10
        while health.summary().get("d0", {}).get("breaker") != "open":
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        decode.stall_after_tokens = None
        decode.hang = False

    resumer = threading.Thread(target=resume_once_ejected)
    resumer.start()
    text, errors = _stream(probed, {"prompt": "abc", "max_tokens": 10},
                           _stop_after(probed, 3))
    resumer.join()
    assert errors == [] and text == WHOLE  # continued on d0 once it was back
    assert health.breakers["d0"].trips == 1
    assert _in_flight_zero(probed.cluster)
