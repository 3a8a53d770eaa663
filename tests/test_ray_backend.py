"""The Ray back end: placement arithmetic (units), and `fulcrum up --backend ray` on a local
two-node Ray cluster with one real vLLM CPU worker per node, serving a P/D request whose KV
crosses nodes over TCP, restarting a killed worker and stopping everything on shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from core.workers import Role
from instance_manager.backends.ray_backend import Slot, _cpu_set, initial_role, plan_slots


def _node(node_id: str, cpus: int, gpus: int = 0, alive: bool = True) -> dict:
    res = {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "10.0.0.1",
            "Resources": res}


def test_one_worker_per_gpu_or_core_group() -> None:
    slots = plan_slots([_node("b-cpu", 9), _node("a-gpu", 64, gpus=4), _node("c-dead", 8,
                                                                        alive=False)], 4)
    assert [(s.node_id, s.index, s.gpu) for s in slots] == [
        ("a-gpu", 0, True), ("a-gpu", 1, True), ("a-gpu", 2, True), ("a-gpu", 3, True),
        ("b-cpu", 0, False), ("b-cpu", 1, False)]
    assert [s.global_index for s in slots] == list(range(6))
    assert plan_slots([_node("small", 2)], 4) == []


def test_roles_and_core_sets() -> None:
    assert [initial_role(i, 4, None) for i in range(4)] == [Role.PREFILL, Role.PREFILL,
                                                            Role.DECODE, Role.DECODE]
    assert initial_role(0, 1, None) == Role.DECODE  # alone: it does everything
    cpu = Slot("n", "ip", index=1, global_index=3, gpu=False)
    assert _cpu_set(cpu, 4, "slot") == "4-7" and _cpu_set(cpu, 1, "global") == "3"
    assert _cpu_set(cpu, 4, "none") is None
    assert _cpu_set(Slot("n", "ip", 0, 0, gpu=True), 4, "slot") is None


def test_workers_on_different_nodes_never_share_memory() -> None:
    from kv_transfer.fulcrum.transport.cpu import CpuTransport

    here, same, other = CpuTransport(node_id="n1"), CpuTransport(node_id="n1"), \
        CpuTransport(node_id="n2")
    assert here.hello()["host_key"] == same.hello()["host_key"]
    assert here.hello()["host_key"] != other.hello()["host_key"]
    assert CpuTransport().hello()["host_key"] not in (here.hello()["host_key"], "")


# --- two Ray nodes, two real vLLM workers ------------------------------------------------

ray = pytest.importorskip("ray")


@dataclass
class RayRig:
    url: str
    proc: subprocess.Popen
    node_ids: set[str]
    log: Path

    def workers(self) -> dict[str, dict]:
        return {w["name"]: w for w in httpx.get(self.url + "/admin/workers",
                                                timeout=5).json()["workers"]}

    def wait_ready(self, count: int, timeout_s: float = 420,
                   not_pid: int | None = None) -> dict[str, dict]:
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fulcrum up exited:\n{self.log.read_text()[-4000:]}")
            try:
                last = self.workers()
            except httpx.HTTPError:
                last = {}
            ready = [w for w in last.values() if w["state"] == "ready"]
            if len(ready) == count and all(w["pid"] != not_pid for w in ready):
                return last
            time.sleep(1)
        raise TimeoutError(f"{last}\n{self.log.read_text()[-4000:]}")


def _metric(url: str, name: str, **labels: str) -> float:
    from tests.hand_workers import metric

    return metric(url, name, **labels)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayRig]:
    from ray.cluster_utils import Cluster

    from deploy.ports import free_port_block
    from tests.vllm_cluster import MAX_MODEL_LEN, MODEL_NAME

    tmp = tmp_path_factory.mktemp("ray")
    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={**small, "resources": {"node_a": 1},
                                      "include_dashboard": False})
    cluster.add_node(**small, resources={"node_b": 1})
    cluster.wait_for_nodes()
    node_ids = {n.node_id for n in cluster.list_all_nodes()}
    port = free_port_block(1, 21000 + (os.getpid() % 300) * 8)
    log = tmp / "fulcrum-up.log"
    cmd = [sys.executable, "-m", "deploy.cli", "up", "--backend", "ray", "--address",
           cluster.address, "--model", "tiny", "--served-model-name", MODEL_NAME,
           "--port", str(port), "--workers", "2", "--ray-cores-per-worker", "1",
           "--ray-cpu-bind", "global", "--ray-worker-port", str(port + 1),
           "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-gib", "1",
           "--log-dir", str(tmp / "logs")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])
    rig = RayRig(f"http://127.0.0.1:{port}", proc, node_ids, log)
    try:
        rig.wait_ready(2)
        yield rig
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
        cluster.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purpose
        return f.read().split()[2] != "Z"


@pytest.mark.vllm
def test_one_worker_per_node_and_kv_crosses_nodes_over_tcp(rig: RayRig) -> None:
    workers = rig.workers()
    assert len(workers) == 2
    # names carry the node id prefix: one worker on each of the two nodes
    prefixes = {name.split("-")[1] for name in workers}
    assert len(prefixes) == 2
    assert all(any(n.startswith(p) for n in rig.node_ids) for p in prefixes)
    roles = {w["role"]: w for w in workers.values()}
    decode_url = roles["decode"]["url"]
    external = _metric(decode_url, "vllm:prompt_tokens_by_source_total",
                       source="external_kv_transfer")
    tcp = _metric(decode_url, "vllm:fulcrum_kv_tcp_pulls_total")
    prompt = " ".join(["river", "stone", "alpha", "delta"] * 30)
    reply = httpx.post(rig.url + "/v1/completions", timeout=120, json={
        "model": "tiny-llama", "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert reply.status_code == 200, reply.text
    prompt_len = reply.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 10  # connector stats reach /metrics with the next step
    while _metric(decode_url, "vllm:fulcrum_kv_tcp_pulls_total") == tcp and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert _metric(decode_url, "vllm:prompt_tokens_by_source_total",
                   source="external_kv_transfer") - external == prompt_len
    assert _metric(decode_url, "vllm:fulcrum_kv_tcp_pulls_total") - tcp == 1


@pytest.mark.vllm
def test_a_killed_worker_is_restarted_on_its_node_and_shutdown_stops_all(rig: RayRig) -> None:
    before = rig.workers()
    name, victim = next((n, w) for n, w in before.items() if w["role"] == "decode")
    os.killpg(victim["pid"], signal.SIGKILL)
    after = rig.wait_ready(2, not_pid=victim["pid"])
    assert set(after) == set(before)  # same slot, same node
    assert after[name]["role"] == "decode" and after[name]["pid"] != victim["pid"]
    reply = httpx.post(rig.url + "/v1/completions", timeout=120, json={
        "model": "tiny-llama", "prompt": "after a restart", "max_tokens": 4})
    assert reply.status_code == 200
    pids = [w["pid"] for w in after.values()]
    rig.proc.send_signal(signal.SIGTERM)
    rig.proc.wait(90)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids)
