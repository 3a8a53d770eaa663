"""Moving a running decode's KV with it when the gateway migrates the stream.

Workers that run Fulcrum's connector report their KV block server on `/metrics`. For a
stream on such a worker, the decode request carries a *migration hold*: if the request is
aborted, the worker keeps the blocks of the tokens it has processed for a few seconds
under a transfer id the gateway chose. A planned migration then aborts the stream on the
source and sends the target a continuation (prompt + generated ids, as a recompute
migration does) whose `kv_transfer_params` pull those blocks by position; the target
computes only the last token. If anything is missing (a worker without the connector, a
stream that has not generated on its worker yet, a lease that expired), the target
recomputes the context, as before. A stream that ends any other way (client disconnect,
rescue) releases its hold at once, so the blocks do not wait for the lease to expire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable

from core.workers import WorkerState
from kv_transfer.fulcrum.params import MigrationHold, lease_pull_params
from router.cluster import Cluster
from router.worker_registry import KVEndpoint, parse_kv_endpoint

log = logging.getLogger("fulcrum.kv_migration")

_HEADER = struct.Struct("!I")  # the block server's framing: length, then a JSON object
RETRY_PROBE_S = 5.0


class KVDirectory:
    """Which workers serve KV blocks, where (learned from each worker's `/metrics` once,
    again when its URL changes), and the hold/continuation params for their streams."""

    def __init__(self, fetch_metrics: Callable[[str], Awaitable[str]] | None,
                 hold_s: float = 10.0) -> None:
        self.fetch_metrics = fetch_metrics
        self.hold_s = hold_s
        self._known: dict[str, tuple[str, KVEndpoint | None]] = {}  # worker -> (url, kv)
        self._next_probe: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()

    def endpoint(self, worker: str, url: str) -> KVEndpoint | None:
        """The worker's block server, if known; an unknown one is asked in the background
        (its streams move by recompute until it answers)."""
        known = self._known.get(worker)
        if known is not None and known[0] == url:
            return known[1]
        if self.fetch_metrics is not None and time.monotonic() >= self._next_probe.get(
                worker, 0.0):
            self._next_probe[worker] = time.monotonic() + RETRY_PROBE_S
            self._spawn(self._probe(worker, url))
        return None

    async def resolve(self, worker: str, url: str) -> KVEndpoint | None:
        """The worker's block server, asking it now if unknown (a move to a worker that
        has had no stream yet)."""
        known = self._known.get(worker)
        if known is not None and known[0] == url:
            return known[1]
        if self.fetch_metrics is not None:
            await self._probe(worker, url)
        return self.known(worker)

    def learn(self, worker: str, url: str, kv: KVEndpoint | None) -> None:
        self._known[worker] = (url, kv)

    def known(self, worker: str) -> KVEndpoint | None:
        """What the directory knows now (asks nobody)."""
        return (self._known.get(worker) or ("", None))[1]

    async def watch(self, cluster: Cluster, interval_s: float = 1.0) -> None:
        """Forever: ask workers that joined (or moved) where they serve KV, so the first
        stream on a worker, or the first move to it, already knows."""
        while True:
            for view in cluster.snapshot().workers:
                if view.state == WorkerState.READY:
                    self.endpoint(view.name, view.url)
            await asyncio.sleep(interval_s)

    def new_hold(self, request_id: str) -> MigrationHold:
        return MigrationHold(f"{request_id}-{uuid.uuid4().hex[:12]}", self.hold_s)

    @staticmethod
    def continuation(hold: MigrationHold, source: KVEndpoint, num_tokens: int) -> dict:
        """The target's params: pull the first `num_tokens` tokens' KV the source holds."""
        return lease_pull_params(hold.transfer_id, source.host, source.port, num_tokens)

    def release(self, kv: KVEndpoint, hold: MigrationHold) -> None:
        """Tell the worker it need not keep the hold's blocks (best effort: else the lease
        expires). The abort may reach the worker after this; it then frees them at once."""
        self._spawn(_send_release(kv, hold.transfer_id))

    async def _probe(self, worker: str, url: str) -> None:
        assert self.fetch_metrics is not None
        try:
            text = await self.fetch_metrics(url)
        except Exception as exc:  # noqa: BLE001 - not up yet: asked again later
            log.debug("asking %s for its KV endpoint failed: %r", worker, exc)
            return
        self.learn(worker, url, parse_kv_endpoint(text))

    def _spawn(self, coro: Awaitable[None]) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        except RuntimeError:  # no loop (a synchronous caller in tests): nothing to do
            coro.close()  # type: ignore[attr-defined]
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _send_release(kv: KVEndpoint, transfer_id: str, timeout_s: float = 2.0) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(kv.host, kv.port), timeout_s)
    except (TimeoutError, OSError) as exc:
        log.debug("releasing %s at %s failed: %r", transfer_id, kv, exc)
        return
    try:
        body = json.dumps({"op": "release", "transfer_id": transfer_id}).encode()
        writer.write(_HEADER.pack(len(body)) + body)
        await writer.drain()
        (size,) = _HEADER.unpack(await asyncio.wait_for(reader.readexactly(_HEADER.size),
                                                        timeout_s))
        await asyncio.wait_for(reader.readexactly(size), timeout_s)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        log.debug("releasing %s at %s failed: %r", transfer_id, kv, exc)
    finally:
        writer.close()
