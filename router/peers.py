"""Several gateway processes on one port (`--gateway-workers N`), one routing state.

Process 0 leads: it alone runs the role controller, flips and the worker supervisor,
and scrapes the workers' `/metrics`. Every process shares what it knows through a
small JSON file in a run folder, rewritten every `interval_s`:

- each process: its own in-flight legs and tokens per worker;
- the leader, also: the worker table (URL, role, state) and the scraped gauges.

Each process adds the others' in-flight counts to its own (policies and drains see
the whole gateway's load), and a follower copies the leader's worker table, so a flip
reaches every process within about one interval. Admin calls that land on a follower
are forwarded to the leader's private loopback port (see `AdminForwarder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from core.workers import Role, WorkerState
from router.cluster import Cluster

log = logging.getLogger("fulcrum.peers")

STALE_S = 3.0  # a process silent this long no longer counts


@dataclass(frozen=True)
class PeerConfig:
    """Where the processes of one gateway meet, and which one this is."""

    run_dir: Path
    index: int  # 0 leads
    interval_s: float = 0.1
    admin_url: str | None = None  # the leader's private loopback address

    @property
    def leader(self) -> bool:
        return self.index == 0

    def state_file(self, index: int) -> Path:
        return self.run_dir / f"process-{index}.json"


def own_state(cluster: Cluster, config: PeerConfig) -> dict:
    """What this process tells the others."""
    state: dict = {"pid": os.getpid(), "at": time.time(), "in_flight": cluster.own_load()}
    if config.leader:
        state["admin_url"] = config.admin_url
        state["workers"] = [
            {"name": v.name, "url": v.url, "role": v.role.value, "state": v.state.value,
             "kv_cache_usage": v.kv_cache_usage, "num_running": v.num_running,
             "num_waiting": v.num_waiting}
            for v in (cluster.record(n).view for n in cluster.names())]
    return state


def write_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)  # readers never see half a file


def read_peers(config: PeerConfig, now: float | None = None) -> dict[int, dict]:
    """Every other live process's last state, by process index."""
    now = time.time() if now is None else now
    out = {}
    for path in config.run_dir.glob("process-*.json"):
        try:
            index = int(path.stem.split("-", 1)[1])
            if index == config.index:
                continue
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - state.get("at", 0) <= STALE_S:
            out[index] = state
    return out


def apply_peers(cluster: Cluster, peers: dict[int, dict], follow_leader: bool) -> None:
    """Fold the other processes' states into `cluster`."""
    load: dict[str, list[int]] = {}
    for state in peers.values():
        for name, counts in state.get("in_flight", {}).items():
            total = load.setdefault(name, [0, 0, 0, 0])
            for i, c in enumerate(counts[:4]):
                total[i] += int(c)
    cluster.set_peer_load({name: tuple(v) for name, v in load.items()})
    leader = peers.get(0)
    if not follow_leader or leader is None or "workers" not in leader:
        return
    table = {w["name"]: w for w in leader["workers"]}
    for name in [n for n in cluster.names() if n not in table]:
        cluster.remove(name)
    for name, w in table.items():
        if name not in cluster.names():
            cluster.add(name, w["url"], Role(w["role"]), WorkerState(w["state"]))
        view = cluster.record(name).view
        if view.role.value != w["role"]:
            cluster.set_role(name, Role(w["role"]))
        if view.state.value != w["state"]:
            cluster.set_state(name, WorkerState(w["state"]))
        cluster.set_engine_stats(name, kv_cache_usage=float(w["kv_cache_usage"]),
                                 num_running=int(w["num_running"]),
                                 num_waiting=int(w["num_waiting"]))


class PeerSync:
    """Runs the exchange for one process; `leader_admin_url` is what followers forward
    admin calls to."""

    def __init__(self, cluster: Cluster, config: PeerConfig) -> None:
        self.cluster = cluster
        self.config = config
        self.leader_admin_url: str | None = None
        self.leader_seen = asyncio.Event()

    def step(self) -> None:
        write_state(self.config.state_file(self.config.index),
                    own_state(self.cluster, self.config))
        peers = read_peers(self.config)
        apply_peers(self.cluster, peers, follow_leader=not self.config.leader)
        if not self.config.leader and 0 in peers:
            self.leader_admin_url = peers[0].get("admin_url")
            self.leader_seen.set()

    async def wait_for_leader(self, timeout_s: float) -> bool:
        """A follower: wait until the leader's worker table arrived."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.leader_seen.wait(), timeout_s)
        return self.leader_seen.is_set()

    async def run(self) -> None:
        self.config.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                try:
                    self.step()
                except OSError as exc:
                    log.warning("peer state exchange failed: %r", exc)
                await asyncio.sleep(self.config.interval_s)
        finally:
            with contextlib.suppress(OSError):
                self.config.state_file(self.config.index).unlink()


class AdminForwarder:
    """ASGI: passes an admin call that reached a follower on to the leader."""

    def __init__(self, sync: PeerSync, client: object) -> None:
        self.sync = sync
        self.client = client  # an httpx.AsyncClient

    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        target = self.sync.leader_admin_url
        if target is None:
            status, content, ctype = 503, json.dumps({"error": {
                "message": "the leading gateway process is not reachable", "type":
                "service_unavailable", "param": None, "code": "no_leader"}}).encode(), \
                "application/json"
        else:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
                       if k in (b"authorization", b"content-type", b"accept")}
            url = target + scope["path"]
            if scope.get("query_string"):
                url += "?" + scope["query_string"].decode("latin-1")
            try:
                resp = await self.client.request(scope["method"], url, content=body,
                                                 headers=headers, timeout=130.0)
                status, content = resp.status_code, resp.content
                ctype = resp.headers.get("content-type", "application/json")
            except Exception as exc:  # noqa: BLE001 - answered as a 502
                status, ctype = 502, "application/json"
                content = json.dumps({"error": {"message": f"leader unreachable: {exc!r}",
                                                "type": "upstream_error", "param": None,
                                                "code": "no_leader"}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode("latin-1")),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})
