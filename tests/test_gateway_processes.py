"""Several gateway processes on one port (`--gateway-workers`): one routing state.

Unit tests of the state exchange, then two real gateway processes over fake workers:
a flip asked of whichever process answers reaches both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.fake_worker import create_fake_worker
from core.workers import Role, WorkerState
from router.cluster import Cluster
from router.peers import PeerConfig, apply_peers, own_state, read_peers, write_state
from tests.servers import free_port, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
MODEL = "fake-model"


def _cluster() -> Cluster:
    cluster = Cluster()
    cluster.add("p0", "http://p0", Role.PREFILL, WorkerState.READY)
    cluster.add("d0", "http://d0", Role.DECODE, WorkerState.READY)
    return cluster


def test_views_add_the_other_processes_load_but_legs_count_only_our_own() -> None:
    cluster = _cluster()
    cluster.begin("d0", Role.DECODE, 100)
    cluster.set_peer_load({"d0": (0, 3, 0, 300), "p0": (2, 0, 50, 0)})
    assert cluster.view("d0").in_flight_decode == 4
    assert cluster.view("d0").decode_tokens_in_flight == 400
    assert cluster.snapshot().by_name("p0").in_flight_prefill == 2
    assert cluster.own_load()["d0"] == (0, 1, 0, 100)
    cluster.end("d0", Role.DECODE, 100)
    assert cluster.own_load()["d0"] == (0, 0, 0, 0)
    assert cluster.view("d0").in_flight_decode == 3


def test_a_follower_takes_the_leaders_table_and_everyone_sums_in_flight(tmp_path) -> None:
    leader, follower = _cluster(), Cluster()  # a follower starts knowing no worker
    leader.set_role("p0", Role.DECODE)
    leader.set_state("d0", WorkerState.DRAINING)
    leader.set_engine_stats("d0", kv_cache_usage=0.5, num_running=7, num_waiting=2)
    leader.begin("p0", Role.DECODE, 10)
    lead_cfg, follow_cfg = PeerConfig(tmp_path, 0, admin_url="http://x"), PeerConfig(tmp_path, 1)
    write_state(lead_cfg.state_file(0), own_state(leader, lead_cfg))
    follower_peers = read_peers(follow_cfg)
    assert set(follower_peers) == {0}
    apply_peers(follower, follower_peers, follow_leader=True)
    assert follower.view("p0").role == Role.DECODE
    assert follower.view("d0").state == WorkerState.DRAINING
    assert follower.view("d0").num_running == 7 and follower.view("d0").kv_cache_usage == 0.5
    assert follower.view("p0").in_flight_decode == 1  # the leader's leg
    follower.begin("d0", Role.DECODE, 5)
    write_state(follow_cfg.state_file(1), own_state(follower, follow_cfg))
    apply_peers(leader, read_peers(lead_cfg), follow_leader=False)
    assert leader.view("d0").in_flight_decode == 1  # a drain waits for the follower's leg
    assert leader.view("p0").role == Role.DECODE  # the leader never follows anyone


def test_a_silent_process_no_longer_counts(tmp_path) -> None:
    cfg = PeerConfig(tmp_path, 0)
    state = own_state(_cluster(), PeerConfig(tmp_path, 1))
    state["at"] = time.time() - 60
    write_state(cfg.state_file(1), state)
    assert read_peers(cfg) == {}


def test_a_worker_the_leader_dropped_leaves_the_follower(tmp_path) -> None:
    follower = _cluster()
    leader = Cluster()
    leader.add("d0", "http://d0", Role.DECODE, WorkerState.READY)
    cfg = PeerConfig(tmp_path, 0)
    write_state(cfg.state_file(0), own_state(leader, cfg))
    apply_peers(follower, read_peers(PeerConfig(tmp_path, 1)), follow_leader=True)
    assert follower.names() == ["d0"]


def _decode_worker(url: str) -> str:
    """Send a request on a fresh connection (the kernel picks a process)."""
    resp = httpx.post(url + "/v1/completions", timeout=10, json={
        "model": MODEL, "prompt": "one two", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    return resp.headers["x-fulcrum-decode-worker"]


def test_two_gateway_processes_share_one_port_and_follow_one_flip(tmp_path) -> None:
    a, b = create_fake_worker("A", MODEL), create_fake_worker("B", MODEL)
    with serve_in_thread(a) as a_url, serve_in_thread(b) as b_url:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FULCRUM_CACHE_DIR": str(tmp_path)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "gateway", "--model", MODEL, "--port",
             str(port), "--gateway-workers", "2", "--worker", f"prefill={a_url}",
             "--worker", f"decode={b_url}"], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        run_dir = tmp_path / "run" / f"gateway-{port}-processes"
        try:
            deadline = time.monotonic() + 60
            while not (run_dir / "process-1.json").exists() or \
                    not (run_dir / "process-0.json").exists():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            pids = {json.loads((run_dir / f"process-{i}.json").read_text())["pid"]
                    for i in (0, 1)}
            assert len(pids) == 2
            assert {_decode_worker(url) for _ in range(20)} == {"w1"}
            assert a.state.stats.prefill_legs == 20 and b.state.stats.remote_decodes == 20
            for worker, to in (("w0", "decode"), ("w1", "prefill")):
                flip = httpx.post(url + "/admin/flip", timeout=30,
                                  json={"worker": worker, "to": to, "force": True})
                assert flip.status_code == 200, flip.text
            time.sleep(1.0)  # a few exchange intervals
            assert {_decode_worker(url) for _ in range(20)} == {"w0"}
            assert b.state.stats.prefill_legs == 20
            roles = {w["name"]: w["role"] for w in
                     httpx.get(url + "/admin/workers", timeout=10).json()["workers"]}
            assert roles == {"w0": "decode", "w1": "prefill"}
        finally:
            proc.terminate()
            proc.wait(20)
        for pid in pids:  # the follower went with the leader
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not Path(f"/proc/{pid}").exists() or \
                "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
