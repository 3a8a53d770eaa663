"""Workers that join and leave a running gateway.

A worker joins with a URL and a role: it is registered as STARTING, probed on its
`/health` every `probe_interval_s`, asked where its KV block server listens (our connector
reports `vllm:fulcrum_kv_endpoint_info{host,port}` on `/metrics`), warmed up with one tiny
request and then marked READY. It leaves by draining first: no new legs, the legs in flight
finish, a short grace lets decoders finish pulling KV it still holds, then it is removed
(and its process stopped when a back end owns it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from core.flips import FlipCoordinator, FlipRefused
from core.membership import RegistryError, WorkerBackend
from core.workers import Role, WorkerState
from router.cluster import Cluster

log = logging.getLogger("fulcrum.registry")

KV_ENDPOINT_METRIC = "vllm:fulcrum_kv_endpoint_info"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class KVEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_kv_endpoint(metrics_text: str) -> KVEndpoint | None:
    """The KV block-server address a worker reports on `/metrics` (None: it reports none,
    e.g. a worker without our connector)."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name != KV_ENDPOINT_METRIC.removesuffix("_info") and \
                family.name != KV_ENDPOINT_METRIC:
            continue
        for sample in family.samples:
            if sample.value and "host" in sample.labels and "port" in sample.labels:
                return KVEndpoint(sample.labels["host"], int(sample.labels["port"]))
    return None


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK:
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


