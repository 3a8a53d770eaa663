"""The gateway's side of KV-moving migration, against fake workers that report a KV block
server (a real `BlockServer` here, so releases land in a real lease table). The moved KV
itself is proven on real vLLM workers in `test_vllm_serving`."""

from __future__ import annotations

import json

import httpx
import torch

from benchmarks.fake_worker import create_fake_worker
from core.workers import Role, WorkerState
from deploy.gateway_app import build_gateway
from kv_transfer.fulcrum.blocks import KVBlockStore
from kv_transfer.fulcrum.lease import LeaseTable
from kv_transfer.fulcrum.server import BlockServer
from kv_transfer.fulcrum.stats import StatsRecorder
from kv_transfer.fulcrum.transport.cpu import CpuTransport
from router.app import GatewayConfig
from router.cluster import Cluster
from router.dispatch import DispatchConfig
from tests.servers import eventually, serve_in_thread

MODEL = "fake-model"


def _gateway(cluster: Cluster, kv_migration: bool = True) -> object:
    dispatch = DispatchConfig(connect_timeout_s=1.0, stream_idle_timeout_s=5.0,
                              kv_migration=kv_migration, migration_hold_s=7.0)
    return build_gateway(GatewayConfig(served_models=(MODEL,), dispatch=dispatch,
                                       stats_interval_s=0.2), cluster)


class BlockServerRig:
    """A real block server (one tiny KV layer) whose lease table the test reads."""

    def __init__(self) -> None:
        store = KVBlockStore({"l0": torch.zeros(4, 2, 4, 8)}, 4)
        self.leases = LeaseTable()
        self.server = BlockServer("127.0.0.1", 0, store, self.leases, CpuTransport(),
                                  StatsRecorder())

    def released_early(self, transfer_id: str) -> bool:
        return transfer_id in self.leases._unwanted


def _stream(url: str, request_id: str, max_tokens: int, stop_after: int | None = None
            ) -> str:
    body = {"model": MODEL, "prompt": "one two", "max_tokens": max_tokens, "stream": True}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=20,
                      headers={"X-Request-Id": request_id}) as resp:
        assert resp.status_code == 200
        for n, line in enumerate(resp.iter_lines()):
            if line.startswith("data: {") and '"choices":[{' in line:
                text += json.loads(line[6:])["choices"][0]["text"]
            if stop_after is not None and n >= stop_after:
                break  # the client goes away
    return text


def test_planned_migration_tells_the_target_to_pull_the_sources_held_kv() -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    src, dst = BlockServerRig(), BlockServerRig()
    d0.state.behaviour.kv_endpoint = ("127.0.0.1", src.server.port)
    d1.state.behaviour.kv_endpoint = ("127.0.0.1", dst.server.port)
    d0.state.behaviour.token_delay_s = 0.04  # the stream must outlast the move
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        cluster.add("d1", d1_url, Role.PREFILL, WorkerState.READY)
        app = _gateway(cluster)
        with serve_in_thread(app) as url:
            kv = app.state.dispatcher.kv
            assert eventually(lambda: kv.known("d0") and kv.known("d1"), 10.0)  # asked at start
            assert httpx.post(url + "/admin/migrate", json={
                "request_id": "kvm-1", "to": "d1", "after_tokens": 7,
                "planned": True}).status_code == 200
            text = _stream(url, "kvm-1", 20)
            assert text == "".join(f" t{i}" for i in range(20))
            hold = d0.state.stats.bodies[-1]["kv_transfer_params"]["migration_hold"]
            assert hold["ttl_s"] == 7.0
            continued = d1.state.stats.bodies[-1]
            params = continued["kv_transfer_params"]
            moved_after = 20 - continued["max_tokens"]
            assert params["do_remote_prefill"] and params["remote_block_positions"]
            assert params["transfer_id"] == hold["transfer_id"]
            assert (params["remote_host"], params["remote_port"]) == \
                ("127.0.0.1", src.server.port)
            # every token but the last one the source made: the target computes that one
            assert len(continued["prompt"]) == 2 + moved_after
            assert params["remote_num_tokens"] == len(continued["prompt"]) - 1
            # the target may be moved on in turn, with a hold of its own
            assert params["migration_hold"]["transfer_id"] != hold["transfer_id"]
            metrics = httpx.get(url + "/metrics").text
            assert "fulcrum_stream_kv_migrations_total 1.0" in metrics
            assert not src.released_early(hold["transfer_id"])  # the target reads it
    for rig in (src, dst):
        rig.server.close()


def test_a_stream_that_ends_early_releases_its_hold_and_unknown_workers_get_none() -> None:
    d0, d1 = create_fake_worker("D0", MODEL), create_fake_worker("D1", MODEL)
    src = BlockServerRig()
    d0.state.behaviour.kv_endpoint = ("127.0.0.1", src.server.port)
    d0.state.behaviour.token_delay_s = d1.state.behaviour.token_delay_s = 0.04
    with serve_in_thread(d0) as d0_url, serve_in_thread(d1) as d1_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        app = _gateway(cluster)
        with serve_in_thread(app) as url:
            kv = app.state.dispatcher.kv
            assert eventually(lambda: kv.known("d0"), 10.0)
            _stream(url, "gone-1", 50, stop_after=5)
            tid = d0.state.stats.bodies[-1]["kv_transfer_params"]["migration_hold"][
                "transfer_id"]
            assert eventually(lambda: src.released_early(tid), 10.0)
            # a worker that reports no block server: no hold, and a move recomputes
            cluster.add("d1", d1_url, Role.PREFILL, WorkerState.READY)
            cluster.set_role("d0", Role.PREFILL)
            cluster.set_role("d1", Role.DECODE)
            assert httpx.post(url + "/admin/migrate", json={
                "request_id": "plain-1", "to": "d0", "after_tokens": 5,
                "planned": True}).status_code == 200
            assert _stream(url, "plain-1", 12) == "".join(f" t{i}" for i in range(12))
            # (d0 prefilled it: P/D params, but no hold on d1)
            assert "migration_hold" not in d1.state.stats.bodies[-1]["kv_transfer_params"]
            continued = d0.state.stats.bodies[-1]["kv_transfer_params"]
            assert "remote_block_positions" not in continued and "migration_hold" in continued
            assert "fulcrum_stream_kv_migrations_total 0.0" in httpx.get(url + "/metrics").text
    src.server.close()


def test_kv_migration_off_sends_no_hold() -> None:
    d0 = create_fake_worker("D0", MODEL)
    src = BlockServerRig()
    d0.state.behaviour.kv_endpoint = ("127.0.0.1", src.server.port)
    with serve_in_thread(d0) as d0_url:
        cluster = Cluster()
        cluster.add("d0", d0_url, Role.DECODE, WorkerState.READY)
        app = _gateway(cluster, kv_migration=False)
        with serve_in_thread(app) as url:
            assert app.state.dispatcher.kv is None
            assert _stream(url, "off-1", 4) == " t0 t1 t2 t3"
            assert "kv_transfer_params" not in d0.state.stats.bodies[-1]
    src.server.close()
