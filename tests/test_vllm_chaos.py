"""Hung and killed workers on real vLLM CPU workers: the breaker, and a short chaos run.

Three workers (one prefill, two decode) from `fulcrum up --model tiny`, started once
for the module. The long run (>= 10 minutes, >= 100 flips) is `python -m
benchmarks.chaos`; this is the same driver, bounded to a few minutes.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from benchmarks.chaos import Chaos, _worker_kv_usage
from tests.vllm_cluster import MAX_MODEL_LEN, MODEL_NAME, LiveCluster, start_cluster

pytestmark = pytest.mark.vllm

CLIENT_KEY, WORKER_KEY = "client-key", "worker-key"  # workers run with vLLM's --api-key
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveCluster]:
    live = start_cluster(tmp_path_factory.mktemp("chaos"), workers=3, extra_args=(
        "--prefill-workers", "1", "--stream-idle-timeout", "300", "--request-timeout", "90",
        "--api-key", CLIENT_KEY, "--worker-api-key", WORKER_KEY))
    try:
        yield live
    finally:
        live.stop()


def _complete(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/completions", timeout=60, headers=AUTH, json={
        "model": MODEL_NAME, "prompt": f"{time.time_ns()} hello there", "max_tokens": 4,
        "ignore_eos": True})


def _dispatch_count(url: str, mode: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f'fulcrum_dispatch_total{{mode="{mode}"}}'):
            return float(line.split()[1])
    return 0.0


def test_keys_for_clients_and_for_workers(cluster: LiveCluster) -> None:
    cluster.wait_all_ready()
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
    worker = cluster.worker_url(cluster.by_role("decode"))
    assert httpx.post(worker + "/v1/completions", json=body, timeout=60).status_code == 401
    assert httpx.post(cluster.url + "/v1/completions", json=body, timeout=60
                      ).status_code == 401
    pd_before = _dispatch_count(cluster.url, "pd")
    assert _complete(cluster.url).status_code == 200  # both legs carried the worker key
    assert _dispatch_count(cluster.url, "pd") == pd_before + 1


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_a_stopped_worker_leaves_rotation_and_returns_after_sigcont(
        cluster: LiveCluster, role: str) -> None:
    cluster.wait_all_ready()
    name = cluster.by_role(role)
    pid = cluster.workers()[name]["pid"]
    os.killpg(pid, signal.SIGSTOP)
    try:
        statuses = []
        deadline = time.monotonic() + 60
        while cluster.workers()[name]["healthy"]:
            assert time.monotonic() < deadline, f"{name} stayed in rotation while stopped"
            statuses.append(_complete(cluster.url).status_code)
        for _ in range(3):  # served by the other path meanwhile
            statuses.append(_complete(cluster.url).status_code)
        assert set(statuses) == {200}, statuses
        health = httpx.get(cluster.url + "/health", timeout=5).json()
        assert health["breakers"][name]["breaker"] == "open"
        if role == "prefill":  # the only prefill worker: served whole by decoders
            assert health["status"] == "degraded"
    finally:
        os.killpg(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while not cluster.workers()[name]["healthy"]:
        assert time.monotonic() < deadline, f"{name} never came back after SIGCONT"
        time.sleep(0.2)
    assert cluster.workers()[name]["pid"] == pid  # the same process, not a restart
    pd_before = _dispatch_count(cluster.url, "pd")
    for _ in range(3):
        assert _complete(cluster.url).status_code == 200
    assert _dispatch_count(cluster.url, "pd") > pd_before  # P/D again


def _stream(url: str, prompt: str, on_chunk=None) -> tuple[str, list[str], bool, str]:  # noqa: ANN001
    """(text, error codes, saw [DONE], decode worker) of a temperature-0 stream; the
    client gives up after 60 s of silence, far below the gateway's 300 s idle timeout."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 160, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, errors, done, n = [], [], False, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=AUTH,
                      timeout=httpx.Timeout(60, connect=10)) as resp:
        assert resp.status_code == 200
        worker = resp.headers["x-fulcrum-decode-worker"]
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"]["code"])
                text += "".join(c.get("text") or "" for c in chunk.get("choices") or ())
                n += 1
                if on_chunk is not None:
                    on_chunk(n, worker)
    return text, errors, done, worker


def _rescued(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith('fulcrum_pd_leg_failures_total{action="rescued",leg="decode"}'):
            return float(line.split()[1])
    return 0.0


def test_a_stream_on_a_stopped_decode_worker_continues_elsewhere(cluster: LiveCluster) -> None:
    cluster.wait_all_ready()
    prompt = "Once upon a time in a small village there lived"
    reference, errors, done, _ = _stream(cluster.url, prompt)
    assert errors == [] and done
    rescued_before = _rescued(cluster.url)
    stopped: list[int] = []

    def stop_its_worker(n: int, worker: str) -> None:
        if n == 10:  # mid-stream: SIGSTOP the decode worker serving it
            stopped.append(cluster.workers()[worker]["pid"])
            os.killpg(stopped[0], signal.SIGSTOP)

    try:
        text, errors, done, worker = _stream(cluster.url, prompt, stop_its_worker)
    finally:
        for pid in stopped:
            os.killpg(pid, signal.SIGCONT)
    assert stopped, "the stream ended before its worker could be stopped"
    assert done
    # a complete stream equal to the unmigrated run (a move needs another decode worker,
    # which this cluster has), long before the 300 s idle timeout
    assert errors == [], errors
    assert text == reference
    assert _rescued(cluster.url) == rescued_before + 1
    cluster.wait_all_ready()
    deadline = time.monotonic() + 120  # the stopped worker aborts its copy once resumed
    usage = {}
    while time.monotonic() < deadline:
        usage = {n: _worker_kv_usage(w["url"]) for n, w in cluster.workers().items()}
        if all(u == 0 for u in usage.values()):
            break
        time.sleep(1)
    assert all(u == 0 for u in usage.values()), f"KV blocks still held: {usage}"
    deadline = time.monotonic() + 60
    while not cluster.workers()[worker]["healthy"]:
        assert time.monotonic() < deadline, f"{worker} never came back after SIGCONT"
        time.sleep(0.2)


def test_short_chaos_run_loses_no_request(cluster: LiveCluster) -> None:
    cluster.wait_all_ready()
    chaos = Chaos(cluster.url, cluster.proc.pid, duration_s=100, concurrency=4,
                  flip_every_s=3.0, fault_every_s=20.0, seed=7, max_model_len=MAX_MODEL_LEN,
                  api_key=CLIENT_KEY)
    result = chaos.run()
    kv = chaos.settle()
    assert result["requests"] > 20
    assert result["outcomes"].get("lost", 0) == 0, result["reasons"]
    assert result["outcomes"].get("completed", 0) > result["requests"] // 2, result["reasons"]
    assert result["faults"], "no fault was injected"
    assert result["flips"]["recorded"] > 0
    assert kv and all(u == 0 for u in kv.values()), f"KV blocks still held: {kv}"
