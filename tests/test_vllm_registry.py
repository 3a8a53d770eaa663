"""Real vLLM workers started by hand from `fulcrum worker-args`, added to a running gateway
with `fulcrum worker add`, serving P/D, and removed under load with no lost request."""

from __future__ import annotations

import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from deploy.ports import free_port_block, kv_port_for
from tests.hand_workers import (
    fulcrum,
    metric,
    start_process,
    stop_process,
    wait_http,
    worker_args,
)
from tests.vllm_cluster import MODEL_NAME

pytestmark = pytest.mark.vllm


@dataclass
class Setup:
    gateway: str
    workers: dict[str, str]  # name -> url
    kv_ports: dict[str, int]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("registry")
    base = free_port_block(3, 19000 + (os.getpid() % 400) * 8)
    gw_port, ports = base, {"hp": base + 1, "hd": base + 2}
    procs = []
    try:
        for core, (name, port) in enumerate(ports.items()):
            spec = worker_args(port, "--cpu-core", str(core))
            log = tmp / f"{name}.log"
            procs.append((start_process(spec["argv"], spec["env"], log),
                          f"http://127.0.0.1:{port}", log))
        gw_log = tmp / "gateway.log"
        gateway = start_process(["python", "-m", "deploy.cli", "gateway", "--model",
                                 MODEL_NAME, "--port", str(gw_port)], {}, gw_log)
        procs.append((gateway, f"http://127.0.0.1:{gw_port}", gw_log))
        for proc, url, log in procs:  # a gateway with no worker is not healthy, but up
            wait_http(url, proc, log, path="/v1/models" if proc is gateway else "/health")
        yield Setup(f"http://127.0.0.1:{gw_port}",
                    {n: f"http://127.0.0.1:{p}" for n, p in ports.items()},
                    {n: kv_port_for(p) for n, p in ports.items()})
    finally:
        for proc, _, _ in procs:
            stop_process(proc)


def _prompt(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "river", "stone"])
                    for _ in range(words))


def test_workers_join_at_runtime_and_serve_pd(setup: Setup) -> None:
    for name, role in (("hp", "prefill"), ("hd", "decode")):
        out = fulcrum("worker", "add", setup.workers[name], "--role", role, "--name", name,
                      "--wait", "--json", "--url", setup.gateway)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["state"] == "ready"
    listed = fulcrum("worker", "list", "--json", "--url", setup.gateway)
    rows = {w["name"]: w for w in json.loads(listed.stdout)["workers"]}
    for name in ("hp", "hd"):  # learned from the worker itself, not assumed
        assert rows[name]["kv_endpoint"] == f"127.0.0.1:{setup.kv_ports[name]}"
    decode = setup.workers["hd"]
    external = metric(decode, "vllm:prompt_tokens_by_source_total",
                      source="external_kv_transfer")
    reply = httpx.post(setup.gateway + "/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": _prompt(120, 1), "max_tokens": 8,
        "temperature": 0}).json()
    assert reply["usage"]["completion_tokens"] == 8
    assert metric(decode, "vllm:prompt_tokens_by_source_total",
                  source="external_kv_transfer") - external == reply["usage"]["prompt_tokens"]


def test_worker_removed_under_load_loses_no_request(setup: Setup) -> None:
    results: list[tuple[int, int]] = []

    def stream(seed: int) -> None:
        tokens = 0
        with httpx.stream("POST", setup.gateway + "/v1/completions", timeout=300, json={
                "model": MODEL_NAME, "prompt": _prompt(40, seed), "max_tokens": 400,
                "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    usage = json.loads(line[6:]).get("usage")
                    if usage:
                        tokens = usage["completion_tokens"]
            results.append((resp.status_code, tokens))

    threads = [threading.Thread(target=stream, args=(10 + i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = 60.0
    while deadline > 0:  # wait until the decoder has streams in flight
        workers = httpx.get(setup.gateway + "/admin/workers", timeout=5).json()["workers"]
        if any(w["name"] == "hd" and w["in_flight_decode"] > 0 for w in workers):
            break
        threading.Event().wait(0.1)
        deadline -= 0.1
    # the last decoder: removal empties the pool, so it needs force; the prefill worker
    # then decodes (computing prompts itself). (`fulcrum worker remove` is this call; the
    # CLI's own start-up would let short streams finish first.)
    out = httpx.delete(setup.gateway + "/admin/workers/hd", params={"force": "true"},
                       timeout=300)
    for t in threads:
        t.join(300)
    assert out.status_code == 200, out.text
    assert out.json()["in_flight_at_start"] >= 1
    assert len(results) == 6 and all(r == (200, 400) for r in results), results
    names = [w["name"] for w in httpx.get(setup.gateway + "/admin/workers",
                                          timeout=5).json()["workers"]]
    assert names == ["hp"]
    served_before = metric(setup.workers["hd"], "vllm:request_success_total")
    reply = httpx.post(setup.gateway + "/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": "after removal", "max_tokens": 4})
    assert reply.status_code == 200
    assert metric(setup.workers["hd"], "vllm:request_success_total") == served_before


def test_worker_args_refuse_busy_ports(setup: Setup, tmp_path: Path) -> None:
    port = int(setup.workers["hd"].rsplit(":", 1)[1])
    out = fulcrum("worker-args", "--model", "tiny", "--port", str(port))
    assert out.returncode == 1 and str(port) in out.stderr