def check_worker_url(url: str) -> str:
    """The URL without a trailing slash, or RegistryError(400) when it is not http(s)://H:P."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RegistryError(f"worker url must look like http://HOST:PORT, got {url!r}",
                            status=400, code="invalid_worker_url")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise RegistryError(f"bad port in worker url {url!r}", status=400,
                            code="invalid_worker_url") from None
    return url.strip().rstrip("/")


@dataclass(frozen=True)
class JoinConfig:
    """How a joining worker is checked."""

    probe_interval_s: float = 1.0
    join_timeout_s: float = 600.0
    warmup_timeout_s: float = 300.0
    drain_timeout_s: float = 120.0
    kv_grace_s: float = 2.0  # decoders pull a prefill's KV right after its leg ends


@dataclass
class WorkerEntry:
    """What the registry knows about one worker beyond the routing view."""

    name: str
    source: str
    added_at: float
    kv: KVEndpoint | None = None
    error: str | None = None
    joined_in_s: float | None = None
    owner: WorkerBackend | None = None


class WorkerRegistry:
    """Adds and removes workers of a live `Cluster` (the `core.membership.WorkerMembership`
    that back ends use)."""

    def __init__(self, cluster: Cluster, flips: FlipCoordinator, served_model: str,
                 config: JoinConfig | None = None,
                 client_factory: Callable[[], httpx.AsyncClient] | None = None) -> None:
        self.cluster = cluster
        self.flips = flips
        self.served_model = served_model
        self.config = config or JoinConfig()
        self._client_factory = client_factory or (
            lambda: httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0)))
        self.entries: dict[str, WorkerEntry] = {}
        self._joins: dict[str, asyncio.Task] = {}
        self._leaving: set[str] = set()
        self.on_change: list[Callable[[], Awaitable[None] | None]] = []

    # -- joining ---------------------------------------------------------------------
    def _free_name(self) -> str:
        taken = set(self.cluster.names())
        i = 0
        while f"w{i}" in taken:
            i += 1
        return f"w{i}"

    def add(self, url: str, role: Role | str, *, name: str | None = None,
            source: str = "admin", owner: WorkerBackend | None = None) -> WorkerEntry:
        """Register a worker as STARTING and start joining it; returns at once."""
        url = check_worker_url(url)
        try:
            role = Role(role)
        except ValueError:
            raise RegistryError(f"role must be prefill or decode, got {role!r}", status=400,
                                code="invalid_role") from None
        if name is not None and not _NAME.match(name):
            raise RegistryError(f"bad worker name {name!r}: letters, digits, '.', '_', '-'",
                                status=400, code="invalid_worker_name")
        name = name or self._free_name()
        if name in self.cluster.names():
            raise RegistryError(f"a worker named {name!r} exists already")
        same = next((w.name for w in self.cluster.snapshot().workers if w.url == url), None)
        if same is not None:
            raise RegistryError(f"{url} is registered already as {same}")
        self.cluster.add(name, url, role, WorkerState.STARTING)
        entry = WorkerEntry(name=name, source=source, added_at=time.monotonic(), owner=owner)
        self.entries[name] = entry
        self._joins[name] = asyncio.create_task(self._join(name, url), name=f"join-{name}")
        log.info("worker %s (%s, %s) joining from %s", name, role.value, url, source)
        return entry

    def adopt(self, name: str, *, source: str, owner: WorkerBackend | None = None) -> None:
        """Record who runs a worker registered by someone else (its process supervisor),
        so that removing it also stops it."""
        self.entries[name] = WorkerEntry(name=name, source=source, added_at=time.monotonic(),
                                         owner=owner)

    async def wait_joined(self, name: str, timeout_s: float | None = None) -> WorkerEntry:
        """Until the worker is READY or its join failed (RegistryError then)."""
        task = self._joins.get(name)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout_s)
        entry = self.entries.get(name)
        if entry is None:
            raise RegistryError(f"{name} left while joining", status=409)
        if entry.error:
            raise RegistryError(f"{name} did not join: {entry.error}", status=502,
                                code="worker_join_failed")
        return entry

    async def _join(self, name: str, url: str) -> None:
        entry = self.entries[name]
        started = time.monotonic()
        try:
            async with self._client_factory() as client:
                await self._wait_healthy(client, url, started)
                entry.kv = await self._kv_endpoint(client, name, url)
                await self._warm_up(client, url)
        except RegistryError as exc:
            entry.error = str(exc)
            self.cluster.set_state(name, WorkerState.DEAD)
            log.error("worker %s did not join: %s", name, exc)
            return
        finally:
            self._joins.pop(name, None)
        entry.joined_in_s = time.monotonic() - started
        self.cluster.set_state(name, WorkerState.READY)
        log.info("worker %s ready after %.1fs (KV at %s)", name, entry.joined_in_s,
                 entry.kv or "unknown")
        await self._changed()

    async def _wait_healthy(self, client: httpx.AsyncClient, url: str, started: float) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + "/health")).status_code == 200:
                    return
            if time.monotonic() - started > self.config.join_timeout_s:
                raise RegistryError(f"{url}/health not OK after {self.config.join_timeout_s}s")
            await asyncio.sleep(self.config.probe_interval_s)

    async def _kv_endpoint(self, client: httpx.AsyncClient, name: str,
                           url: str) -> KVEndpoint | None:
        try:
            resp = await client.get(url + "/metrics")
            kv = parse_kv_endpoint(resp.text) if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            kv = None
        if kv is None:
            return None
        url_host = urlsplit(url).hostname or ""
        if _is_loopback(kv.host) and not _is_loopback(url_host):
            raise RegistryError(f"its KV block server listens on {kv} but the gateway reaches "
                                f"it at {url_host}: workers on other hosts could not pull its "
                                f"KV (start it with `fulcrum worker-args --host {url_host}`)")
        for other, e in self.entries.items():
            if other != name and e.kv == kv and other in self.cluster.names():
                raise RegistryError(f"its KV endpoint {kv} is already {other}'s")
        return kv

    async def _warm_up(self, client: httpx.AsyncClient, url: str) -> None:
        """Check it serves our model; the first request on a CPU worker pays one-time
        set-up, keep that off users."""
        try:
            listed = (await client.get(url + "/v1/models")).json()
            served = [m.get("id") for m in listed.get("data", [])]
        except (httpx.HTTPError, ValueError, AttributeError):
            served = []
        if served and self.served_model not in served:
            raise RegistryError(f"it serves {served}, not {self.served_model!r}")
        try:
            resp = await client.post(url + "/v1/completions", json={
                "model": self.served_model, "prompt": "Hello", "max_tokens": 1},
                timeout=self.config.warmup_timeout_s)
        except httpx.HTTPError as exc:
            raise RegistryError(f"warm-up request failed: {exc!r}") from None
        if resp.status_code != 200:
            raise RegistryError(f"warm-up answered {resp.status_code} (does it serve "
                                f"{self.served_model!r}?): {resp.text[:200]}")

    # -- leaving ---------------------------------------------------------------------
    async def remove(self, name: str, *, force: bool = False,
                     timeout_s: float | None = None, stop: bool = True) -> dict:
        """Drain, wait for in-flight legs, then deregister (and stop it, if a back end owns
        it, unless `stop` is False: the owner removes it itself)."""
        if name not in self.cluster.names():
            raise RegistryError(f"no worker named {name!r}; known: {self.cluster.names()}",
                                status=404, code="no_such_worker")
        if name in self._leaving:
            raise RegistryError(f"{name} is already leaving")
        self._leaving.add(name)
        try:
            return await self._remove(name, force, timeout_s, stop)
        finally:
            self._leaving.discard(name)

    async def _remove(self, name: str, force: bool, timeout_s: float | None,
                      stop: bool) -> dict:
        join = self._joins.pop(name, None)
        if join is not None:
            join.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await join
        view = self.cluster.view(name)
        started = time.monotonic()
        drained_legs = 0
        if view.state in (WorkerState.READY, WorkerState.DRAINING):
            timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
            drained_legs = view.in_flight
            try:
                result = await self.flips.drain(name, force=force, wait=True,
                                                timeout_s=timeout)
            except FlipRefused as exc:
                raise RegistryError(str(exc), status=exc.status) from None
            if not result.drained and not force:
                self.flips.undrain(name)
                raise RegistryError(f"{name} still has {result.in_flight} legs in flight "
                                    f"after {timeout}s; back in routing (force removes it "
                                    f"anyway)", status=409, code="drain_timeout")
            if view.role == Role.PREFILL or view.in_flight_prefill:
                await asyncio.sleep(self.config.kv_grace_s)
        self.cluster.remove(name)
        entry = self.entries.pop(name, None)
        if stop and entry is not None and entry.owner is not None:
            await entry.owner.stop_worker(name)
        log.info("worker %s removed after %.1fs", name, time.monotonic() - started)
        await self._changed()
        return {"name": name, "removed": True, "in_flight_at_start": drained_legs,
                "seconds": round(time.monotonic() - started, 3)}

    async def _changed(self) -> None:
        for hook in self.on_change:
            out = hook()
            if asyncio.iscoroutine(out):
                await out

    # -- listing ---------------------------------------------------------------------
    async def describe(self) -> list[dict]:
        """Every worker with its KV endpoint (asked of workers that have not told yet)."""
        out = []
        async with self._client_factory() as client:
            for view in self.cluster.snapshot().workers:
                entry = self.entries.get(view.name)
                if entry is None:
                    entry = self.entries[view.name] = WorkerEntry(
                        view.name, source="static", added_at=time.monotonic())
                if entry.kv is None and view.state == WorkerState.READY:
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        resp = await client.get(view.url + "/metrics", timeout=2.0)
                        entry.kv = parse_kv_endpoint(resp.text)
                out.append({"name": view.name, "url": view.url, "role": view.role.value,
                            "state": view.state.value, "source": entry.source,
                            "kv_endpoint": str(entry.kv) if entry.kv else None,
                            "in_flight": view.in_flight, "error": entry.error,
                            "joined_in_s": entry.joined_in_s,
                            "leaving": view.name in self._leaving})
        return out

    async def close(self) -> None:
        for task in list(self._joins.values()):
            task.cancel()
        await asyncio.gather(*self._joins.values(), return_exceptions=True)
